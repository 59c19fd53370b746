"""The transformer sublayers, written once: GPT (causal) and BERT (bidirectional) reuse them.

Every parameter carries logical axis names and key activations carry logical constraints,
so how a model is split across devices is decided by `config.mesh.rules`, not here.

Logical axes: batch, length, embed (D), heads (H), kv (K, head dim), mlp (F), vocab (V),
pos (rows of the learned position table).
"""

from __future__ import annotations

import functools

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array
Config = ml_collections.ConfigDict


def wide(dtype) -> jnp.dtype:
    """The dtype of softmax statistics and logits: at least fp32 (fp64 stays fp64, for
    parity tests under jax_enable_x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def dtypes(cfg: Config) -> dict:
    """Compute and parameter dtypes, for `dtype=`/`param_dtype=` of flax layers."""
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def init(std: float, names: tuple[str | None, ...]):
    """Normal(0, std) initializer that records the parameter's logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Declares an activation's logical layout (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, names)


def dense(cfg: Config, features: int, names: tuple[str, str], std: float, *, name: str) -> nn.Dense:
    """A Dense layer whose [in, out] kernel and [out] bias carry logical axis names."""
    return nn.Dense(features, name=name, kernel_init=init(std, names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
                    **dtypes(cfg))


class LayerNorm(nn.Module):
    """LayerNorm with logically named scale and bias; statistics are computed in fp32."""
    cfg: Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.LayerNorm(
            epsilon=self.cfg.layer_norm_eps,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            **dtypes(self.cfg))(x)


# ----------------------------------------------------------------------------- positions


def rope(x_BxLxHxK: Array, positions_BxL: Array, base: float) -> Array:
    """Rotary position embedding: rotates pairs (x[i], x[i + K/2]) by position-dependent angles.

    Computed in fp32 (the angles lose precision in bf16 at long positions).
    """
    K, acc = x_BxLxHxK.shape[-1], wide(x_BxLxHxK.dtype)
    freq_K2 = base ** (-jnp.arange(0, K, 2, dtype=acc) / K)
    angle_BxLxK2 = positions_BxL[..., None].astype(acc) * freq_K2
    sin, cos = jnp.sin(angle_BxLxK2)[:, :, None], jnp.cos(angle_BxLxK2)[:, :, None]
    x1, x2 = jnp.split(x_BxLxHxK.astype(acc), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class Embeddings(nn.Module):
    """Token embedding plus (when config.position == "learned") a learned position table
    and (when config.type_vocab_size > 0, BERT) a token-type table for sentence A / B.

    `attend` maps hidden states back to vocabulary logits with the same table (tied output).
    """
    cfg: Config

    def setup(self):
        cfg = self.cfg
        self.tokens = nn.Embed(cfg.vocab_size, cfg.d_model,
                               embedding_init=init(cfg.init_std, ("vocab", "embed")),
                               **dtypes(cfg))
        if cfg.position == "learned":
            self.positions = nn.Embed(cfg.max_len, cfg.d_model,
                                      embedding_init=init(cfg.init_std / 2, ("pos", "embed")),
                                      **dtypes(cfg))
        if cfg.type_vocab_size:
            self.types = nn.Embed(cfg.type_vocab_size, cfg.d_model,
                                  embedding_init=init(cfg.init_std, (None, "embed")),
                                  **dtypes(cfg))

    def __call__(self, tokens_BxL: Array, positions_BxL: Array,
                 types_BxL: Array | None = None) -> Array:
        x_BxLxD = self.tokens(tokens_BxL)
        if self.cfg.position == "learned":
            x_BxLxD = x_BxLxD + self.positions(positions_BxL)
        if self.cfg.type_vocab_size:
            types_BxL = jnp.zeros_like(tokens_BxL) if types_BxL is None else types_BxL
            x_BxLxD = x_BxLxD + self.types(types_BxL)
        return constrain(x_BxLxD, ("batch", "length", "embed"))

    def attend(self, x_BxLxD: Array) -> Array:
        return self.tokens.attend(x_BxLxD)


# ----------------------------------------------------------------------------- attention


def attention_mask(q_positions_BxL: Array, kv_positions_BxS: Array, *, causal: bool,
                   q_segments_BxL: Array | None = None,
                   kv_segments_BxS: Array | None = None) -> Array:
    """Boolean mask [B, 1, L, S]: True where query l may attend to key s.

    Causal masks compare absolute positions; segment ids (0 = padding) keep attention
    inside one packed document and away from padding.
    """
    mask = jnp.ones((q_positions_BxL.shape[0], q_positions_BxL.shape[1],
                     kv_positions_BxS.shape[1]), bool)
    if causal:
        mask &= q_positions_BxL[:, :, None] >= kv_positions_BxS[:, None, :]
    if kv_segments_BxS is not None:
        mask &= (kv_segments_BxS != 0)[:, None, :]
        if q_segments_BxL is not None:
            mask &= q_segments_BxL[:, :, None] == kv_segments_BxS[:, None, :]
    return mask[:, None]


def dot_product_attention(q_BxLxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                          mask_Bx1xLxS: Array, *, dropout_rate: float = 0.0,
                          dropout_rng: Array | None = None) -> Array:
    """Plain XLA attention. Fused kernels (cuDNN, Pallas) will sit behind this signature.

    Logits and softmax run in fp32 whatever the compute dtype: bf16 has too few mantissa
    bits for the exp/sum of a softmax over long rows.
    """
    K, acc = q_BxLxHxK.shape[-1], wide(q_BxLxHxK.dtype)
    logits_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK,
                                preferred_element_type=acc) / jnp.sqrt(K).astype(acc)
    logits_BxHxLxS = jnp.where(mask_Bx1xLxS, logits_BxHxLxS, jnp.finfo(acc).min)
    probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BxHxLxS.shape)
        probs_BxHxLxS = jnp.where(keep, probs_BxHxLxS / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhls,bshk->blhk", probs_BxHxLxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)


class Attention(nn.Module):
    """Multi-head self-attention with an optional KV cache for incremental decoding.

    decode=True keeps keys/values in the "cache" collection (model.cache_len slots, or
    model.max_len when that is 0): the
    first call may pass a whole prompt, later calls one token each; positions are
    absolute and the cache index advances by the number of tokens passed.
    """
    cfg: Config
    causal: bool

    @nn.compact
    def __call__(self, x_BxLxD: Array, positions_BxL: Array, segments_BxL: Array | None,
                 *, deterministic: bool, decode: bool = False) -> Array:
        cfg = self.cfg
        D, H, K = cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads
        # Kernels are 2-D ([D, H*K] and [H*K, D], heads contiguous), not [D, H, K]: with K=64
        # a 3-D kernel is laid out on TPU with D minor-most, so an FSDP shard of D is not
        # contiguous and XLA all-reduces its gradient to full size instead of
        # reduce-scattering it (measured: +48 MB per gpt2_xl layer under FSDP-8).
        proj = functools.partial(dense, cfg, H * K, ("embed", "heads"), cfg.init_std)
        split = lambda y_BxLxHK: einops.rearrange(y_BxLxHK, "b l (h k) -> b l h k", h=H)
        q_BxLxHxK = split(proj(name="query")(x_BxLxD))
        k_BxLxHxK = split(proj(name="key")(x_BxLxD))
        v_BxLxHxK = split(proj(name="value")(x_BxLxD))
        if cfg.position == "rope":
            q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, cfg.rope_base)
            k_BxLxHxK = rope(k_BxLxHxK, positions_BxL, cfg.rope_base)
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", "kv"))
        k_BxLxHxK = constrain(k_BxLxHxK, ("batch", "length", "heads", "kv"))
        v_BxLxHxK = constrain(v_BxLxHxK, ("batch", "length", "heads", "kv"))

        if decode:
            k_BxSxHxK, v_BxSxHxK, kv_pos_BxS, kv_seg_BxS = self._update_cache(
                k_BxLxHxK, v_BxLxHxK, positions_BxL, segments_BxL)
        else:
            k_BxSxHxK, v_BxSxHxK = k_BxLxHxK, v_BxLxHxK
            kv_pos_BxS, kv_seg_BxS = positions_BxL, segments_BxL
        mask = attention_mask(positions_BxL, kv_pos_BxS, causal=self.causal,
                              q_segments_BxL=None if decode else segments_BxL,
                              kv_segments_BxS=kv_seg_BxS)
        use_dropout = not deterministic and cfg.attention_dropout > 0
        out_BxLxHxK = dot_product_attention(
            q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask,
            dropout_rate=cfg.attention_dropout if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None)
        out_BxLxD = dense(cfg, D, ("heads", "embed"), cfg.init_std / (2 * cfg.num_layers) ** 0.5,
                          name="out")(einops.rearrange(out_BxLxHxK, "b l h k -> b l (h k)"))
        return constrain(out_BxLxD, ("batch", "length", "embed"))

    def _update_cache(self, k_BxLxHxK, v_BxLxHxK, positions_BxL, segments_BxL):
        """Writes this call's keys/values at the cache index; returns the whole cache.

        Unwritten slots keep segment 0, so the mask ignores them like padding.
        """
        B, L, H, K = k_BxLxHxK.shape
        S = self.cfg.get("cache_len") or self.cfg.max_len
        zeros = lambda shape, dtype: jnp.zeros(shape, dtype)
        ck = self.variable("cache", "cached_key", zeros, (B, S, H, K), k_BxLxHxK.dtype)
        cv = self.variable("cache", "cached_value", zeros, (B, S, H, K), v_BxLxHxK.dtype)
        cpos = self.variable("cache", "positions", zeros, (B, S), jnp.int32)
        cseg = self.variable("cache", "segments", zeros, (B, S), jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        if segments_BxL is None:
            segments_BxL = jnp.ones((B, L), jnp.int32)
        i = index.value
        o = jnp.zeros_like(i)  # every index of one integer type, 32- or 64-bit (x64 mode)
        ck.value = jax.lax.dynamic_update_slice(ck.value, k_BxLxHxK, (o, i, o, o))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v_BxLxHxK, (o, i, o, o))
        cpos.value = jax.lax.dynamic_update_slice(cpos.value, positions_BxL.astype(jnp.int32), (o, i))
        cseg.value = jax.lax.dynamic_update_slice(cseg.value, segments_BxL.astype(jnp.int32), (o, i))
        index.value = i + L
        return ck.value, cv.value, cpos.value, cseg.value


