"""Magnitude pruning (config.prune, jaxlm.train.prune): exact mask counts per scope and
N:M pattern, scanned stacks, the cubic schedule, masks that never regrow, the pruned
optimizer against AdamW alone, and training: zeros in the checkpoint, bitwise resume, a
sharded run like one device, and the errors for bad config."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, tiny_config
from test_state import assert_trees_equal, restored

from jaxlm import checkpoint, cli, export
from jaxlm.config import base_config
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.train import loop, optimizer, prune
from jaxlm.train.build import build_train
from jaxlm.trainable import path_of


def prune_cfg(**fields):
    c = base_config().prune
    c.update(**fields)
    return c


def pruned_once(cfg_prune, params):
    """{path: mask} and the params after one update with zero gradient: the masks of the
    magnitudes of `params` themselves (config.prune's one-shot schedule at update 0)."""
    tx = prune.prune(cfg_prune, params)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, state = jax.jit(tx.update)(zero, tx.init(params), params)
    return prune.masks_of(state), optax.apply_updates(params, updates)


def flat(tree, leaf=np.asarray) -> dict:
    """{path: leaf} of a params-like tree."""
    return {path_of(k): leaf(v) for k, v in
            flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(tree))).items()}


def ties(rng, shape, scale=1.0):
    """Random nonzero weights with many equal magnitudes (both signs): ties at every
    threshold."""
    signs = rng.choice([-1, 1], shape)
    return jnp.asarray(rng.integers(1, 7, shape) * signs * scale, jnp.float32)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.9])
def test_layer_scope_zeros_exactly_floor_s_n_of_each_kernel_and_keeps_the_largest(sparsity):
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": ties(rng, (16, 12)), "bias": ties(rng, (12,))},
              "b": {"kernel": ties(rng, (2, 5))}}  # 0.9 * 10 is 9.000000000000002
    masks, after = pruned_once(prune_cfg(sparsity=sparsity), params)
    assert set(masks) == {"a/kernel", "b/kernel"}  # the bias matches no "kernel$": no mask
    for path, mask in masks.items():
        w, new = flat(params)[path], flat(after)[path]
        mask = np.asarray(mask)
        assert (~mask).sum() == math.floor(sparsity * w.size), path
        np.testing.assert_array_equal(new, np.where(mask, w, 0))
        assert np.abs(w[mask]).min() >= np.abs(w[~mask]).max()
        # Ties at the threshold: the first in row-major order are the ones kept.
        at = np.abs(w) == np.abs(w[mask]).min()
        kept_at = mask[at]
        assert not np.any(np.diff(kept_at.astype(int)) > 0), path  # True..True False..False
    np.testing.assert_array_equal(after["a"]["bias"], params["a"]["bias"])


@pytest.mark.parametrize("sparsity", [0.25, 0.6])
def test_global_scope_is_one_threshold_over_every_kernel(sparsity):
    rng = np.random.default_rng(1)
    params = {"big": {"kernel": ties(rng, (8, 8))}, "small": {"kernel": ties(rng, (4, 8), 0.01)}}
    masks, _ = pruned_once(prune_cfg(sparsity=sparsity, scope="global"), params)
    w = np.concatenate([flat(params)[p].ravel() for p in sorted(masks)])
    m = np.concatenate([np.asarray(masks[p]).ravel() for p in sorted(masks)])
    assert (~m).sum() == math.floor(sparsity * w.size)
    assert np.abs(w[m]).min() >= np.abs(w[~m]).max()
    # The small kernel goes first: far more than its share, unlike scope "layer".
    assert (~np.asarray(masks["small/kernel"])).mean() > sparsity


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_scanned_stack_is_pruned_layer_by_layer(scope):
    """blocks/... params carry a leading layers axis: scope "layer" prunes every layer's
    slice to the sparsity on its own, even when one layer's weights are all smaller."""
    rng = np.random.default_rng(2)
    scale = jnp.asarray([0.01, 1.0, 100.0])[:, None, None]
    params = {"blocks": {"mlp": {"kernel": ties(rng, (3, 8, 4)) * scale}}}
    masks, _ = pruned_once(prune_cfg(sparsity=0.5, scope=scope), params)
    zeros = (~np.asarray(masks["blocks/mlp/kernel"])).reshape(3, -1).sum(1)
    if scope == "layer":
        np.testing.assert_array_equal(zeros, [16, 16, 16])
    else:
        assert zeros.sum() == 48 and zeros[0] == 32 and zeros[2] == 0


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
def test_n_of_m_keeps_n_largest_of_every_m_along_the_input_axis(pattern):
    n, m = map(int, pattern.split(":"))
    rng = np.random.default_rng(3)
    params = {"attn": {"qkv": {"kernel": ties(rng, (16, 3, 4))}},         # [D, 3, HK]
              "blocks": {"fc": {"kernel": ties(rng, (2, 8, 6))}}}         # [layers, in, out]
    masks, after = pruned_once(prune_cfg(pattern=pattern), params)
    for path, axis in (("attn/qkv/kernel", 0), ("blocks/fc/kernel", 1)):
        w, new, mask = flat(params)[path], flat(after)[path], np.asarray(masks[path])
        np.testing.assert_array_equal(new, np.where(mask, w, 0))
        groups = lambda x: np.moveaxis(x, axis, -1).reshape(  # noqa: E731
            *np.moveaxis(x, axis, -1).shape[:-1], -1, m)
        g_mask, g_w = groups(mask), np.abs(groups(w))
        assert (g_mask.sum(-1) == n).all(), path
        kept_min = np.where(g_mask, g_w, np.inf).min(-1)
        pruned_max = np.where(g_mask, -np.inf, g_w).max(-1)
        assert (kept_min >= pruned_max).all(), path


