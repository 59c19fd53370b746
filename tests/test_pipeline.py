"""Pipeline parallelism (config.mesh.pipeline) on 8 fake CPU devices: stages combined with
data, FSDP and tensor parallelism take the same steps as one device; a checkpoint restores
onto other stage counts; the schedule's length is the bubble formula's; impossible
combinations are refused naming the field; multi-slice meshes put stages across slices.

Tiny shapes (D=32, 4 layers, 16 tokens, 16 rows in 4 microbatches) keep the compiles short.
"""

import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fresh_step, random_batch, tiny_config

from jaxlm import checkpoint, config, models, plan, sharding
from jaxlm.errors import ConfigError
from jaxlm.models import layers
from jaxlm.setup import build
from jaxlm.train.build import build_train

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=8")

LAYERS, MICRO = 4, 4


def pipeline_config(stages=1, strategy="dp", data=-1, fsdp=1, tensor=1, repeats=1, **model):
    cfg = tiny_config(**{"vocab_size": 264, "num_layers": LAYERS, "scan_layers": True,
                         "dropout": 0.0, **model})
    cfg.data.update(seq_len=16, packing=True)
    cfg.train.update(batch_size=16, microbatches=MICRO)
    cfg.mesh.update(pipeline=stages, strategy=strategy, data=data, fsdp=fsdp, sequence=1,
                    tensor=tensor, pipeline_repeats=repeats)
    config.validate(cfg)
    return cfg


def packed_batch(cfg, seed):
    """Random rows with different documents per row (a cut at a row-dependent place,
    positions restarting there) and some trailing padding: each microbatch has its own
    mask, so a stage that attended with another microbatch's mask would change the loss."""
    batch = random_batch(cfg, seed)
    B, T = batch["segments"].shape
    for r in range(B):
        cut, end = 1 + (r * 5 + seed) % (T - 2), T - (r % 3)
        batch["segments"][r] = np.where(np.arange(T) < cut, 1, 2) * (np.arange(T) < end)
        batch["positions"][r] = np.where(np.arange(T) < cut, np.arange(T), np.arange(T) - cut)
        batch["weights"][r] = batch["segments"][r] != 0
    return batch


def run_steps(cfg, devices, batches):
    """(the state after the steps, in the global layout; the losses; the step)."""
    state, step = fresh_step(cfg, devices)
    losses = []
    for b in batches:
        state, m = step(state, step.place_batch(b), jax.random.PRNGKey(1))
        losses.append(float(m["loss"]))
    return step.global_state(state), losses, step


@functools.cache
def reference():
    """One device, no stages: the 4 microbatches accumulate gradients in the train step."""
    cfg = pipeline_config()
    batches = [packed_batch(cfg, seed) for seed in range(2)]
    state, losses, _ = run_steps(cfg, jax.devices()[:1], batches)
    return batches, jax.device_get(state.params), losses


CASES = {  # case -> (stages, strategy, data, fsdp, tensor, repeats, model overrides)
    "data": (2, "dp", 4, 1, 1, 1, {}),
    "fsdp": (2, "fsdp", 1, 4, 1, 1, {}),
    "tensor_remat": (2, "tp", 1, 1, 4, 1, {"remat": True}),
    "fsdp_tensor": (2, "fsdp_tp", 1, 2, 2, 1, {}),
    "4_stages_data": (4, "dp", 2, 1, 1, 1, {}),
    "circular_fsdp": (2, "fsdp", 1, 4, 1, 2, {}),  # 2 rounds of 2 stages of 1 layer
}


