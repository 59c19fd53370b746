"""The train state's seams: a trainable filter with a frozen base, auxiliary inputs of the
step (a second model), the two-phase gradient, and the state layout version with its
conversion command."""

import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fresh_step, random_batch, tiny_config

from jaxlm import checkpoint
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.setup import build
from jaxlm.train import loop, objectives, step as step_lib
from jaxlm.train.build import build_train


def flat(tree) -> dict:
    return {"/".join(k): v for k, v in
            flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(tree))).items()}


def restored(run, workdirs, step: int) -> list:
    """The train state of checkpoint `step` in each workdir, as `run` lays it out."""
    states = []
    for workdir in workdirs:
        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        states.append(ckpt.restore(step, run.abstract_state, run.state_shardings)[0])
        ckpt.close()
    return states


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


# ----------------------------------------------------------------------------- trainable filter


def test_frozen_half_never_changes_has_no_moments_and_trains_like_the_whole_model():
    cfg = tiny_config()
    cfg.optimizer.update(grad_clip_norm=0.0, warmup_steps=0)  # Adam is then per parameter
    batch = random_batch(cfg)
    whole, run_whole = fresh_step(cfg, jax.devices()[:1])
    cfg.train.trainable = ("block_1/", "ln_final")
    state, run = fresh_step(cfg, jax.devices()[:1])
    frozen_before = jax.device_get(run.frozen)
    assert set(flat(run.frozen)) == {k for k in flat(whole.params)
                                     if k.startswith(("block_0/", "embed/"))}
    mu = flat(state.opt_state[0].mu)
    assert set(mu) == set(flat(state.params)) and all(k.startswith(("block_1/", "ln_final/"))
                                                       for k in mu)

    whole, _ = run_whole(whole, run_whole.place_batch(batch), jax.random.PRNGKey(0))
    state, _ = run(state, run.place_batch(batch), jax.random.PRNGKey(0))
    # One step from the same init: the trained half moves exactly as in the whole model.
    want = flat(whole.params)
    for name, value in flat(state.params).items():
        np.testing.assert_allclose(value, want[name], rtol=1e-6, atol=1e-7, err_msg=name)
    for _ in range(2):
        state, _ = run(state, run.place_batch(batch), jax.random.PRNGKey(0))
    assert_trees_equal(run.frozen, frozen_before)
    assert_trees_equal(flax.traverse_util.unflatten_dict(
        {k: v for k, v in flax.traverse_util.flatten_dict(run.params(state)).items()
         if k[0] in ("embed", "block_0")}), frozen_before)


def test_a_frozen_base_under_pmap_takes_the_jit_steps():
    cfg = tiny_config()
    cfg.train.trainable = ("block_1/",)
    batch = random_batch(cfg)
    out = []
    for parallelism, devices in (("jit", jax.devices()[:1]), ("pmap", None)):
        cfg.parallelism = parallelism
        state, run = fresh_step(cfg, devices)
        for _ in range(2):
            state, m = run(state, run.place_batch(batch), jax.random.PRNGKey(0))
        out.append((float(m["loss"]), jax.device_get(run.params(state))))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           out[1][1], out[0][1])


def _frozen_cfg(steps):
    cfg = tiny_config(dropout=0.1)
    cfg.train.update(steps=steps, trainable=("block_1/", "ln_final"))
    cfg.checkpoint.every = 2
    return cfg


def test_frozen_run_resumes_bitwise_and_saves_the_base_once(tmp_path):
    devices = jax.devices()[:1]
    loop.train(_frozen_cfg(4), tmp_path / "whole", devices)
    loop.train(_frozen_cfg(2), tmp_path / "halves", devices)
    loop.train(_frozen_cfg(4), tmp_path / "halves", devices)
    run = build_train(_frozen_cfg(4), devices)
    states = restored(run, [tmp_path / "whole", tmp_path / "halves"], 4)
    assert_trees_equal(states[0], states[1])
    # The checkpoint holds the trainables; the frozen base is one export beside them.
    assert not any(k.startswith(("block_0", "embed")) for k in flat(states[0].params))
    assert (tmp_path / "halves" / "frozen" / "params").is_dir()
    # Evaluation and export read the whole model: checkpoint + frozen base.
    cfg = _frozen_cfg(4)
    setup = build(cfg, devices)
    params, step = checkpoint.load_params(cfg, setup, tmp_path / "halves")
    trained, frozen = run.split.split(params)
    run.init_state()  # the frozen base of the run's init, which training never changed
    assert step == 4
    assert_trees_equal(trained, states[1].params)
    assert_trees_equal(frozen, run.frozen)
    # A frozen base that is not the one the checkpoints name is refused.
    shutil.rmtree(tmp_path / "halves" / "frozen")
    with pytest.raises(CheckpointError, match="frozen is missing"):
        checkpoint.load_params(cfg, setup, tmp_path / "halves")


