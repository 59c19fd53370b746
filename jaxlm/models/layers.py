"""The transformer sublayers, written once: GPT (causal) and BERT (bidirectional) reuse them.

Every parameter carries logical axis names and key activations carry logical constraints,
so how a model is split across devices is decided by `config.mesh.rules`, not here.

Logical axes: batch, length, embed (D), heads (H), kv (K, head dim), mlp (F), vocab (V),
pos (rows of the learned position table).
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.linen.dtypes import promote_dtype
from jax.experimental.layout import Layout, with_layout_constraint

from jaxlm.models.attention import MaskSpec, attend, resolve

Array = jax.Array
Config = ml_collections.ConfigDict


def wide(dtype) -> jnp.dtype:
    """The dtype of softmax statistics and logits: at least fp32 (fp64 stays fp64, for
    parity tests under jax_enable_x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def logits_dtype(cfg: Config) -> jnp.dtype:
    """The dtype vocabulary logits are produced in: fp32 or wider (`wide`), or with
    config.model.wide_logits=false the compute dtype."""
    return wide(cfg.dtype) if cfg.get("wide_logits", True) else jnp.dtype(cfg.dtype)


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
                    dot_general=kernel_dot(cfg), **dtypes(cfg))


def kernel_dot(cfg: Config):
    """The dot_general of activations against a kernel [in, *out] for the platform the
    model is compiled for (config.model.platform, set by setup.build; else the default
    backend): `cpu_kernel_dot` on CPU, plain lax.dot_general elsewhere."""
    platform = cfg.get("platform") or jax.default_backend()
    return cpu_kernel_dot if platform == "cpu" else jax.lax.dot_general


# jax's own dot_general, and its code: an interceptor replaces one or the other
# (monkeypatching the attribute, or, as google/qwix does, swapping the function's code).
_LAX_DOT = jax.lax.dot_general
_LAX_DOT_CODE = _LAX_DOT.__code__


_JNP_EINSUM = jnp.einsum
_JNP_EINSUM_CODE = _JNP_EINSUM.__code__


def _dot_intercepted() -> bool:
    dot = jax.lax.dot_general
    return dot is not _LAX_DOT or getattr(dot, "__code__", None) is not _LAX_DOT_CODE


def _einsum_intercepted() -> bool:
    return _dot_intercepted() or jnp.einsum is not _JNP_EINSUM or \
        getattr(jnp.einsum, "__code__", None) is not _JNP_EINSUM_CODE


