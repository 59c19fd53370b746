"""Attention kernels behind layers.attend: every path equals the XLA path (Pallas' splash
kernel in interpret mode on CPU; cuDNN only where an NVIDIA GPU is), and choices a backend
or config cannot run are refused, naming the field, before anything compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fresh_step, tiny_config

from jaxlm.config import validate
from jaxlm.errors import ConfigError
from jaxlm.models.attention import MaskSpec, attend, resolve
from jaxlm.setup import build

B, L, H, K = 2, 128, 2, 16
# Row 0 packs two documents and padding, row 1 is one document.
SEGMENTS = np.array([[1] * 50 + [2] * 60 + [0] * 18, [1] * L], np.int32)


def qkv(seed=0):
    return [jax.random.normal(k, (B, L, H, K)) for k in jax.random.split(jax.random.PRNGKey(seed), 3)]


def positions():
    """Positions restart in each packed document, as the packer writes them."""
    pos = np.zeros_like(SEGMENTS)
    for b in range(B):
        for s in set(SEGMENTS[b]):
            idx = np.flatnonzero(SEGMENTS[b] == s)
            pos[b, idx] = np.arange(len(idx))
    return jnp.asarray(pos)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_splash_equals_xla_values_and_gradients(causal):
    spec = MaskSpec.of_self_attention(positions(), jnp.asarray(SEGMENTS), causal)
    real = jnp.asarray(SEGMENTS != 0)[:, :, None, None]  # padding rows may differ

    def loss(impl, q, k, v):
        out = attend(q, k, v, spec, impl, interpret=True)
        return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

    (ref, ref_out), ref_grads = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2),
                                                   has_aux=True)(*qkv())
    (got, got_out), got_grads = jax.jit(jax.value_and_grad(
        lambda *a: loss("splash", *a), argnums=(0, 1, 2), has_aux=True))(*qkv())
    np.testing.assert_allclose(np.where(real, got_out, 0), np.where(real, ref_out, 0), atol=2e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5)


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_attention_keeps_bf16_inputs_in_bf16(impl):
    """bf16 queries, keys and values give a bf16 output. The splash path once scaled the
    queries by a NumPy float64, which made them, and the kernel's output and residuals,
    fp32: two to four extra [B, L, H, K] fp32 buffers a layer on TPU (BENCHMARKS.md, fit
    table)."""
    spec = MaskSpec.of_self_attention(positions(), jnp.asarray(SEGMENTS), True)
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv())
    out = jax.eval_shape(lambda q, k, v: attend(q, k, v, spec, impl, interpret=True), q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape


@pytest.mark.parametrize("length", [128, 256])
def test_causal_blocks_equal_the_full_square(length):
    """The XLA path skips key blocks wholly after a query block (2 blocks at 128, 4 at 256):
    values and q/k/v gradients equal the full masked square's, on packed rows with
    padding (padding rows attend nothing; their outputs are not compared)."""
    from jaxlm.models.attention import _xla, causal_blocks
    assert causal_blocks(length) == length // 64
    a, b = length // 3, length // 2
    segments = np.array([[1] * a + [2] * b + [0] * (length - a - b), [1] * length], np.int32)
    pos = np.zeros_like(segments)
    for b, s in np.argwhere(np.ones((2, 3), bool)):
        pos[b, segments[b] == s] = np.arange((segments[b] == s).sum())
    spec = MaskSpec.of_self_attention(jnp.asarray(pos), jnp.asarray(segments), causal=True)
    real = jnp.asarray(segments != 0)[:, :, None, None]
    q, k, v = [jax.random.normal(key, (2, length, H, K))
               for key in jax.random.split(jax.random.PRNGKey(1), 3)]

    def loss(blocked, q, k, v):
        out = (attend(q, k, v, spec, "xla") if blocked
               else _xla(q, k, v, spec.dense(), 0.0, None))
        return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

    grad = lambda blocked: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda *a: loss(blocked, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (ref, ref_out), ref_grads = grad(False)
    (got, got_out), got_grads = grad(True)
    np.testing.assert_allclose(np.where(real, got_out, 0), np.where(real, ref_out, 0), atol=1e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_splash_under_sharded_heads_and_batch_trains_like_xla():
    """A packed GPT at seq 128 on an fsdp x tensor mesh (rows split 2-way, heads 4-way, so
    the kernel runs under shard_map on one head per device) takes the same step as the XLA
    path on one device."""
    from conftest import random_batch

    def config(impl, mesh):
        cfg = tiny_config(max_len=128, vocab_size=264, attention_impl=impl,
                          attention_interpret=True)
        cfg.data.update(seq_len=128, packing=True)
        cfg.train.batch_size = 4
        cfg.mesh.update(strategy="fsdp_tp", data=1, fsdp=mesh[0], sequence=1, tensor=mesh[1])
        return cfg

    batch = random_batch(config("xla", (1, 1)))
    batch["segments"][0, 70:] = 2     # two documents and padding in row 0
    batch["segments"][0, 120:] = 0
    batch["positions"][0, 70:] = np.arange(58)
    batch["weights"][0, 120:] = 0

    def one_step(cfg, devices):
        state, run = fresh_step(cfg, devices)
        state, metrics = run(state, run.place_batch(batch), jax.random.PRNGKey(0))
        return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.params)

    ref = one_step(config("xla", (1, 1)), jax.devices()[:1])
    got = one_step(config("splash", (2, 4)), jax.devices())
    np.testing.assert_allclose(got[:2], ref[:2], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           got[2], ref[2])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an "
                    "NVIDIA GPU (this backend: %s)" % jax.default_backend())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cudnn_equals_xla(causal):
    """Outputs and q/k/v gradients (what training uses) of cuDNN flash attention equal the
    XLA path's on packed rows with padding, in bf16: within 2e-2 of the values, and within
    2% of the gradients' largest entry (the two sum the softmax in different orders)."""
    spec = MaskSpec.of_self_attention(positions(), jnp.asarray(SEGMENTS), causal)
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv())
    real = jnp.asarray(SEGMENTS != 0)[:, :, None, None]
    weights = jax.random.normal(jax.random.PRNGKey(7), q.shape)  # a loss that reads every row

    def run(impl):
        def loss(q, k, v):
            out = attend(q, k, v, spec, impl).astype(jnp.float32)
            return jnp.sum(jnp.where(real, out * weights, 0.0)), out
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    got_grads, got = run("cudnn")
    ref_grads, ref = run("xla")
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), atol=2e-2)
    for g, r in zip(got_grads, ref_grads):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, r, atol=2e-2 * np.abs(r).max())