@pytest.mark.parametrize("rule,match", [
    (("nothing_here",), r"'nothing_here' matches no parameter"),
    ((".",), r"matches every parameter"),
    (("block_[",), r"'block_\[' is not a regular expression"),
])
def test_trainable_rules_that_match_nothing_or_everything_are_named(rule, match):
    cfg = tiny_config()
    cfg.train.trainable = rule
    with pytest.raises(ConfigError, match=r"config\.train\.trainable.*" + match):
        build_train(cfg, jax.devices()[:1])


def test_resuming_with_other_trainable_rules_is_refused(tmp_path):
    loop.train(_frozen_cfg(2), tmp_path, jax.devices()[:1])
    cfg = _frozen_cfg(4)
    cfg.train.trainable = ("block_1/",)
    with pytest.raises(CheckpointError, match=r"config\.train\.trainable=\('block_1/',\)"):
        loop.train(cfg, tmp_path, jax.devices()[:1])


# ----------------------------------------------------------------------------- auxiliary models


class WithTeacher(objectives.CausalLM):
    """Next-token loss plus the cross-entropy against a second model's predictions (the
    shape of distillation), the teacher's params arriving as the step's aux input."""

    def __init__(self, setup, teacher_setup):
        objectives.check_aux_model("teacher", setup, teacher_setup)
        super().__init__(setup.cfg.data.seq_len, False)
        self.teacher = teacher_setup.model
        self.aux_spec = {"teacher": teacher_setup.abstract_params}

    def loss(self, model, params, batch, rng, *, deterministic, aux=None):
        total, (weight, metrics) = super().loss(model, params, batch, rng,
                                                deterministic=deterministic)
        logits = model.apply({"params": params}, batch["inputs"])
        target = jax.nn.softmax(self.teacher.apply({"params": aux["teacher"]}, batch["inputs"]))
        soft = -jnp.sum(target * jax.nn.log_softmax(logits) * batch["weights"][..., None])
        return total + soft, (weight, metrics)