# ----------------------------------------------------------------------------- MLP and block


def block_name(i: int) -> str:
    """The name of transformer block i in a model's parameter tree."""
    return f"block_{i}"


def apply_blocks(cfg: Config, causal: bool, x_BxLxD: Array, positions_BxL: Array,
                 segments_BxL: Array | None, deterministic: bool, decode: bool = False) -> Array:
    """config.model.num_layers blocks, each rematerialised in the backward pass when
    config.model.remat; call it from a model's compact __call__ (the blocks become that
    model's submodules block_0, block_1, ...)."""
    block = Block
    if cfg.remat:
        block = nn.remat(block, static_argnums=(4, 5))  # (self, x, pos, seg, det, decode)
    for i in range(cfg.num_layers):
        x_BxLxD = block(cfg, causal=causal, name=block_name(i))(
            x_BxLxD, positions_BxL, segments_BxL, deterministic, decode)
    return x_BxLxD


def activation(cfg: Config, x: Array) -> Array:
    """config.model.activation: GELU's tanh approximation (GPT-2) or the exact, erf-based
    GELU (BERT)."""
    return nn.gelu(x, approximate=cfg.activation == "gelu_tanh")


class Mlp(nn.Module):
    """Dense(D->F), GELU, Dense(F->D), dropout."""
    cfg: Config

    @nn.compact
    def __call__(self, x_BxLxD: Array, *, deterministic: bool) -> Array:
        cfg = self.cfg
        h_BxLxF = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), cfg.init_std, name="fc_in")(x_BxLxD)
        h_BxLxF = constrain(activation(cfg, h_BxLxF), ("batch", "length", "mlp"))
        out_BxLxD = dense(cfg, cfg.d_model, ("mlp", "embed"),
                          cfg.init_std / (2 * cfg.num_layers) ** 0.5, name="fc_out")(h_BxLxF)
        out_BxLxD = nn.Dropout(cfg.dropout)(out_BxLxD, deterministic=deterministic)
        return constrain(out_BxLxD, ("batch", "length", "embed"))


