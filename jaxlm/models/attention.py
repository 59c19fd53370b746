"""Attention behind one function, `attend(q, k, v, spec, impl)`, whatever kernel runs it.

The model builds a `MaskSpec` once per forward pass (causal flag, positions and segment
ids of queries and keys); only the XLA path turns it into a dense [B, 1, L, S] mask. The
fused kernels read the spec directly:

    xla     plain einsums and a softmax in fp32; every backend, attention dropout, decoding.
            Causal self-attention skips the key blocks wholly after each query block.
    cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention on
            NVIDIA GPUs, in our [B, L, H, K] layout; bf16/fp16 only; causal masks natively,
            packed segments as a boolean mask.
    splash  Pallas splash attention on TPU (jax.experimental.pallas.ops.tpu), one kernel
            per device under shard_map: batch and heads split as the logical rules say,
            the sequence whole. Causal masks and segment ids natively.
    auto    the fastest of those the backend and the config allow (`resolve`).

Decoding against the KV cache (one query row) always takes the XLA path. Positions: the
kernels' causal mask compares indices, which equals comparing positions for a training
pass (positions rise by one inside each packed document). Rows of padding (segment 0) may
differ between paths; no loss or score reads them.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.errors import ConfigError

Array = jax.Array

IMPLS = ("auto", "xla", "cudnn", "splash")
_SPLASH_BLOCK = 128  # sequence lengths must be multiples of this (TPU lane width)


@flax.struct.dataclass
class MaskSpec:
    """Who may attend to whom: causal order and packed-document segments (0 = padding)."""
    q_positions_BxL: Array
    kv_positions_BxS: Array
    q_segments_BxL: Array | None = None
    kv_segments_BxS: Array | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=True)
    self_attention: bool = flax.struct.field(pytree_node=False, default=False)  # keys = queries

    @classmethod
    def of_self_attention(cls, positions_BxL: Array, segments_BxL: Array | None,
                          causal: bool) -> MaskSpec:
        return cls(positions_BxL, positions_BxL, segments_BxL, segments_BxL, causal, True)

    def dense(self) -> Array:
        """Boolean mask [B, 1, L, S]: True where query l may attend to key s. Causal masks
        compare absolute positions; segment ids keep attention inside one packed document
        and away from padding."""
        q, kv = self.q_positions_BxL, self.kv_positions_BxS
        mask = jnp.ones((q.shape[0], q.shape[1], kv.shape[1]), bool)
        if self.causal:
            mask &= q[:, :, None] >= kv[:, None, :]
        if self.kv_segments_BxS is not None:
            mask &= (self.kv_segments_BxS != 0)[:, None, :]
            if self.q_segments_BxL is not None:
                mask &= self.q_segments_BxL[:, :, None] == self.kv_segments_BxS[:, None, :]
        return mask[:, None]


def _unfit(impl: str, cfg, platform: str) -> str | None:
    """Why kernel `impl` cannot run this config on `platform`, or None if it can."""
    dtype, K = jnp.dtype(cfg.dtype), cfg.d_model // cfg.num_heads
    if impl == "xla":
        return None
    if impl not in IMPLS:
        return f"is not one of {IMPLS}"
    if impl == "cudnn" and platform != "gpu":
        return f"needs an NVIDIA GPU; this backend is {platform} (use 'xla' or 'auto')"
    if impl == "splash" and platform != "tpu" and not cfg.get("attention_interpret", False):
        return (f"needs a TPU; this backend is {platform} (use 'xla' or 'auto', or "
                "config.model.attention_interpret=true to run the kernel in Pallas' interpret "
                "mode, slowly, for debugging)")
    if cfg.attention_dropout > 0:
        return (f"cannot drop attention probabilities (config.model.attention_dropout="
                f"{cfg.attention_dropout}); set it to 0 or use attention_impl='xla'")
    if impl == "cudnn" and dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs config.model.dtype bfloat16 or float16, not {dtype} (use 'xla' for fp32)"
    if impl == "cudnn" and (K % 8 or K > 128):
        return (f"needs a head dim (d_model / num_heads) <= 128 and a multiple of 8, not {K} "
                "(cuDNN)")
    return None


def resolve(cfg, platform: str, *, log=None) -> str:
    """config.model.attention_impl checked against the backend and the config; "auto"
    becomes the best allowed (cuDNN on GPU, splash on TPU, else xla). ConfigError (naming
    the field and what would work) before anything compiles."""
    impl = cfg.attention_impl
    if impl == "auto":
        best = {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
        why = _unfit(best, cfg, platform)
        if log and why:
            log.info("attention_impl=auto: xla (%s %s)", best, why)
        return "xla" if why else best
    why = _unfit(impl, cfg, platform)
    if why:
        raise ConfigError(f"config.model.attention_impl={impl!r} {why}")
    return impl


def check_seq_len(impl: str, seq_len: int) -> None:
    """Sequence lengths the kernel can tile (called where the training length is known)."""
    if impl == "splash" and seq_len % _SPLASH_BLOCK:
        raise ConfigError(f"config.model.attention_impl='splash' needs config.data.seq_len a "
                          f"multiple of {_SPLASH_BLOCK}, not {seq_len}")


def attend(q_BxLxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array, spec: MaskSpec,
           impl: str = "xla", *, interpret: bool = False, dropout_rate: float = 0.0,
           dropout_rng: Array | None = None) -> Array:
    """softmax(q k^T / sqrt(K), masked by `spec`) v, [B, L, H, K], by kernel `impl`
    (already resolved: xla, cudnn or splash). Lengths splash cannot tile (evaluation
    buckets) take the XLA path; training lengths are checked by `check_seq_len`."""
    if impl == "cudnn":
        return _cudnn(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, spec)
    if impl == "splash" and q_BxLxHxK.shape[1] % _SPLASH_BLOCK == 0:
        return _splash(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, spec, interpret)
    blocks = causal_blocks(q_BxLxHxK.shape[1]) if spec.causal and spec.self_attention else 1
    return _xla(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, spec.dense(), dropout_rate, dropout_rng, blocks)


def causal_blocks(L: int) -> int:
    """How many query blocks the XLA path splits causal self-attention of length L into: up
    to 4, of at least 64 rows (4 measured fastest at L=256 on CPU; shorter rows gain
    nothing), and 1 (no split) when the length axis is sharded, which slicing would reshard."""
    length_axes = nn.logical_to_mesh_axes(("length",))[0]
    if _axis_size(jax.sharding.get_abstract_mesh(), length_axes) > 1:
        return 1
    for n in (4, 2):
        if L % n == 0 and L // n >= 64:
            return n
    return 1


def _xla(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xLxS, dropout_rate, dropout_rng, blocks=1):
    """The masked softmax in `blocks` query blocks, [B, L, H, K] in and out; 1: the full
    square. Query block i (of n > 1, causal self-attention) attends keys 0 .. its own end
    only, skipping the key blocks wholly in its future: (n + 1) / 2n of the logits (5/8 at
    n=4). Exact when every key after a query is masked, i.e. positions increase along a
    row within each segment, as in every jaxlm batch (packed or not). Heads move in front
    once, so that each block is a slice, not a transpose."""
    L, S = q_BxLxHxK.shape[1], k_BxSxHxK.shape[1]
    q_BxHxLxK, k_BxHxSxK, v_BxHxSxK = (x.swapaxes(1, 2)
                                       for x in (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK))
    rows, outs_BxHxRxK = L // blocks, []
    for i in range(blocks):
        rows_i, end = slice(i * rows, (i + 1) * rows), (i + 1) * rows if i < blocks - 1 else S
        rng = None if dropout_rng is None or blocks == 1 else jax.random.fold_in(dropout_rng, i)
        outs_BxHxRxK.append(_softmax_attention(
            q_BxHxLxK[:, :, rows_i], k_BxHxSxK[:, :, :end], v_BxHxSxK[:, :, :end],
            mask_Bx1xLxS[:, :, rows_i, :end], dropout_rate, rng))
    return jnp.concatenate(outs_BxHxRxK, axis=2).swapaxes(1, 2)


def _softmax_attention(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK, mask_Bx1xLxS, dropout_rate, dropout_rng):
    """softmax(q k^T / sqrt(K) + mask) v, heads in front. Logits and softmax in fp32 whatever
    the compute dtype: bf16 has too few mantissa bits for the exp/sum of a softmax over
    long rows."""
    K = q_BxHxLxK.shape[-1]
    acc = jnp.promote_types(q_BxHxLxK.dtype, jnp.float32)
    logits_BxHxLxS = jnp.einsum("bhlk,bhsk->bhls", q_BxHxLxK, k_BxHxSxK,
                                preferred_element_type=acc) / jnp.sqrt(K).astype(acc)
    # An additive mask (0 or the lowest float), not a select: XLA:CPU then fuses the
    # matmul, mask and softmax statistics into one library call (2x faster on CPU).
    bias_Bx1xLxS = jnp.where(mask_Bx1xLxS, 0.0, jnp.finfo(acc).min).astype(acc)
    probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS + bias_Bx1xLxS, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BxHxLxS.shape)
        probs_BxHxLxS = jnp.where(keep, probs_BxHxLxS / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhls,bhsk->bhlk", probs_BxHxLxS.astype(v_BxHxSxK.dtype), v_BxHxSxK)


def _cudnn(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, spec: MaskSpec):
    """cuDNN flash attention: causal natively; segments (packing, padding) as a mask."""
    mask = None
    if spec.kv_segments_BxS is not None:
        mask = MaskSpec(spec.q_positions_BxL, spec.kv_positions_BxS, spec.q_segments_BxL,
                        spec.kv_segments_BxS, causal=False).dense()
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask,
                                        is_causal=spec.causal, implementation="cudnn")


def _splash_kernel(length: int, heads: int, causal: bool, interpret: bool):
    """One device's splash kernel for `heads` heads of `length` tokens. Built per call, not
    cached: the kernel holds arrays of the trace it was made in (a cached one leaks tracers
    into the next trace)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk, splash_attention_mask as sm)
    block = min(512, length)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    one = (sm.CausalMask if causal else sm.FullMask)((length, length))
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, spec: MaskSpec, interpret: bool):
    """Splash attention, one kernel per device: shard_map over the current mesh with batch
    and heads split as the logical rules split them, the sequence whole on every device."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    B, L, H, K = q_BxLxHxK.shape
    seq = nn.logical_to_mesh_axes(("batch", None, "heads", None))
    mesh = jax.sharding.get_abstract_mesh()
    kernel = _splash_kernel(L, H // _axis_size(mesh, seq[2]), spec.causal, interpret)
    segments = spec.q_segments_BxL if spec.q_segments_BxL is not None else jnp.ones((B, L), jnp.int32)

    def local(q, k, v, seg):  # this device's rows and heads: [b, L, h, K]
        scale = 1.0 / K ** 0.5  # a Python float: np.sqrt's float64 turned bf16 q into fp32
        one_row = lambda q, k, v, s: kernel(  # noqa: E731  (kernel takes [h, L, K])
            (q * scale).swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
            segment_ids=sk.SegmentIds(q=s, kv=s)).swapaxes(0, 1)
        return jax.vmap(one_row)(q, k, v, seg)

    qkv_spec = jax.sharding.PartitionSpec(seq[0], None, seq[2], None)
    seg_spec = jax.sharding.PartitionSpec(seq[0], None)
    if mesh.empty:
        return local(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, segments)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,),
                         out_specs=qkv_spec, check_vma=False)(
        q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, segments)


def _axis_size(mesh, axes) -> int:
    if mesh.empty or axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return functools.reduce(lambda n, a: n * mesh.shape[a], axes, 1)
