"""Sharding strategies on 8 fake CPU devices: same maths as one device, and the shardings
really are what the strategy says."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from jaxlm.config import ConfigError
from jaxlm.train import loop

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=8")

MESHES = {  # strategy -> (data, fsdp, tensor)
    "dp": (8, 1, 1),
    "fsdp": (1, 8, 1),
    "tp": (2, 1, 4),
    "fsdp_tp": (1, 2, 4),
}


def sharded_config(strategy, shape):
    cfg = tiny_config(vocab_size=264)  # divisible by the tensor axis
    cfg.mesh.update(strategy=strategy, data=shape[0], fsdp=shape[1], tensor=shape[2])
    return cfg


def run_steps(cfg, devices, batches):
    setup = loop.build(cfg, devices)
    state, run = setup.init_state(), setup.compile_step()
    losses = []
    for b in batches:
        state, m = run(state, b, jax.random.PRNGKey(1))
        losses.append(float(m["loss"]))
    return state, losses


def make_batches(cfg, n=2):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        t = rng.integers(0, 256, (cfg.train.batch_size, cfg.data.seq_len + 1)).astype(np.int32)
        out.append({"inputs": t[:, :-1], "targets": t[:, 1:],
                    "weights": np.ones(t[:, 1:].shape, np.float32)})
    return out


@pytest.mark.parametrize("strategy", list(MESHES))
def test_strategy_matches_single_device(strategy):
    cfg = sharded_config(strategy, MESHES[strategy])
    cfg.model.dropout = 0.0
    batches = make_batches(cfg)
    one = tiny_config(vocab_size=264)
    ref_state, ref_losses = run_steps(one, jax.devices()[:1], batches)
    state, losses = run_steps(cfg, jax.devices(), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(state.params), jax.device_get(ref_state.params))


def test_fsdp_shards_params_and_adam_moments_eightfold():
    cfg = sharded_config("fsdp", MESHES["fsdp"])
    state, _ = run_steps(cfg, jax.devices(), make_batches(cfg, 1))
    mu = state.opt_state[1][0].mu  # chain(clip, adamw): adamw's ScaleByAdamState
    for path, p in jax.tree_util.tree_leaves_with_path(state.params):
        m = mu
        for k in path:
            m = m[k.key]
        assert m.sharding == p.sharding, jax.tree_util.keystr(path)
        if path[-1].key in ("kernel", "embedding"):  # every weight matrix: each device holds 1/8
            shard = p.addressable_shards[0].data
            assert shard.size * 8 == p.size, (jax.tree_util.keystr(path), shard.shape, p.shape)


def test_tp_splits_heads_and_mlp():
    cfg = sharded_config("tp", MESHES["tp"])
    state, _ = run_steps(cfg, jax.devices(), make_batches(cfg, 1))
    q = state.params["block_0"]["attn"]["query"]["kernel"]   # (D, H, K)
    fc = state.params["block_0"]["mlp"]["fc_in"]["kernel"]   # (D, F)
    assert q.addressable_shards[0].data.shape == (32, 1, 8)
    assert fc.addressable_shards[0].data.shape == (32, 16)


def test_indivisible_dimension_is_named():
    cfg = sharded_config("tp", MESHES["tp"])
    cfg.model.vocab_size = 258
    with pytest.raises(ConfigError, match=r"vocab=258.*strategy='tp'.*\('tensor',\) of total size 4"):
        loop.build(cfg)


def test_pmap_path_matches_jit_path():
    """config.parallelism="pmap" (replicated params, psum of gradients over 8 devices) takes
    the same steps as the jit path on one device."""
    cfg = tiny_config(vocab_size=264)
    batches = make_batches(cfg)
    ref_state, ref_losses = run_steps(cfg, jax.devices()[:1], batches)

    cfg.parallelism = "pmap"
    setup = loop.build(cfg)
    state, run = setup.to_device(setup.init_state()), setup.compile_step()
    losses = []
    for b in batches:
        state, m = run(state, setup.place_batch(b), jax.random.PRNGKey(1))
        losses.append(float(m["loss"]))
    state = setup.from_device(state)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(state.params), jax.device_get(ref_state.params))