def cpu_kernel_dot(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general; for x's last axis against the kernel's first (every projection),
    the kernel's gradient is computed as [*out, in], dy^T x, and then transposed.

    XLA:CPU gives a matmul to its fast library (YNNPACK) only when no operand is contracted
    over its first axis. Left alone it computes an [in, out] kernel's gradient x^T dy with
    x contracted over its first (token) axis, in a slower matmul that also does not overlap
    the input gradient's; dy^T x, dy transposed first, is a plain library matmul. The
    barrier keeps XLA from folding the transpose back into the matmul. Same values; 3-6%
    off a training step (benchmarks/vs_hf.py, BENCHMARKS.md).

    It yields to any transform. The rule: the custom gradient is used only while
    jax.lax.dot_general is jax's own and both operands are plain arrays; otherwise (a
    matmul interceptor such as qwix's quantization or LoRA is active, or the kernel is a
    quantized or boxed weight) this is jax.lax.dot_general, looked up at call time, on
    the operands as given, so the interceptor sees the module's own parameter. (Inside the
    custom_vjp the kernel would be a fresh tracer that no interceptor can recognise.)
    """
    (contract_x, contract_k), batch = dimension_numbers
    if (tuple(contract_x), tuple(contract_k)) != ((x.ndim - 1,), (0,)) or any(batch) or \
            preferred_element_type is not None or _dot_intercepted() or \
            not (isinstance(x, jax.Array) and isinstance(kernel, jax.Array)):
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision,
                                   preferred_element_type)
    return _kernel_grad_transposed(x, kernel, precision)


def _kernel_dot(x, kernel, precision):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision)


_kernel_grad_transposed = jax.custom_vjp(_kernel_dot, nondiff_argnums=(2,))


def _kernel_dot_fwd(x, kernel, precision):
    return _kernel_dot(x, kernel, precision), (x, kernel)


def _kernel_dot_bwd(precision, residuals, dy):
    x, kernel = residuals
    tokens, outs = tuple(range(x.ndim - 1)), tuple(range(x.ndim - 1, dy.ndim))
    dx = jax.lax.dot_general(dy, kernel, ((outs, tuple(range(1, kernel.ndim))), ((), ())),
                             precision)
    dkernel_T = jax.lax.dot_general(dy, x, ((tokens, tokens), ((), ())), precision)
    dkernel = jnp.moveaxis(jax.lax.optimization_barrier(dkernel_T), -1, 0)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_kernel_grad_transposed.defvjp(_kernel_dot_fwd, _kernel_dot_bwd)


class FusedDense(nn.Module):
    """x [.., in] @ kernel [in, *features] + bias [*features], logically named (the bias
    takes the kernel's names but the first) and initialised as `dense`: several
    projections of one input as one parameter and one matmul. (nn.DenseGeneral draws a
    2-D kernel and reshapes it, which the 3-D kernel's logical names do not survive.)"""
    cfg: Config
    features: tuple[int, ...]
    names: tuple[str | None, ...]
    std: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.param_dtype)
        kernel = self.param("kernel", init(self.std, self.names),
                            (x.shape[-1], *self.features), dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               self.names[1:]),
                          self.features, dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=cfg.dtype)
        return kernel_dot(cfg)(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias


class LayerNorm(nn.Module):
    """LayerNorm with logically named scale and bias; statistics are computed in fp32.

    recompute=True: the backward pass recomputes the norm from x, so what it keeps is x
    itself, not the fp32 copy of x the statistics are taken from (twice x's size in a bf16
    step). For the norms outside the layers' scan, whose remat does not reach them: that
    copy of the final norm's input stayed live through the whole backward scan (XLA's
    memory report, 1.3B b2 on a v5e 8x8: f32 [2, 2048, 2048]; BENCHMARKS.md, "The final
    norm, recomputed")."""
    cfg: Config
    recompute: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        norm = nn.remat(nn.LayerNorm) if self.recompute else nn.LayerNorm
        return norm(
            epsilon=self.cfg.layer_norm_eps,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="LayerNorm_0", **dtypes(self.cfg))(x)


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
        self.tokens = Embed(cfg.vocab_size, cfg.d_model,
                            embedding_init=init(cfg.init_std, ("vocab", "embed")),
                            logits_dtype=logits_dtype(cfg),
                            lookup=cfg.get("embed_lookup", "gather"), **dtypes(cfg))
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
        """Logits [B, L, V] against the token table (layers.logits)."""
        return self.tokens.attend(x_BxLxD)


class Embed(nn.Embed):
    """nn.Embed whose `attend` (the tied output projection) runs in this module, on its own
    table, as a transform (quantization, LoRA) needs to see it, and keeps a wide
    accumulator (layers.logits) where nn.Embed's would be the compute dtype.

    lookup (config.model.embed_lookup), three ways to the same rows. Under FSDP the table is
    split along D:
    - "gather": rows taken where the table lies: each token goes to every device holding a
      slice of D and its slice comes back (two all-to-alls; on TPU a slice narrower than
      128 values is padded to 128: 3-value slices fill 3 of its 128 lanes).
    - "gather_whole": the table all-gathered to every device (as the output projection
      gathers it anyway), then rows taken locally: no token exchange. A table a transform
      replaced (not a plain array, e.g. int8) is looked up by "gather".
    - "one_hot": one_hot(tokens) @ table, one term per sum (MaxText's use_iota_embed):
      no exchange either, but 2*V*D FLOPs a token forward and again for the gradient.
    Which needs least memory depends on the shape and slice, with no rule found: against
    "gather", "gather_whole" lowered the peak at most shapes on v5e 8x8 and 16x16 slices and
    raised it at most on a v5p 4x4x4 (BENCHMARKS.md, "The token lookup, three ways")."""
    logits_dtype: Any = None  # None: wide(dtype)
    lookup: str = "gather"

    def __call__(self, inputs: Array) -> Array:
        table = self.embedding
        if self.lookup == "one_hot":
            hot = inputs[..., None] == jnp.arange(self.num_embeddings)
            return jnp.einsum("...v,vd->...d", hot.astype(self.dtype), table.astype(self.dtype))
        if self.lookup == "gather_whole" and isinstance(table, jax.Array):
            table = constrain(table.astype(self.dtype), ("vocab", None))
            return jnp.take(table, inputs, axis=0)
        return super().__call__(inputs)

    def attend(self, x_BxLxD: Array) -> Array:
        return logits(x_BxLxD, self.embedding, self.dtype, self.logits_dtype)


def logits(x_BxLxD: Array, table_VxD: Array, dtype, out_dtype=None) -> Array:
    """x @ table^T in the compute dtype with a wide (fp32) accumulator and result (a bf16
    logit keeps ~3 significant digits), or a result in `out_dtype` (logits_dtype). Its two
    gradients leave the backward pass together (`gradients_together`), unless a matmul
    interceptor is active (qwix's QAT or LoRA) or the table is not a plain array: the
    interceptor must see the module's own parameter in the einsum, not the output of a
    two-input op (as cpu_kernel_dot yields)."""
    dtype = jnp.dtype(dtype)
    if not _einsum_intercepted() and isinstance(table_VxD, jax.Array):
        x_BxLxD, table_VxD = gradients_together(x_BxLxD, table_VxD)
    return jnp.einsum("bld,vd->blv", x_BxLxD.astype(dtype), table_VxD.astype(dtype),
                      preferred_element_type=out_dtype or wide(dtype))


@jax.custom_vjp
def gradients_together(x: Array, table: Array) -> tuple[Array, Array]:
    """(x, table) unchanged. In the backward pass their two gradients go through one
    optimization barrier, so neither flows on before both are made: the output
    projection's table gradient is then made before the layers' backward pass, and the
    [B, L, V] logits' gradient it reads is freed there. Without it XLA's TPU scheduler made
    the table gradient after the layers' backward pass and kept that array alive through
    it: 0.21 GB a sequence at GPT-2's vocabulary and 2048 tokens (BENCHMARKS.md, "The
    logits' gradient, freed early"). With one of the two not differentiated (a table
    frozen by config.train.trainable) nothing is tied, so the unused gradient is never
    computed."""
    return x, table


def _together_fwd(x, table):
    # symbolic_zeros=True: the arguments come as CustomVJPPrimal(value, perturbed); the
    # residual, empty or not, tells the backward pass whether both are differentiated.
    both = x.perturbed and table.perturbed
    return (x.value, table.value), ((jnp.zeros((0,)),) if both else ())


def _together_bwd(both, grads):
    if both and not any(isinstance(g, jax.custom_derivatives.SymbolicZero) for g in grads):
        return jax.lax.optimization_barrier(grads)
    return grads


gradients_together.defvjp(_together_fwd, _together_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head self-attention with an optional KV cache for incremental decoding.

    decode=True keeps keys/values in the "cache" collection (model.cache_len slots, or
    model.max_len when that is 0): the
    first call may pass a whole prompt, later calls one token each; positions are
    absolute and the cache index advances by the number of tokens passed. The kernel is
    config.model.attention_impl (jaxlm.models.attention).
    """
    cfg: Config

    @nn.compact
    def __call__(self, x_BxLxD: Array, spec: MaskSpec, *, deterministic: bool,
                 decode: bool = False) -> Array:
        cfg = self.cfg
        D, H, K = cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads
        # Heads stay contiguous in one axis (H*K), never a [D, H, K] kernel: with K=64 a
        # [D, H, K] kernel is laid out on TPU with D minor-most, so an FSDP shard of D is
        # not contiguous and XLA all-reduces its gradient to full size instead of
        # reduce-scattering it (measured: +48 MB per gpt2_xl layer under FSDP-8).
        # Query, key and value are one parameter [D, 3, H*K]: stacked on a new axis of 3
        # (not [D, 3*H*K]) so that a heads-sharded kernel holds the same heads of all
        # three, and one parameter under one matmul in the module that owns it, as a
        # matmul transform (quantization, LoRA) needs to see a weight. (Before, three 2-D
        # kernels were stacked into this same array in the forward pass; the parameter's
        # own TPU layout under FSDP is not measured yet.)
        qkv_BxLx3xHK = FusedDense(cfg, (3, H * K), ("embed", None, "heads"), cfg.init_std,
                                  name="qkv")(x_BxLxD)
        # A split (its gradient one concatenation), not indexing (three pads and adds).
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
            einops.rearrange(x, "b l 1 (h k) -> b l h k", h=H)
            for x in jnp.split(qkv_BxLx3xHK, 3, axis=2))
        if cfg.position == "rope":
            q_BxLxHxK = rope(q_BxLxHxK, spec.q_positions_BxL, cfg.rope_base)
            k_BxLxHxK = rope(k_BxLxHxK, spec.q_positions_BxL, cfg.rope_base)
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", "kv"))
        k_BxLxHxK = constrain(k_BxLxHxK, ("batch", "length", "heads", "kv"))
        v_BxLxHxK = constrain(v_BxLxHxK, ("batch", "length", "heads", "kv"))

        # setup.build resolved the kernel for the target devices; a model built directly
        # with "auto" resolves it for the default backend.
        impl = cfg.attention_impl
        if impl == "auto":
            impl = resolve(cfg, jax.default_backend())
        if decode:  # keys and values come from the cache; one query row: the XLA path
            k_BxSxHxK, v_BxSxHxK, spec = self._update_cache(k_BxLxHxK, v_BxLxHxK, spec)
            impl = "xla"
        else:
            k_BxSxHxK, v_BxSxHxK = k_BxLxHxK, v_BxLxHxK
        use_dropout = not deterministic and cfg.attention_dropout > 0
        out_BxLxHxK = attend(
            q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, spec, impl,
            interpret=cfg.get("attention_interpret", False),
            dropout_rate=cfg.attention_dropout if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None)
        out_BxLxD = dense(cfg, D, ("heads", "embed"), cfg.init_std / (2 * cfg.num_layers) ** 0.5,
                          name="out")(einops.rearrange(out_BxLxHxK, "b l h k -> b l (h k)"))
        return constrain(out_BxLxD, ("batch", "length", "embed"))

    def _update_cache(self, k_BxLxHxK, v_BxLxHxK, spec: MaskSpec):
        """Writes this call's keys/values at each row's cache index; returns the whole cache
        and the mask spec of this call's queries against it.

        Unwritten slots keep segment 0, so the mask ignores them like padding. A write past
        the end is clamped to it (dynamic_update_slice): callers keep prompt + new tokens
        within the cache.
        """
        B, L, H, K = k_BxLxHxK.shape
        S = self.cfg.get("cache_len") or self.cfg.max_len
        zeros = lambda shape, dtype: jnp.zeros(shape, dtype)
        # Keys and values are kept heads-first, [B, H, S, K]: the attention's matmuls want
        # that layout, and transposing the whole cache every step cost 5x the step
        # (measured: 16 rows of GPT-2 small, 1024 cells, CPU).
        ck = self.variable("cache", "cached_key", zeros, (B, H, S, K), k_BxLxHxK.dtype)
        cv = self.variable("cache", "cached_value", zeros, (B, H, S, K), v_BxLxHxK.dtype)
        cpos = self.variable("cache", "positions", zeros, (B, S), jnp.int32)
        cseg = self.variable("cache", "segments", zeros, (B, S), jnp.int32)
        index = self.variable("cache", CACHE_INDEX, lambda: jnp.zeros((B,), jnp.int32))
        positions_BxL, segments_BxL = spec.q_positions_BxL, spec.q_segments_BxL
        if segments_BxL is None:
            segments_BxL = jnp.ones((B, L), jnp.int32)
        # Each row writes at its own index (a slot engine's rows hold different requests).
        def write(cache, new, axis):
            put = lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis)
            return jax.vmap(put)(cache, new, index.value)

        ck.value = write(ck.value, k_BxLxHxK.swapaxes(1, 2), 1)
        cv.value = write(cv.value, v_BxLxHxK.swapaxes(1, 2), 1)
        cpos.value = write(cpos.value, positions_BxL.astype(jnp.int32), 0)
        cseg.value = write(cseg.value, segments_BxL.astype(jnp.int32), 0)
        index.value = index.value + L
        # [B, S, H, K] as attend takes them: its own swap back to heads-first cancels this.
        return (ck.value.swapaxes(1, 2), cv.value.swapaxes(1, 2),
                MaskSpec(positions_BxL, cpos.value, None, cseg.value, spec.causal))


# ----------------------------------------------------------------------------- MLP and block


STACKED = "blocks"  # the scanned blocks' submodule (config.model.scan_layers)
CACHE_INDEX = "index"  # the KV cache's per-row write index [B] ([layers, B] when scanned)


def with_cache_index(cache, index_B: Array):
    """The KV cache (the "cache" collection) with every layer's write index set to
    index_B, one per row (broadcast over a scanned model's layer axis)."""
    def put(path, leaf):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return jnp.broadcast_to(index_B.astype(leaf.dtype), leaf.shape) if name == CACHE_INDEX else leaf
    return jax.tree_util.tree_map_with_path(put, cache)


def block_name(i: int) -> str:
    """The name of transformer block i in an unscanned model's parameter tree."""
    return f"block_{i}"


REMAT_POLICIES = {  # config.model.remat_policy -> what the backward pass keeps of a block
    "full": jax.checkpoint_policies.nothing_saveable,           # its input only
    "save_dots": jax.checkpoint_policies.checkpoint_dots,       # + every matmul output
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),                               # those, in host memory
}


def apply_blocks(cfg: Config, causal: bool, x_BxLxD: Array, positions_BxL: Array,
                 segments_BxL: Array | None, deterministic: bool, decode: bool = False) -> Array:
    """config.model.num_layers blocks; call it from a model's compact __call__. The
    attention mask spec is built here, once per forward pass, and shared by every block.

    Unrolled, the blocks are submodules block_0, block_1, ...; with config.model.scan_layers
    they are one submodule "blocks" run by jax.lax.scan, every parameter (and KV-cache
    entry) stacked along a leading "layers" axis, so compile time stays flat in depth.
    With config.model.remat each block is recomputed in the backward pass, keeping what
    config.model.remat_policy names (REMAT_POLICIES).
    On a mesh with pipeline stages (config.mesh.pipeline; setup.build sets
    pipeline_stages) the scanned blocks run as a pipeline (`Pipeline`), except when
    decoding, which runs them in order on the stage-split parameters.
    """
    spec = MaskSpec.of_self_attention(positions_BxL, segments_BxL, causal)
    block = ScanBlock if cfg.scan_layers else Block
    if cfg.remat:
        block = nn.remat(block, static_argnums=(3, 4),  # (self, x, spec, det, decode)
                         policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers and cfg.get("pipeline_stages", 1) > 1 and not decode:
        return Pipeline(cfg, block, name=STACKED)(x_BxLxD, spec, deterministic)
    if cfg.scan_layers:
        stack = scanned(block, cfg.num_layers)
        x_BxLxD, _ = stack(cfg, name=STACKED)(x_BxLxD, spec, deterministic, decode)
        return x_BxLxD if decode else row_major_on_tpu(cfg, x_BxLxD)
    for i in range(cfg.num_layers):
        x_BxLxD = block(cfg, name=block_name(i))(x_BxLxD, spec, deterministic, decode)
    return x_BxLxD


def row_major_on_tpu(cfg: Config, x_BxLxD: Array) -> Array:
    """The layers' scan output in the row-major layout (D minor), on TPU.

    There XLA lays the scan's carry out with L minor, and the head reads a D-minor copy
    of it. Without this constraint the step kept both through the logits' peak: the copy
    for the head's matmuls, the carry for the final norm's backward pass. With it, both
    read the one D-minor array: 1.3B at 37 sequences a chip on a v5e 8x8 needs 0.108 GB
    less, and 38 fit, as in MaxText (BENCHMARKS.md, "The scan's output, row-major").
    Elsewhere (CPU, GPU) row-major is the default layout, and this changes nothing."""
    if cfg.get("platform") != "tpu":
        return x_BxLxD
    return with_layout_constraint(x_BxLxD, Layout(major_to_minor=tuple(range(x_BxLxD.ndim))))


def scanned(block, length: int):
    """`block` (a ScanBlock class, maybe remat'd) run `length` times by nn.scan, every
    parameter and KV-cache entry stacked on a leading "layers" axis."""
    return nn.scan(block, length=length, variable_axes={"params": 0, "cache": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                   metadata_params={nn.PARTITION_NAME: "layers"})


def schedule_length(stages: int, microbatches: int, repeats: int = 1) -> int:
    """Iterations of the pipeline (`Pipeline`): microbatch m enters stage 0 for its r-th
    round at iteration r*P + m, P = max(M, S) (a microbatch cannot re-enter before it has
    left the last stage), and leaves the last stage S - 1 iterations later."""
    return (repeats - 1) * max(microbatches, stages) + microbatches + stages - 1


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The share of the stages' iterations that are idle: each stage works R*M of them.
    GPipe (R=1): (S-1)/(M+S-1); circular with M >= S: (S-1)/(R*M+S-1)."""
    return 1 - repeats * microbatches / schedule_length(stages, microbatches, repeats)


class Pipeline(nn.Module):
    """The scanned blocks as a pipeline over the mesh's "stage" axis: GPipe, or a circular
    schedule with config.mesh.pipeline_repeats = R > 1.

    The parameters are the scanned stack's own, [L, ...] under "blocks" (init runs that
    stack, so a seed gives the same model with or without stages, and a checkpoint
    restores onto any stage count: only the layer axis' sharding differs). The L layers
    form S*R groups of C = L/(S*R) consecutive layers; group g runs on stage g mod S, in
    round g div S. GPipe (R=1): stage s holds layers s*L/S ... (s+1)*L/S - 1, exactly its
    part of the stored layer axis, so the view [S, 1, C, ...] moves nothing. Circular:
    stage s holds groups s, s+S, ...: the view [S, R, C, ...] is an all-to-all of the
    blocks' parameters (and of their gradients in the backward pass) each step.

    The batch is cut into M microbatches (rows i, i+M, ... as the train step's
    accumulation cuts them); a buffer [S, B/M, T, D] holds what each stage works on. Every
    iteration all stages run one group of layers at once (a vmap over the stage dim with
    the stage's own inputs: each device computes its stage, nothing else), then the buffer
    moves one stage on (a roll of the stage-split dim: a collective permute, the only
    traffic between stages in the loop). Stage 0 keeps what the roll brings it from the
    last stage, per microbatch, and takes the next microbatch: new, or back for its next
    round; at the end it holds the results. `schedule_length` iterations."""
    cfg: Config
    block: type  # ScanBlock, maybe remat'd

    @nn.compact
    def __call__(self, x_BxTxD: Array, spec: MaskSpec, deterministic: bool) -> Array:
        cfg = self.cfg
        whole = scanned(self.block, cfg.num_layers)(cfg)
        nn.share_scope(self, whole)  # its parameters are this module's: "blocks/..."
        if self.is_initializing():
            return whole(x_BxTxD, spec, deterministic, False)[0]
        S, R, B = cfg.pipeline_stages, cfg.get("pipeline_repeats", 1), x_BxTxD.shape[0]
        # config.train.microbatches; a batch they do not divide (scoring) runs in fewer
        M = math.gcd(B, cfg.pipeline_microbatches)
        P, C = max(M, S), cfg.num_layers // (S * R)
        params_SxRxC = jax.tree_util.tree_map(
            lambda p: constrain_stages(jnp.swapaxes(p.reshape(R, S, C, *p.shape[1:]), 0, 1)),
            self.variables["params"])
        group = scanned(self.block, C)(cfg)
        dropout = not deterministic and (cfg.dropout > 0 or cfg.attention_dropout > 0)
        rng = self.make_rng("dropout") if dropout else None

        microbatches = lambda a: einops.rearrange(a, "(n m) ... -> m n ...", m=M)  # noqa: E731
        x_MxNxTxD = microbatches(x_BxTxD)
        spec_M = jax.tree_util.tree_map(microbatches, spec)

        def receive(t, in_NxTxD, held_MxNxTxD, s):
            """What stage s holds at iteration t: at stage 0, the output of the last stage
            (brought by the roll; microbatch round t - S) is kept, per microbatch, for its
            next round and as the result."""
            left = t - S
            arrived = (s == 0) & (left >= 0) & (left % P < M)
            i = left % P % M
            return held_MxNxTxD.at[i].set(jnp.where(arrived, in_NxTxD, held_MxNxTxD[i]))

        def stage_step(t, params_RxC, new_MxNxTxD, in_NxTxD, held_MxNxTxD, s, key):
            """Iteration t of stage s: (its output, what it holds). `in` is what the roll
            brought it from the stage before."""
            held_MxNxTxD = receive(t, in_NxTxD, held_MxNxTxD, s)
            # Stage 0 takes microbatch m for round r at t = r*P + m: new in round 0, else
            # held; t % P >= M: nothing (a real microbatch whose result is never kept, so
            # idle stages compute on finite values). Stage s works on what stage 0 took s
            # iterations ago.
            m, r = t % P % M, t // P
            x_NxTxD = jnp.where(s == 0, jnp.where(r == 0, new_MxNxTxD[m], held_MxNxTxD[m]),
                                in_NxTxD)
            k = t - s
            spec_N = jax.tree_util.tree_map(lambda a: a[k % P % M], spec_M)
            params = jax.tree_util.tree_map(lambda p: p[jnp.clip(k // P, 0, R - 1)], params_RxC)
            y_NxTxD = group.apply({"params": params}, x_NxTxD, spec_N, deterministic, False,
                                  rngs={"dropout": key} if dropout else {})[0]
            return y_NxTxD, held_MxNxTxD

        # Each stage's step runs on its own devices (vmap over the stage-split dim); the
        # only traffic between stages is the roll, and stage 0's results at the end.
        stages = jax.vmap(stage_step, in_axes=(None, 0, 0, 0, 0, 0, 0), spmd_axis_name="stage")
        # The microbatches on every stage (a copy per stage, where a replicated array's
        # gradient would be summed over the stages every iteration; now once, at the end)
        x_SxMxNxTxD = constrain_stages(jnp.broadcast_to(x_MxNxTxD, (S, *x_MxNxTxD.shape)))
        slots = ("stage", "batch", "length", "embed")

        def iteration(carry, t):
            state_SxNxTxD, held_SxMxNxTxD = carry
            keys_S = jax.random.split(jax.random.fold_in(rng, t), S) if dropout else jnp.zeros(S)
            y_SxNxTxD, held_SxMxNxTxD = stages(t, params_SxRxC, x_SxMxNxTxD,
                                               constrain(state_SxNxTxD, slots), held_SxMxNxTxD,
                                               jnp.arange(S), keys_S)
            return (jnp.roll(y_SxNxTxD, 1, axis=0), held_SxMxNxTxD), None

        iterations = schedule_length(S, M, R)
        init = (jnp.zeros((S, *x_MxNxTxD.shape[1:]), x_BxTxD.dtype),
                constrain_stages(jnp.zeros((S, *x_MxNxTxD.shape), x_BxTxD.dtype)))
        carry, _ = jax.lax.scan(iteration, init, jnp.arange(iterations))
        # The last microbatch reaches stage 0 with the final roll; then stage 0 holds every
        # result, and sends them to all stages once.
        held_SxMxNxTxD = jax.vmap(receive, in_axes=(None, 0, 0, 0), spmd_axis_name="stage")(
            iterations, *carry, jnp.arange(S))
        out_BxTxD = einops.rearrange(held_SxMxNxTxD[0], "m n ... -> (n m) ...")
        return constrain(out_BxTxD, ("batch", "length", "embed"))


def constrain_stages(x_SxN: Array) -> Array:
    """The leading dim split as the logical rules split "stage", the others left to XLA's
    sharding propagation (a no-op outside a mesh/rules context, as `constrain`)."""
    axes = dict(nn.get_logical_axis_rules()).get("stage")
    if axes is None or jax.sharding.get_abstract_mesh().empty:
        return x_SxN
    rest = (jax.sharding.PartitionSpec.UNCONSTRAINED,) * (x_SxN.ndim - 1)
    return jax.lax.with_sharding_constraint(x_SxN, jax.sharding.PartitionSpec(axes, *rest))


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

    @nn.compact
    def __call__(self, x_BxLxD: Array, spec: MaskSpec, deterministic: bool,
                 decode: bool = False) -> Array:
        # deterministic/decode are positional so nn.remat can mark them static.
        cfg = self.cfg
        pre = cfg.norm_position == "pre"
        ln_attn, ln_mlp = LayerNorm(cfg, name="ln_attn"), LayerNorm(cfg, name="ln_mlp")
        h = Attention(cfg, name="attn")(ln_attn(x_BxLxD) if pre else x_BxLxD, spec,
                                        deterministic=deterministic, decode=decode)
        x_BxLxD = x_BxLxD + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        if not pre:
            x_BxLxD = ln_attn(x_BxLxD)
        h = Mlp(cfg, name="mlp")(ln_mlp(x_BxLxD) if pre else x_BxLxD, deterministic=deterministic)
        x_BxLxD = x_BxLxD + h
        return constrain(x_BxLxD if pre else ln_mlp(x_BxLxD), ("batch", "length", "embed"))


class ScanBlock(Block):
    """A Block as the body of nn.scan: (carry, per-layer output) = (x, None)."""

    def __call__(self, x_BxLxD: Array, spec: MaskSpec, deterministic: bool,
                 decode: bool = False) -> tuple[Array, None]:
        return super().__call__(x_BxLxD, spec, deterministic, decode), None


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