def test_n_of_m_is_applied_once_at_start_step():
    rng = np.random.default_rng(4)
    params = {"k": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}
    cfg = prune_cfg(pattern="2:4", start_step=2)
    tx = prune.prune(cfg, params)
    state, update = tx.init(params), jax.jit(tx.update)
    counts = []
    for _ in range(5):
        updates, state = update(jax.tree_util.tree_map(
            lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params), state, params)
        params = optax.apply_updates(params, updates)
        counts.append(int((~prune.masks_of(state)["k/kernel"]).sum()))
    assert counts == [0, 0, 16, 16, 16]


# ----------------------------------------------------------------------------- schedule


def test_cubic_schedule_values_and_mask_update_steps():
    cfg = prune_cfg(sparsity=0.8, start_step=10, end_step=20, every=3)
    s = lambda t: float(prune.scheduled_sparsity(cfg, jnp.int32(t)))  # noqa: E731
    for t, want in [(0, 0.0), (9, 0.0), (10, 0.0), (13, 0.8 * (1 - 0.7 ** 3)),
                    (15, 0.8 * (1 - 0.5 ** 3)), (19, 0.8 * (1 - 0.1 ** 3)), (20, 0.8), (99, 0.8)]:
        np.testing.assert_allclose(s(t), want, rtol=1e-6, atol=1e-7, err_msg=f"t={t}")
    updates = [t for t in range(30) if prune.is_mask_update(cfg, jnp.int32(t))]
    assert updates == [10, 13, 16, 19, 20]
    once = prune_cfg(sparsity=0.8, start_step=5, end_step=5)
    assert [t for t in range(10) if prune.is_mask_update(once, jnp.int32(t))] == [5]
    assert float(prune.scheduled_sparsity(once, jnp.int32(4))) == 0.0
    np.testing.assert_allclose(float(prune.scheduled_sparsity(once, jnp.int32(5))), 0.8)