@functools.cache
def pipelined(case):
    stages, strategy, data, fsdp, tensor, repeats, model = CASES[case]
    cfg = pipeline_config(stages, strategy, data, fsdp, tensor, repeats, **model)
    state, losses, step = run_steps(cfg, jax.devices(), reference()[0])
    return cfg, state, losses, step


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_single_device(case):
    _, ref_params, ref_losses = reference()
    cfg, state, losses, step = pipelined(case)
    assert dict(step.setup.mesh.shape)["stage"] == cfg.mesh.pipeline
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(state.params), ref_params)
    # Each device holds its stage's layers only (and its FSDP / tensor part of them).
    kernel = state.params[layers.STACKED]["mlp"]["fc_in"]["kernel"]  # [L, D, F]
    shard = kernel.addressable_shards[0].data.shape
    _, _, _, fsdp, tensor, _, _ = CASES[case]
    assert shard == (LAYERS // cfg.mesh.pipeline, 32 // fsdp, 64 // tensor), shard


def test_schedule_length_is_the_bubble_formula():
    """M microbatches through S stages: M + S - 1 iterations (the scan in the traced
    model), of which each stage idles S - 1: bubble (S-1)/(M+S-1); going R times round
    (circular, M >= S): R*M + S - 1 iterations, bubble (S-1)/(R*M+S-1)."""
    assert layers.bubble_fraction(1, 8) == 0
    assert layers.bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert layers.bubble_fraction(4, 16) == pytest.approx(3 / 19)
    assert layers.bubble_fraction(4, 16, repeats=2) == pytest.approx(3 / 35)
    # fewer microbatches than stages: a microbatch waits for its own last stage
    assert layers.schedule_length(4, 2, repeats=3) == 2 * 4 + 2 + 3
    for stages, repeats in ((2, 1), (4, 1), (2, 2)):
        setup = build(pipeline_config(stages, data=8 // stages, repeats=repeats))
        tokens = jnp.zeros((16, 16), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p: setup.model.apply({"params": p}, tokens))(
            setup.abstract_params)
        lengths = {e.params["length"] for e in _equations(jaxpr.jaxpr)
                   if e.primitive.name == "scan"}
        # the pipeline's iterations, and each stage's scan over its group of layers
        assert lengths == {layers.schedule_length(stages, MICRO, repeats),
                           LAYERS // (stages * repeats)}, lengths
        assert layers.schedule_length(stages, MICRO, repeats) == repeats * MICRO + stages - 1


def _equations(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _equations(sub)


def test_same_init_with_and_without_stages():
    """A seed gives the same model at any stage count (init runs the whole stack)."""
    one = build(pipeline_config()).init_params(jax.random.PRNGKey(3))
    two = build(pipeline_config(2, data=4)).init_params(jax.random.PRNGKey(3))
    jax.tree_util.tree_map(np.testing.assert_array_equal, one, two)


def test_checkpoint_restores_onto_other_stage_counts(tmp_path):
    """Elastic resume: the stored blocks keep their [layers, ...] shape, only the layer
    axis' sharding differs, so a state saved at 2 stages restores at 4 and at 1 with the
    same values."""
    _, state, _, _ = pipelined("data")
    saver = checkpoint.Checkpointer(tmp_path)
    saver.save(2, state, {})
    saver.wait()
    saved = jax.device_get(state)
    for stages, strategy, data, fsdp in ((4, "dp", 2, 1), (1, "fsdp", 2, 4)):
        cfg = pipeline_config(stages, strategy, data, fsdp)
        cfg.train.microbatches = 2  # 16 rows over 8 data-parallel devices without stages
        step = build_train(cfg)
        restored, _ = saver.restore(2, step.abstract_state, step.state_shardings)
        jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored), saved)
        kernel = restored.params[layers.STACKED]["attn"]["qkv"]["kernel"]
        assert kernel.addressable_shards[0].data.shape[0] == LAYERS // stages
    saver.close()


def test_forward_and_decoding_on_a_pipelined_mesh():
    """Outside training the same model runs: a batch that the microbatches do not divide
    goes through in fewer (3 rows: one microbatch, fewer than the stages, going twice round
    the circular schedule), and decoding with the KV cache runs the stage-split layers in
    order. Both as on one device."""
    cfg_one, cfg_two = pipeline_config(), pipeline_config(2, "tp", data=1, tensor=4, repeats=2)
    one, two = build(cfg_one, jax.devices()[:1]), build(cfg_two)
    params = one.init_params(jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 16)), jnp.int32)

    full_one = jax.jit(lambda p: one.model.apply({"params": p}, tokens))(params)
    placed = jax.device_put(params, two.param_shardings)
    with sharding.activate(two.mesh, cfg_two.mesh):
        full_two = jax.jit(lambda p: two.model.apply({"params": p}, tokens))(placed)
        cache = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
            lambda: two.model.init(jax.random.PRNGKey(0), tokens[:, :8], decode=True))["cache"])
        prompt_two, _ = jax.jit(lambda p, c: two.model.apply(
            {"params": p, "cache": c}, tokens[:, :8], decode=True, mutable=["cache"]))(
                placed, cache)
    np.testing.assert_allclose(full_two, full_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prompt_two, full_one[:, :8], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change,message", [
    ({"model.scan_layers": False}, r"config.mesh.pipeline=2 needs config.model.scan_layers=true"),
    ({"model.num_layers": 3}, r"config.mesh.pipeline=2 does not divide config.model.num_layers=3"),
    ({"parallelism": "pmap"}, r"config.mesh.pipeline=2 needs config.parallelism='jit'"),
    ({"train.microbatches": 1}, r"config.mesh.pipeline=2 needs config.train.microbatches "
     r">= 2 \(it is 1\)"),
    ({"lora.rank": 4, "lora.targets": ("attn/qkv",)},
     r"config.mesh.pipeline=2 with config.lora.rank"),
    ({"privacy.noise_multiplier": 1.0}, r"config.mesh.pipeline=2 with config.privacy"),
    ({"mesh.pipeline_repeats": 3}, r"config.mesh.pipeline=2 with config.mesh.pipeline_repeats"
     r"=3: 2 x 3 groups of layers do not divide config.model.num_layers=4"),
    ({"mesh.pipeline": 1, "mesh.dcn_pipeline": 2, "model.num_layers": 3},
     r"config.mesh.pipeline x dcn_pipeline=2 does not divide config.model.num_layers=3"),
])
def test_impossible_combinations_are_refused(change, message):
    cfg = pipeline_config(2, data=4)
    for field, value in change.items():
        section, name = field.split(".") if "." in field else (None, field)
        (cfg[section] if section else cfg)[name] = value
    with pytest.raises(ConfigError, match=message):
        config.validate(cfg)


