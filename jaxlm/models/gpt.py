"""GPT: a decoder-only transformer (GPT-2 layout: pre-LN blocks, final LN, tied output).

    model = GPT(config.model)
    params = model.init(rng, tokens_BxL)["params"]
    logits_BxLxV = model.apply({"params": params}, tokens_BxL)

One forward pass, top to bottom: embed tokens (+ learned positions) -> dropout ->
num_layers x Block(causal) -> LayerNorm -> logits over the vocabulary.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import layers

Array = jax.Array

# config.model fields that change parameter shapes or meaning: resuming or evaluating a
# checkpoint made with other values is refused.
SHAPE_FIELDS = ("vocab_size", "max_len", "num_layers", "d_model", "num_heads", "mlp_dim",
                "position", "tie_embeddings", "norm_position", "activation", "num_classes",
                "param_dtype", "scan_layers")


class GPT(nn.Module):
    cfg: layers.Config  # config.model

    @nn.compact
    def __call__(self, tokens_BxL: Array, positions_BxL: Array | None = None,
                 segments_BxL: Array | None = None, types_BxL: Array | None = None, *,
                 deterministic: bool = True, decode: bool = False,
                 output: str = "logits", hidden_BxLxD: Array | None = None) -> Array:
        """output="logits": next-token logits [B, L, V] in fp32; "hidden": the final hidden
        states [B, L, D]; "classes": class logits [B, C] (config.model.num_classes) from the
        last non-padding token.

        positions default to 0..L-1; segments (0 = padding) keep attention inside one
        document. decode=True runs incrementally against the KV cache (see layers.Attention).
        GPT has no token types (types_BxL is accepted for a uniform interface, and unused).

        hidden_BxLxD (final hidden states, as output="hidden" gives them; tokens_BxL may
        then be None) goes straight to the head: the chunked loss makes its logits a chunk
        at a time this way, so that the output projection runs inside the module that owns
        its weight (jaxlm.train.objectives.chunked_token_loss).
        """
        cfg = self.cfg
        embed = layers.Embeddings(cfg, name="embed")
        if hidden_BxLxD is None:
            if positions_BxL is None:
                positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]),
                                                 tokens_BxL.shape)
            x_BxLxD = embed(tokens_BxL, positions_BxL)
            x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)
            x_BxLxD = layers.apply_blocks(cfg, True, x_BxLxD, positions_BxL, segments_BxL,
                                          deterministic, decode)
            x_BxLxD = layers.LayerNorm(cfg, name="ln_final", recompute=True)(x_BxLxD)
        else:
            x_BxLxD = hidden_BxLxD

        out = {"hidden": x_BxLxD}
        init = self.is_initializing()  # init creates every head's parameters
        if output == "logits" or init:
            if cfg.tie_embeddings:
                logits_BxLxV = embed.attend(x_BxLxD)
            else:
                # fp32 accumulator and result, as layers.logits for the tied table
                wide_dot = functools.partial(jax.lax.dot_general,
                                             preferred_element_type=layers.logits_dtype(cfg))
                logits_BxLxV = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head",
                                        kernel_init=layers.init(cfg.init_std, ("embed", "vocab")),
                                        dot_general=wide_dot, **layers.dtypes(cfg))(x_BxLxD)
            out["logits"] = layers.constrain(logits_BxLxV, ("batch", "length", "vocab"))
        if cfg.num_classes and (output == "classes" or init):
            last_BxD = layers.last_token(x_BxLxD, segments_BxL)
            out["classes"] = layers.ClassHead(cfg, name="classifier")(last_BxD, deterministic)
        return out[output]


def flops_per_token(cfg: layers.Config, seq_len: int) -> float:
    """Training FLOPs per token: 6*N + 12*layers*D*seq_len.

    6N counts the forward (2N) and backward (4N) matmuls over the N non-embedding
    parameters plus the output projection (Kaplan et al. 2020, Sec. 2.1), and
    12*layers*D*L the attention score and value matmuls (forward + backward, PaLM appendix B).
    Position/token embedding lookups are not matmuls and are excluded.
    """
    D, F, Lyr, V = cfg.d_model, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    per_layer = 4 * D * D + 2 * D * F          # q, k, v, out + MLP in/out kernels
    n_matmul = Lyr * per_layer + D * V         # + the output (logits) projection
    return 6.0 * n_matmul + 12.0 * Lyr * D * seq_len