def test_an_auxiliary_model_is_read_never_trained_nor_donated():
    cfg = tiny_config()
    cfg.mesh.update(strategy="fsdp", data=1, fsdp=2)
    devices = jax.devices()[:2]
    teacher_cfg = tiny_config(d_model=16, num_heads=2, mlp_dim=32)
    teacher_cfg.mesh.update(strategy="fsdp", data=1, fsdp=2)
    teacher = build(teacher_cfg, devices)
    teacher_params = jax.jit(teacher.init_params, out_shardings=teacher.param_shardings)(
        jax.random.PRNGKey(7))
    # Sharded by the same rules as the student's parameters.
    assert teacher_params["block_0"]["mlp"]["fc_in"]["kernel"].sharding.spec == \
        teacher.param_shardings["block_0"]["mlp"]["fc_in"]["kernel"].spec
    student = build(cfg, devices)
    objective = WithTeacher(student, teacher)
    from jaxlm.train import optimizer
    tx = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps)
    schedule = optimizer.learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    run = step_lib.JitTrainStep(student, objective, tx, schedule,
                                aux={"teacher": teacher_params})
    state = run.init_state()
    before = jax.device_get(teacher_params)
    batch = run.place_batch(random_batch(cfg))
    losses = []
    for _ in range(2):
        state, m = run(state, batch, jax.random.PRNGKey(0))
        losses.append(float(m["loss"]))
    assert_trees_equal(teacher_params, before)  # still alive (not donated) and unchanged
    assert run.traces == 1
    assert set(flat(state.opt_state[0].mu)) == set(flat(student.abstract_params))

    # The objective reads it: another teacher, another loss, no recompilation.
    plain = run.objective.loss(student.model, jax.device_get(state.params),
                               jax.device_get(batch), jax.random.PRNGKey(0), deterministic=True,
                               aux={"teacher": jax.tree_util.tree_map(jnp.zeros_like, before)})
    mine = run.objective.loss(student.model, jax.device_get(state.params), jax.device_get(batch),
                              jax.random.PRNGKey(0), deterministic=True, aux={"teacher": before})
    assert float(plain[0]) != float(mine[0])

    # A teacher of other shapes is refused before anything compiles, naming the array.
    wrong = build(tiny_config(d_model=24, num_heads=2, mlp_dim=32), devices[:1])
    with pytest.raises(ConfigError, match=r"auxiliary input \['teacher'\]\['block_0'\].* has "
                                          r"shape .*the objective expects"):
        step_lib.JitTrainStep(student, objective, tx, schedule,
                              aux={"teacher": jax.jit(wrong.init_params)(jax.random.PRNGKey(0))})
    with pytest.raises(ConfigError, match=r"auxiliary input \['teacher'\].* is missing"):
        step_lib.JitTrainStep(student, objective, tx, schedule, aux={})
    # A teacher that reads other tokens does not fit the objective at all.
    other_cfg = tiny_config(d_model=16, num_heads=2, mlp_dim=32, vocab_size=300)
    other_cfg.data.tokenizer = "byte:bert"
    with pytest.raises(ConfigError, match=r"auxiliary model 'teacher' reads tokenizer"):
        WithTeacher(student, build(other_cfg, devices[:1]))


def test_extra_state_is_made_carried_and_saved(tmp_path):
    """State that is not parameters (here one mask per kernel, as pruning keeps) is made
    sharded like its parameters, goes through every step untouched, and round-trips a
    checkpoint."""
    cfg = tiny_config()
    cfg.mesh.update(strategy="fsdp", data=1, fsdp=2)
    masks = lambda params: jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, jnp.bool_), params)
    run = build_train(cfg, jax.devices()[:2], init_extra=masks)
    state = run.init_state()
    kernel = ("block_0", "mlp", "fc_in", "kernel")
    get = lambda tree: tree[kernel[0]][kernel[1]][kernel[2]][kernel[3]]
    assert get(state.extra).sharding.spec == get(state.params).sharding.spec
    state, _ = run(state, run.place_batch(random_batch(cfg)), jax.random.PRNGKey(0))
    assert_trees_equal(state.extra, masks(jax.device_get(run.params(state))))
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state, {"layout": checkpoint.STATE_LAYOUT})
    ckpt.wait()
    restored, _ = ckpt.restore(1, run.abstract_state, run.state_shardings)
    ckpt.close()
    assert_trees_equal(restored, state)


# ----------------------------------------------------------------------------- two-phase gradient


def test_per_example_work_runs_inside_the_microbatch_scan():
    """A grad_fn that clips every example's gradient (DP-SGD's first half) plugs into
    local_sums unchanged: with a bound no example reaches it equals the plain sums, and
    with a small bound every example contributes at most that norm."""
    cfg = tiny_config()
    run = build_train(cfg, jax.devices()[:1])
    state = run.init_state()
    batch = {k: jnp.asarray(v) for k, v in random_batch(cfg).items()}
    loss = step_lib.bind_loss(run.objective, run.setup.model, run.split, {}, None)

    def clipped(bound):
        def grad_fn(params, micro, rng):
            def one(example):
                rows = jax.tree_util.tree_map(lambda x: x[None], example)
                return step_lib.value_and_grad(loss)(params, rows, rng)
            (l, (w, m)), g = jax.vmap(one)(micro)  # this microbatch's examples only
            norms = jnp.sqrt(sum(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)
                                 for x in jax.tree_util.tree_leaves(g)))
            factor = jnp.minimum(1.0, bound / norms)
            g = jax.tree_util.tree_map(
                lambda x: jnp.tensordot(factor, x, axes=1), g)
            return (l.sum(), (w.sum(), jax.tree_util.tree_map(jnp.sum, m))), g
        return grad_fn

    sums = jax.jit(lambda g: step_lib.local_sums(state.params, batch, jax.random.PRNGKey(0),
                                                 grad_fn=g, microbatches=4,
                                                 metrics=("accuracy",)), static_argnums=0)
    plain = sums(step_lib.value_and_grad(loss))
    loose, tight = sums(clipped(1e9)), sums(clipped(1e-3))
    # Equal up to float summation order (per-example sums add in another order), relative
    # to the largest entry: some gradients (the key bias's) are zero up to rounding.
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(plain))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-6 * scale), loose, plain)
    norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(tight.grads))))
    assert norm <= 1e-3 * cfg.train.batch_size * (1 + 1e-5)
    final = step_lib.finalize(plain, clip_norm=0.0)
    np.testing.assert_allclose(final.metrics["loss"], plain.loss / plain.weight, rtol=1e-6)
    assert bool(final.finite)