def test_masks_follow_the_schedule_never_regrow_and_pruned_weights_stay_zero():
    """Updates far larger than the weights: without the masks' memory, pruned weights
    would come back at every mask update."""
    cfg = prune_cfg(sparsity=0.7, start_step=1, end_step=7, every=2)
    rng = np.random.default_rng(5)
    params = {"k": {"kernel": jnp.asarray(rng.normal(size=(10, 7)), jnp.float32)}}
    tx = prune.prune(cfg, params)
    state, update = tx.init(params), jax.jit(tx.update)
    before, zeros = np.ones((10, 7), bool), 0
    for t in range(10):
        grads = jax.tree_util.tree_map(
            lambda p: jnp.asarray(rng.normal(size=p.shape) * 10, p.dtype), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        mask, w = np.asarray(prune.masks_of(state)["k/kernel"]), np.asarray(params["k"]["kernel"])
        assert not (mask & ~before).any(), f"a pruned weight came back at update {t}"
        if t in (1, 3, 5):
            s_t = np.float32(prune.scheduled_sparsity(cfg, jnp.int32(t)))
            zeros = int(np.floor(s_t * np.float32(70)))
        elif t == 7:
            zeros = math.floor(0.7 * 70)
        assert (~mask).sum() == zeros, t
        np.testing.assert_array_equal(w == 0, ~mask)
        before = mask
    assert zeros == 49


# ----------------------------------------------------------------------------- with AdamW


def test_kept_weights_move_bitwise_as_without_pruning_and_pruned_ones_stay_zero():
    cfg = tiny_config()
    cfg.optimizer.update(warmup_steps=0, weight_decay=0.1)
    cfg.prune.update(sparsity=0.6, start_step=1, end_step=4, every=1)
    rng = np.random.default_rng(6)
    params = {"dense": {"kernel": rng.normal(size=(16, 8)), "bias": rng.normal(size=8)},
              "blocks": {"mlp": {"kernel": rng.normal(size=(2, 8, 4))}}}
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    plain = optimizer.make_optimizer(cfg.optimizer, 10)
    pruned = optimizer.make_optimizer(cfg.optimizer, 10, cfg.prune, params)
    assert isinstance(pruned.init(params)[1], prune.PruneState)
    assert jax.tree_util.tree_structure(plain.init(params)) == \
        jax.tree_util.tree_structure(optimizer.adamw(cfg.optimizer, 10).init(params))

    def stepper(tx):
        # Op by op, not jitted: two programs compiled apart may fuse AdamW differently and
        # round an entry 1 ulp apart (XLA:CPU does, for the 3-D kernel), pruning or not.
        def step(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state
        return step
    runs = [[params, tx.init(params), stepper(tx)] for tx in (plain, pruned)]
    for t in range(6):
        grads = jax.tree_util.tree_map(  # never zero: pruned weights keep getting gradients
            lambda p: jnp.asarray(rng.normal(size=p.shape) + 0.5, jnp.float32), params)
        for run in runs:
            run[0], run[1] = run[2](run[0], run[1], grads)
        masks = {k: np.asarray(v) for k, v in prune.masks_of(runs[1][1]).items()}
        assert set(masks) == {"dense/kernel", "blocks/mlp/kernel"}
        a, b = flat(runs[0][0]), flat(runs[1][0])
        for path in a:
            mask = masks.get(path, np.ones(a[path].shape, bool))
            np.testing.assert_array_equal(b[path][mask], a[path][mask], err_msg=f"{path} {t}")
            assert (b[path][~mask] == 0).all() and (a[path][~mask] != 0).all()
    assert (~masks["dense/kernel"]).sum() == math.floor(0.6 * 128)


# ----------------------------------------------------------------------------- training


def train_cfg(steps=4, **mesh):
    cfg = tiny_config()
    cfg.train.steps, cfg.checkpoint.every = steps, 2
    cfg.prune.update(sparsity=0.5, start_step=0, end_step=3, every=1)  # s_1 = 0.35, s_2 = 0.48
    if mesh:
        cfg.mesh.update(**mesh)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of the same pruned run: whole, interrupted at 2 and resumed, and sharded
    over 8 devices (FSDP)."""
    root = tmp_path_factory.mktemp("prune")
    one = jax.devices()[:1]
    loop.train(train_cfg(4), root / "whole", one)
    loop.train(train_cfg(2), root / "halves", one)
    loop.train(train_cfg(4), root / "halves", one)
    loop.train(train_cfg(4, strategy="fsdp", data=1, fsdp=8), root / "sharded", jax.devices())
    return root


def test_training_prunes_saves_the_zeros_and_resumes_bitwise(runs):
    cfg = train_cfg(4)
    run = build_train(cfg, jax.devices()[:1])
    whole, halves = restored(run, [runs / "whole", runs / "halves"], 4)
    assert_trees_equal(whole, halves)  # params, AdamW's moments, masks and count
    masks = prune.masks_of(whole.opt_state)
    assert set(masks) == {p for p in flat(whole.params) if p.endswith("kernel")}
    assert int(whole.opt_state[1].count) == 4
    params = flat(whole.params)
    measured = prune.sparsity_of(whole.params, cfg.prune)
    for path, mask in masks.items():
        mask = np.asarray(mask)
        np.testing.assert_array_equal(params[path] == 0, ~mask, err_msg=path)
        assert measured[path] == math.floor(0.5 * mask.size) / mask.size
    # python -m jaxlm.export writes the zeros and names their share in its meta
    export.export(cfg, runs / "whole", runs / "export")
    assert checkpoint.read_export_meta(runs / "export")["sparsity"] == measured
    cfg.evaluate.params = str(runs / "export")
    exported, _ = checkpoint.load_params(cfg, run.setup, runs / "whole")
    assert prune.sparsity_of(exported, cfg.prune) == measured
    # A checkpoint within the schedule holds its sparsity then: s_1, after updates 0 and 1.
    early = restored(run, [runs / "whole"], 2)[0]
    s_1 = np.float32(prune.scheduled_sparsity(cfg.prune, jnp.int32(1)))
    np.testing.assert_allclose(s_1, 0.5 * (1 - (2 / 3) ** 3), rtol=1e-6)
    params = flat(early.params)
    for path, mask in prune.masks_of(early.opt_state).items():
        mask = np.asarray(mask)
        assert (~mask).sum() == np.floor(s_1 * np.float32(mask.size)), path
        np.testing.assert_array_equal(params[path] == 0, ~mask, err_msg=path)


@pytest.mark.parametrize("mesh,scan", [
    ({"strategy": "fsdp", "data": 1, "fsdp": 8}, False),
    ({"strategy": "tp", "data": 2, "tensor": 4}, False),
    ({"strategy": "fsdp_tp", "data": 1, "fsdp": 2, "tensor": 4}, True),
])
def test_masks_are_sharded_like_their_parameters(mesh, scan):
    cfg = train_cfg(4, **mesh)
    cfg.model.update(scan_layers=scan, vocab_size=264)  # divisible by the tensor axis
    run = build_train(cfg, jax.devices())
    specs = {k: v.spec for k, v in flat(run.state_shardings.params, lambda x: x).items()}
    mask_specs = {k: v.spec for k, v in
                  flat(run.state_shardings.opt_state[1].masks, lambda x: x).items()}
    assert mask_specs and all(mask_specs[k] == specs[k] for k in mask_specs)
    # split over the mesh, not replicated
    assert any(s != jax.sharding.PartitionSpec() for s in mask_specs.values()), mask_specs


def test_a_sharded_run_prunes_as_one_device(runs):
    run = build_train(train_cfg(4, strategy="fsdp", data=1, fsdp=8), jax.devices())
    sharded = restored(run, [runs / "sharded"], 4)[0]
    get = lambda tree: tree["block_0"]["mlp"]["fc_in"]["kernel"]  # noqa: E731
    assert get(sharded.opt_state[1].masks).sharding.spec == get(sharded.params).sharding.spec
    whole = restored(build_train(train_cfg(4), jax.devices()[:1]), [runs / "whole"], 4)[0]
    for path, mask in prune.masks_of(whole.opt_state).items():
        np.testing.assert_array_equal(prune.masks_of(sharded.opt_state)[path], mask, path)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           jax.device_get(sharded.params), jax.device_get(whole.params))


@pytest.mark.parametrize("change,match", [
    ({"sparsity": 0.7}, r"config\.prune\.sparsity=0\.7, but the checkpoints in .* were made "
                        r"with 0\.5; pass the same config\.prune"),
    ({"sparsity": 0.0}, r"config\.prune\.sparsity=0\.0, but .* with 0\.5"),
    ({"params": ("fc_in/kernel$",)}, r"config\.prune\.params=\('fc_in/kernel\$',\), but"),
])
def test_resuming_with_other_pruning_is_refused_in_one_line(runs, change, match):
    cfg = train_cfg(6)
    cfg.prune.update(**change)
    with pytest.raises(CheckpointError, match=match) as e:
        loop.train(cfg, runs / "halves", jax.devices()[:1])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fields,trainable,match", [
    ({"params": ("nothing$",)}, (), r"config\.prune\.params: 'nothing\$' matches no trainable "
                                    r"parameter"),
    ({"params": ("block_0/",)}, ("block_1/",), r"config\.prune\.params: 'block_0/' matches no "
                                               r"trainable"),
    ({"params": ("kernel[",)}, (), r"config\.prune\.params: 'kernel\[' is not a regular"),
    ({"pattern": "2:3"}, (), r"config\.prune\.pattern='2:3': parameter block_0/attn/out/kernel "
                             r"\[32, 32\] has input axis 32, not divisible into groups of 3"),
])
def test_bad_pruning_config_is_named_before_anything_runs(fields, trainable, match):
    cfg = tiny_config()
    cfg.prune.update(sparsity=0.5, **fields)
    cfg.train.trainable = trainable
    with pytest.raises(ConfigError, match=match):
        build_train(cfg, jax.devices()[:1])


def test_a_scanned_stack_is_checked_on_its_input_axis():
    cfg = tiny_config(scan_layers=True, mlp_dim=60)  # fc_out is [layers, 60, D]
    cfg.prune.update(pattern="1:8", params=("fc_out/kernel$",))
    with pytest.raises(ConfigError, match=r"blocks/mlp/fc_out/kernel \[2, 60, 32\] has input "
                                          r"axis 60, not divisible into groups of 8"):
        build_train(cfg, jax.devices()[:1])


@pytest.mark.parametrize("override,match", [
    ("prune.sparsity=1.0", r"config\.prune\.sparsity=1\.0 must be in \[0, 1\)"),
    ("prune.sparsity=-0.1", r"config\.prune\.sparsity=-0\.1 must be in \[0, 1\)"),
    ("prune.end_step=3", r"config\.prune\.end_step=3 is before config\.prune\.start_step=5"),
    ("prune.pattern=4:2", r"config\.prune\.pattern='4:2': expected 'unstructured' or N:M"),
    ("prune.scope=model", r"config\.prune\.scope='model': expected 'layer' or 'global'"),
])
def test_out_of_range_values_are_refused_on_the_command_line(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        cli.parse([f"--config={REPO}/configs/gpt/debug.py", f"--workdir={tmp_path}",
                   "--config.prune.sparsity=0.5", "--config.prune.start_step=5",
                   "--config.prune.end_step=9", f"--config.{override}"], "jaxlm.train", "")