def model_cfg(**kw):
    cfg = tiny_config(**kw)
    validate(cfg)
    return cfg.model


@pytest.mark.parametrize("platform,kw,chosen", [
    ("cpu", {}, "xla"),
    ("gpu", {}, "xla"),                                   # fp32: cuDNN flash needs bf16/fp16
    ("gpu", {"dtype": "bfloat16"}, "cudnn"),
    ("gpu", {"dtype": "bfloat16", "d_model": 256, "num_heads": 1, "mlp_dim": 64}, "xla"),  # K=256
    ("tpu", {}, "splash"),
    ("tpu", {"attention_dropout": 0.1}, "xla"),
])
def test_auto_picks_what_the_backend_and_config_allow(platform, kw, chosen):
    assert resolve(model_cfg(attention_impl="auto", **kw), platform) == chosen


@pytest.mark.parametrize("kw,platform,message", [
    ({"attention_impl": "cudnn", "dtype": "bfloat16"}, "cpu", "needs an NVIDIA GPU"),
    ({"attention_impl": "cudnn"}, "gpu", "bfloat16 or float16"),
    ({"attention_impl": "cudnn", "dtype": "bfloat16", "d_model": 36, "num_heads": 3}, "gpu",
     "head dim"),
    ({"attention_impl": "splash"}, "cpu", "needs a TPU"),
    ({"attention_impl": "splash"}, "gpu", "needs a TPU"),
    ({"attention_impl": "splash", "attention_dropout": 0.1}, "tpu", "attention_dropout"),
])
def test_impossible_kernels_are_refused_naming_the_field(kw, platform, message):
    with pytest.raises(ConfigError, match=message) as e:
        resolve(model_cfg(**kw), platform)
    assert "config.model.attention_impl" in str(e.value)


def test_setup_refuses_before_compiling():
    cfg = tiny_config(attention_impl="cudnn", dtype="bfloat16")
    with pytest.raises(ConfigError, match="config.model.attention_impl='cudnn' needs an NVIDIA"):
        build(cfg)
    cfg = tiny_config(attention_impl="splash", attention_interpret=True)  # seq_len 32
    with pytest.raises(ConfigError, match="config.data.seq_len a multiple of 128"):
        build(cfg)