def test_stage_count_must_divide_the_devices():
    with pytest.raises(ConfigError, match=r"config.mesh.pipeline=3 does not divide the 8 devices"):
        build(pipeline_config(3, num_layers=3))
    assert "stage" not in build(pipeline_config()).mesh.axis_names  # no stages, no axis


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """A device of a multi-slice job, as make_mesh sees it (the Mesh takes any object)."""
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_multislice_mesh_puts_stages_across_slices():
    """2 slices x 4 devices, config.mesh.dcn_pipeline=2: each stage is one slice, so only
    the pipeline's activations cross the data-centre network; data stays inside a slice."""
    devices = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
    cfg = pipeline_config(1, data=4)
    cfg.mesh.dcn_pipeline = 2
    config.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    assert dict(mesh.shape) == {"stage": 2, "data": 4, "fsdp": 1, "sequence": 1, "tensor": 1}
    for stage in range(2):
        assert {d.slice_index for d in mesh.devices[stage].flat} == {stage}
    cfg.mesh.update(dcn_pipeline=1, pipeline=2, data=2, dcn_data=2)  # stages inside a slice
    mesh = sharding.make_mesh(cfg.mesh, devices)
    for stage in range(2):
        assert {d.slice_index for d in mesh.devices[stage].flat} == {0, 1}


def test_plan_prints_bubble_and_stage_memory_and_proposes_stages():
    cfg = pipeline_config(2, data=4)
    staged = plan.make_plan(cfg, jax.devices())
    assert staged.pipeline.stages == 2 and staged.pipeline.bubble == pytest.approx(0.2)
    # each stage's devices hold half of the blocks' parameters (fp32), all of the rest,
    # and Adam's two moments of those
    params = build(cfg).abstract_params
    blocks = 4 * models.count_params(params[layers.STACKED])
    rest = 4 * models.count_params(params) - blocks
    assert staged.pipeline.param_bytes == blocks // 2 + rest
    assert 0 <= staged.pipeline.optimizer_bytes - 2 * staged.pipeline.param_bytes <= 64
    text = plan.format_plan(staged, cfg)
    assert "pipeline: 2 stages x 4 microbatches (GPipe): bubble 20.0% of stage time" in text
    assert "P('stage', None, None)" in text  # the blocks' layer axis split over stages
    circular = plan.Stages(2, 4, 2, 0, 0)
    assert circular.bubble == pytest.approx(1 / 9) and circular.schedule == "circular, 2 rounds"
    # a scanned model that does not fit is offered stages taken from the data axis
    mesh = {"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1}
    proposed = plan.candidates(pipeline_config(data=8), mesh, cpu=True)
    assert {"mesh.pipeline": 2, "mesh.data": 4, "train.microbatches": 4} in proposed
    assert {"mesh.pipeline": 4, "mesh.data": 2, "train.microbatches": 8} in proposed
    few = plan.weak_choices(cfg.copy_and_resolve_references(), {**mesh, "stage": 2})
    assert not any("bubble" in w for w in few)
    cfg.train.microbatches = 2
    assert any("idle 33% of the time" in w for w in plan.weak_choices(cfg, {**mesh, "stage": 2}))
