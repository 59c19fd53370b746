"""BERT: a bidirectional encoder (Devlin et al. 2019) on the shared layers.

    model = BERT(config.model)      # configs/bert/*.py: post-LN, exact GELU, eps 1e-12
    logits_BxLxV = model.apply({"params": params}, tokens_BxL, types_BxL=types_BxL)
    classes_BxC = model.apply({"params": params}, tokens_BxL, output="classes")

One forward pass, top to bottom: embed tokens + learned positions + token types (sentence
A/B) -> LayerNorm -> dropout -> num_layers x Block(bidirectional, post-LN) -> a head:
  "logits"   the masked-LM head: Dense(D->D), GELU, LayerNorm, then the token embedding
             (tied) plus an output bias: [B, L, V];
  "classes"  the pooler (Dense(D->D), tanh, on the first token, [CLS]) then
             layers.ClassHead: [B, C] (config.model.num_classes);
  "next_sentence"  the pooler then Dense(D->2): next-sentence prediction logits [B, 2]
             (0: B follows A, 1: B is random, as in the original BERT);
  "spans"    the span-extraction head (config.model.span_head; SQuAD): Dense(D->2) at
             every position, a tuple (start logits [B, L], end logits [B, L]), fp32;
  "hidden"   the encoder's output [B, L, D].
`output` may name several heads, e.g. ("logits", "next_sentence"): one pass, a tuple.
Padding is segment 0: no position attends to it, so extra padding never changes the
outputs at real positions; packed documents (segments 1, 2, ...) do not see each other.
Names follow the layers GPT uses, so the Hugging Face converters map both the same way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import layers

Array = jax.Array

SHAPE_FIELDS = ("vocab_size", "max_len", "num_layers", "d_model", "num_heads", "mlp_dim",
                "position", "type_vocab_size", "norm_position", "activation", "num_classes",
                "span_head", "param_dtype", "scan_layers")


class BERT(nn.Module):
    cfg: layers.Config  # config.model

    @nn.compact
    def __call__(self, tokens_BxL: Array, positions_BxL: Array | None = None,
                 segments_BxL: Array | None = None, types_BxL: Array | None = None, *,
                 deterministic: bool = True, decode: bool = False,
                 output: str | tuple[str, ...] = "logits") -> Array | tuple[Array, ...]:
        cfg = self.cfg
        if decode:
            raise ValueError("BERT is an encoder: there is no incremental decoding")
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        embed = layers.Embeddings(cfg, name="embed")
        x_BxLxD = embed(tokens_BxL, positions_BxL, types_BxL)
        x_BxLxD = layers.LayerNorm(cfg, name="ln_embed", recompute=True)(x_BxLxD)
        x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)

        x_BxLxD = layers.apply_blocks(cfg, False, x_BxLxD, positions_BxL, segments_BxL,
                                      deterministic)

        out = {"hidden": x_BxLxD}
        wanted = {output} if isinstance(output, str) else set(output)
        init = self.is_initializing()  # init creates every head's parameters
        if "logits" in wanted or init:
            h_BxLxD = layers.dense(cfg, cfg.d_model, ("embed", None), cfg.init_std,
                                   name="mlm_dense")(x_BxLxD)
            h_BxLxD = layers.LayerNorm(cfg, name="mlm_ln", recompute=True)(layers.activation(cfg, h_BxLxD))
            bias_V = self.param("mlm_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,), jnp.dtype(cfg.param_dtype))
            logits_BxLxV = embed.attend(h_BxLxD) + bias_V  # fp32 (layers.logits)
            out["logits"] = layers.constrain(logits_BxLxV, ("batch", "length", "vocab"))
        if wanted & {"classes", "next_sentence"} or init:
            pooled_BxD = jnp.tanh(layers.dense(cfg, cfg.d_model, ("embed", None), cfg.init_std,
                                               name="pooler")(x_BxLxD[:, 0]))
            if cfg.num_classes and ("classes" in wanted or init):
                out["classes"] = layers.ClassHead(cfg, name="classifier")(pooled_BxD, deterministic)
            if "next_sentence" in wanted or init:
                out["next_sentence"] = layers.dense(cfg, 2, ("embed", None), cfg.init_std,
                                                    name="next_sentence")(pooled_BxD)
                out["next_sentence"] = out["next_sentence"].astype(layers.wide(pooled_BxD.dtype))
        if cfg.span_head and ("spans" in wanted or init):
            # Created only when asked, so a pretraining checkpoint has none (fine-tuning
            # adds it fresh, as the class head).
            spans_BxLx2 = layers.dense(cfg, 2, ("embed", None), cfg.init_std,
                                       name="span_head")(x_BxLxD)
            spans_BxLx2 = spans_BxLx2.astype(layers.wide(x_BxLxD.dtype))
            out["spans"] = (spans_BxLx2[..., 0], spans_BxLx2[..., 1])
        if isinstance(output, str):
            return out[output]
        return tuple(out[o] for o in output)


def flops_per_token(cfg: layers.Config, seq_len: int) -> float:
    """Training FLOPs per token: 6*N + 12*layers*D*seq_len, N the matmul parameters of the
    blocks, the MLM transform (D*D) and the tied decoder (D*V); as for GPT (gpt.py), with
    the attention matmuls over all seq_len keys (bidirectional: no causal halving is
    claimed for either)."""
    D, F, Lyr, V = cfg.d_model, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    n_matmul = Lyr * (4 * D * D + 2 * D * F) + D * D + D * V
    return 6.0 * n_matmul + 12.0 * Lyr * D * seq_len
