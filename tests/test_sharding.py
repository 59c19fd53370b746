"""Sharding strategies on 8 fake CPU devices: same maths as one device, and the shardings
really are what the strategy says."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from conftest import fresh_step, random_batch, tiny_bert_config, tiny_config

from jaxlm import models, sharding
from jaxlm.errors import ConfigError
from jaxlm.setup import build

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=8")

MESHES = {  # case -> (strategy, (data, fsdp, sequence, tensor))
    "dp": ("dp", (8, 1, 1, 1)),
    "fsdp": ("fsdp", (1, 8, 1, 1)),
    "tp": ("tp", (2, 1, 1, 4)),
    "fsdp_tp": ("fsdp_tp", (1, 2, 1, 4)),
    "dp_sequence": ("dp", (2, 1, 4, 1)),
    "fsdp_sequence_tp": ("fsdp_tp", (1, 2, 2, 2)),
}


def sharded_config(case):
    strategy, (data, fsdp, sequence, tensor) = MESHES[case]
    cfg = tiny_config(vocab_size=264)  # divisible by the tensor axis
    cfg.mesh.update(strategy=strategy, data=data, fsdp=fsdp, sequence=sequence, tensor=tensor)
    return cfg


def run_steps(cfg, devices, batches):
    state, run = fresh_step(cfg, devices)
    losses = []
    for b in batches:
        state, m = run(state, run.place_batch(b), jax.random.PRNGKey(1))
        losses.append(float(m["loss"]))
    return run.global_state(state), losses


def make_batches(cfg, n=2):
    return [random_batch(cfg, seed) for seed in range(n)]


@pytest.mark.parametrize("case", list(MESHES))
def test_strategy_matches_single_device(case):
    cfg = sharded_config(case)
    cfg.model.dropout = 0.0
    batches = make_batches(cfg)
    one = tiny_config(vocab_size=264)
    ref_state, ref_losses = run_steps(one, jax.devices()[:1], batches)
    state, losses = run_steps(cfg, jax.devices(), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(state.params), jax.device_get(ref_state.params))


def bert_config(pairs: bool):
    cfg = tiny_bert_config(vocab_size=264)
    cfg.train.update(sentence_pairs=pairs, next_sentence=pairs)
    return cfg


@functools.cache
def bert_reference(pairs: bool):
    """(batches, final single-device state, losses), shared by the BERT cases."""
    batches = make_batches(bert_config(pairs))
    return (batches, *run_steps(bert_config(pairs), jax.devices()[:1], batches))


@pytest.mark.parametrize("case", list(MESHES))
def test_bert_strategy_matches_single_device(case):
    """The encoder (bidirectional, post-LN, token types, MLM head) under the same rules;
    the sequence-parallel cases pretrain on sentence pairs with next-sentence prediction
    (pooler, NSP head, token types)."""
    strategy, (data, fsdp, sequence, tensor) = MESHES[case]
    pairs = sequence > 1
    cfg = bert_config(pairs)
    cfg.mesh.update(strategy=strategy, data=data, fsdp=fsdp, sequence=sequence, tensor=tensor)
    batches, ref_state, ref_losses = bert_reference(pairs)
    state, losses = run_steps(cfg, jax.devices(), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(state.params), jax.device_get(ref_state.params))


@pytest.mark.parametrize("case", ["fsdp", "fsdp_tp"])
def test_whole_table_lookup_matches_single_device(case):
    """embed_lookup=gather_whole (the table all-gathered, rows taken locally) under FSDP and
    FSDP+TP: the losses and parameters of one device."""
    cfg = sharded_config(case)
    cfg.model.update(dropout=0.0, embed_lookup="gather_whole")
    batches = make_batches(cfg)
    ref_state, ref_losses = run_steps(tiny_config(vocab_size=264), jax.devices()[:1], batches)
    state, losses = run_steps(cfg, jax.devices(), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(state.params), jax.device_get(ref_state.params))


def test_fsdp_shards_params_and_adam_moments_eightfold():
    cfg = sharded_config("fsdp")
    state, _ = run_steps(cfg, jax.devices(), make_batches(cfg, 1))
    mu = state.opt_state[0].mu  # adamw's ScaleByAdamState
    for path, p in jax.tree_util.tree_leaves_with_path(state.params):
        m = mu
        for k in path:
            m = m[k.key]
        assert m.sharding == p.sharding, jax.tree_util.keystr(path)
        if path[-1].key in ("kernel", "embedding"):  # every weight matrix: each device holds 1/8
            shard = p.addressable_shards[0].data
            assert shard.size * 8 == p.size, (jax.tree_util.keystr(path), shard.shape, p.shape)


def test_tp_splits_heads_and_mlp():
    cfg = sharded_config("tp")
    state, _ = run_steps(cfg, jax.devices(), make_batches(cfg, 1))
    block = models.block_params(state.params, 0)
    qkv = block["attn"]["qkv"]["kernel"]   # (D, 3, H*K), H=4 heads of K=8
    fc = block["mlp"]["fc_in"]["kernel"]   # (D, F)
    assert qkv.addressable_shards[0].data.shape == (32, 3, 8)  # q, k, v of one whole head
    assert fc.addressable_shards[0].data.shape == (32, 16)


def test_sequence_axis_splits_activations():
    """On a data=2 x sequence=4 mesh, the length rule makes each device hold a quarter of
    every activation: the compiled step needs fewer temporaries per device than the same
    mesh with an extra rule that keeps length whole (4 devices repeating the same work)."""
    from jaxlm import plan
    seq = plan.make_plan(sharded_config("dp_sequence"), jax.devices())
    cfg = sharded_config("dp_sequence")
    cfg.mesh.rules = (("length", None),)  # tried first: overrides the strategy's length rule
    flat = plan.make_plan(cfg, jax.devices())
    assert seq.mesh["sequence"] == 4
    assert seq.temp_bytes < flat.temp_bytes


def test_single_slice_mesh_follows_the_tpu_torus():
    """A v5p 4x4x4's chips, listed host by host (2x2x1 chips a host) as the runtime lists
    them: every tensor group of the mesh is a line of 4 neighbouring chips on one physical
    axis, where reshaping the list as it comes puts two hosts' corners in one group."""
    @dataclasses.dataclass(frozen=True)
    class Chip:  # what mesh_utils reads of a TPU device
        id: int
        coords: tuple
        core_on_chip: int = 0
        platform: str = "tpu"
        device_kind: str = "TPU v5"
        process_index: int = 0
        slice_index: int = 0

    cubes = [(x, y, z) for z in range(4) for hy in (0, 2) for hx in (0, 2)
             for y in (hy, hy + 1) for x in (hx, hx + 1)]
    chips = [Chip(i, c) for i, c in enumerate(cubes)]
    cfg = sharded_config("fsdp_tp")
    cfg.mesh.update(fsdp=16, tensor=4)
    mesh = sharding.make_mesh(cfg.mesh, chips)
    assert mesh.shape["fsdp"] == 16 and mesh.shape["tensor"] == 4
    for group in mesh.devices.reshape(-1, 4):
        coords = np.array([c.coords for c in group])
        varying = [axis for axis in range(3) if len(set(coords[:, axis])) > 1]
        assert len(varying) == 1 and sorted(coords[:, varying[0]]) == [0, 1, 2, 3], coords
    plain = np.array([c.coords for c in chips]).reshape(-1, 4, 3)
    assert all((g.max(0) > g.min(0)).sum() == 2 for g in plain)  # a 2x2 square each