# ----------------------------------------------------------------------------- layout versions


def _downgrade(tree):
    """This jaxlm's params tree (or one mirroring it) in layout 1: query/key/value apart."""
    out = {}
    for path, x in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
        if "qkv" not in path:
            out[path] = x
            continue
        i = path.index("qkv")  # kernel [(layers,) D, 3, HK], bias [(layers,) 3, HK]
        for j, name in enumerate(("query", "key", "value")):
            out[path[:i] + (name,) + path[i + 1:]] = np.take(x, j, axis=x.ndim - 2)
    return flax.traverse_util.unflatten_dict(out)


def _write_layout_1(src, dst):
    """A copy of workdir `src` as the jaxlm before layout 2 wrote it."""
    shutil.copytree(src, dst, ignore=lambda d, names: ["checkpoints"] if d == str(src) else [])
    reader = checkpoint.Checkpointer(src, read_only=True)
    writer = checkpoint.Checkpointer(dst)
    from jaxlm.upgrade import read_raw
    for s in reader.steps():
        state = read_raw(src / "checkpoints" / str(s) / "state")
        adam, masked, sched = state["opt_state"]
        adam = {**adam, "mu": _downgrade(adam["mu"]), "nu": _downgrade(adam["nu"])}
        old = {"step": state["step"], "params": _downgrade(state["params"]),
               "opt_state": [None, [adam, masked, sched]]}
        meta = {k: v for k, v in reader.read_meta(s).items()
                if k not in ("layout", "sha256", "checksums")}
        writer.save(s, old, meta)
    writer.wait()
    writer.close()
    reader.close()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_layout_1_is_refused_then_upgraded_and_resumes_bitwise(tmp_path, scan):
    from jaxlm.upgrade import upgrade

    def cfg(steps):
        c = tiny_config(scan_layers=scan)
        c.train.steps, c.checkpoint.every = steps, 2
        return c
    devices = jax.devices()[:1]
    loop.train(cfg(4), tmp_path / "whole", devices)
    loop.train(cfg(2), tmp_path / "new", devices)
    _write_layout_1(tmp_path / "new", tmp_path / "old")

    before = sorted(p.name for p in (tmp_path / "old" / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=r"state layout 1.*python -m jaxlm.upgrade "
                                              r"--src=.*old --output="):
        loop.train(cfg(4), tmp_path / "old", devices)
    assert sorted(p.name for p in (tmp_path / "old" / "checkpoints").iterdir()) == before

    assert upgrade(tmp_path / "old", tmp_path / "upgraded") == [2]
    run = build_train(cfg(4), devices)
    restored = [checkpoint.Checkpointer(tmp_path / w, read_only=True).restore(
        2, run.abstract_state, run.state_shardings)[0] for w in ("new", "upgraded")]
    assert_trees_equal(restored[0], restored[1])
    loop.train(cfg(4), tmp_path / "upgraded", devices)
    final = [checkpoint.Checkpointer(tmp_path / w, read_only=True).restore(
        4, run.abstract_state, run.state_shardings)[0] for w in ("whole", "upgraded")]
    assert_trees_equal(final[0], final[1])
    with pytest.raises(ConfigError, match="already exists"):
        upgrade(tmp_path / "old", tmp_path / "upgraded")