class Block(nn.Module):
    """A transformer block, by config.model.norm_position:
    "pre" (GPT-2):  x + Attn(LN(x)), then x + MLP(LN(x));
    "post" (BERT):  LN(x + Attn(x)), then LN(x + MLP(x))."""
    cfg: Config
    causal: bool

    @nn.compact
    def __call__(self, x_BxLxD: Array, positions_BxL: Array, segments_BxL: Array | None,
                 deterministic: bool, decode: bool = False) -> Array:
        # deterministic/decode are positional so nn.remat can mark them static.
        cfg = self.cfg
        pre = cfg.norm_position == "pre"
        ln_attn, ln_mlp = LayerNorm(cfg, name="ln_attn"), LayerNorm(cfg, name="ln_mlp")
        h = Attention(cfg, self.causal, name="attn")(
            ln_attn(x_BxLxD) if pre else x_BxLxD, positions_BxL, segments_BxL,
            deterministic=deterministic, decode=decode)
        x_BxLxD = x_BxLxD + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        if not pre:
            x_BxLxD = ln_attn(x_BxLxD)
        h = Mlp(cfg, name="mlp")(ln_mlp(x_BxLxD) if pre else x_BxLxD, deterministic=deterministic)
        x_BxLxD = x_BxLxD + h
        return constrain(x_BxLxD if pre else ln_mlp(x_BxLxD), ("batch", "length", "embed"))


# ----------------------------------------------------------------------------- heads


def last_token(x_BxLxD: Array, segments_BxL: Array | None) -> Array:
    """The hidden state of each row's last real token (segment != 0): what a causal model
    has read the whole text at. [B, D]."""
    if segments_BxL is None:
        return x_BxLxD[:, -1]
    last_B = jnp.max(jnp.where(segments_BxL != 0, jnp.arange(x_BxLxD.shape[1]), 0), axis=1)
    return jnp.take_along_axis(x_BxLxD, last_B[:, None, None], axis=1)[:, 0]


class ClassHead(nn.Module):
    """Sequence classification: dropout, then Dense(D -> config.model.num_classes); fp32
    logits. The same head for every family; what it reads ([CLS] through BERT's pooler, a
    GPT's last token) is the family's choice."""
    cfg: Config

    @nn.compact
    def __call__(self, x_BxD: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        x_BxD = nn.Dropout(cfg.dropout)(x_BxD, deterministic=deterministic)
        logits_BxC = dense(cfg, cfg.num_classes, ("embed", None), cfg.init_std, name="out")(x_BxD)
        return logits_BxC.astype(wide(logits_BxC.dtype))