def test_mesh_errors_name_the_numbers():
    cfg = sharded_config("dp")
    cfg.mesh.update(data=3)
    with pytest.raises(ConfigError, match=r"multiplies to 3, but there are 8 devices"):
        build(cfg)
    cfg = sharded_config("dp_sequence")
    cfg.data.seq_len = 30
    with pytest.raises(ConfigError, match=r"seq_len=30 is not divisible by the sequence axis \(4\)"):
        build(cfg)
    cfg = sharded_config("tp")
    cfg.model.update(num_heads=2)  # 4-way tensor axis
    with pytest.raises(ConfigError, match=r"num_heads=2 is not divisible by the 4 parts"):
        build(cfg)
    cfg = sharded_config("dp")
    cfg.mesh.update(data=4, dcn_data=2)  # 2 slices asked for, one process, no slice ids
    with pytest.raises(ConfigError, match=r"2 slices requested, but the devices span 1 slice"):
        build(cfg)


@pytest.mark.parametrize("rule,message", [
    (("embd", "fsdp"), "unknown logical axis 'embd'"),
    (("embed", "model"), "names mesh axis 'model'"),
])
def test_bad_rules_are_named(rule, message):
    cfg = sharded_config("dp")
    cfg.mesh.rules = (rule,)
    with pytest.raises(ConfigError, match=message):
        build(cfg)


def test_indivisible_dimension_is_named():
    cfg = sharded_config("tp")
    cfg.model.vocab_size = 258
    with pytest.raises(ConfigError, match=r"vocab=258.*strategy='tp'.*\('tensor',\) of total size 4"):
        build(cfg)


def test_pmap_path_matches_jit_path():
    """config.parallelism="pmap" (replicated params, psum of gradients over 8 devices) takes
    the same steps as the jit path on one device."""
    cfg = tiny_config(vocab_size=264)
    batches = make_batches(cfg)
    ref_state, ref_losses = run_steps(cfg, jax.devices()[:1], batches)

    cfg.parallelism = "pmap"
    state, losses = run_steps(cfg, None, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(state.params), jax.device_get(ref_state.params))
