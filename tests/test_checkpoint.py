"""Checkpointing that never loses a run: exact resume after SIGKILL, SIGTERM preemption,
a kill in the middle of a save, restores onto other meshes, damaged and mismatched
checkpoints, non-finite losses, elastic resume, the watchdog, and params-only exports."""

import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, fresh_step, tiny_config
from test_main import TINY, tree_digest

from jaxlm import checkpoint, config, export, models
from jaxlm.errors import CheckpointError, Diverged
from jaxlm.checkpoint import load_params
from jaxlm.setup import build
from jaxlm.train.build import build_train
from jaxlm.train import loop
from jaxlm.runlog import read_history
from jaxlm.watchdog import HUNG_EXIT_CODE

needs_8 = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (fake) devices")


def train_cmd(workdir, *extra, config="gpt/debug.py"):
    return [sys.executable, "-m", "jaxlm.train", f"--config={REPO}/configs/{config}",
            f"--workdir={workdir}", *TINY, *extra]


# GPT, and BERT's masked-LM pretraining with sentence pairs and next-sentence prediction
# (masks, cuts and random B's are drawn from the seed and the example index).
PRETRAINING = {"gpt": ("gpt/debug.py", ()),
               "bert": ("bert/debug.py", ("--config.train.sentence_pairs=true",
                                          "--config.train.next_sentence=true"))}


def env_with_devices(n: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    return env


def run_beside(cmd: list[str], env: dict, log: pathlib.Path) -> subprocess.Popen:
    """Starts the uninterrupted reference run in the background, its output in `log` (a
    pipe nobody reads could fill and stall it), so that it compiles and trains while the
    run to be killed does: the two share the machine's cores instead of taking turns."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for_step(workdir: pathlib.Path, step: int, proc, timeout=300, saved=False):
    """Polls metrics.jsonl until it records `step` (the run logs every step) and, with
    `saved`, until a finished checkpoint exists."""
    path = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            output = [text for text in proc.communicate() if text]  # what was piped
            raise AssertionError("the run ended before it could be interrupted" +
                                 (":\n" + output[-1][-2000:] if output else ""))
        if (path.exists() and any(h["step"] >= step for h in read_history(workdir))
                and (not saved or any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir()))):
            return
        time.sleep(0.005)
    raise TimeoutError(f"step {step} not reached")


def saved_params(workdir, step):
    """The params of checkpoint `step`, restored with the config it was saved with."""
    ckpt = checkpoint.Checkpointer(workdir)
    cfg = config.from_dict(ckpt.read_meta(step)["config"])
    cfg.mesh.update(config.base_config().mesh.to_dict())  # on one device, whatever wrote it
    run = build_train(cfg, jax.devices()[:1])
    state, _ = ckpt.restore(step, run.abstract_state, run.state_shardings)
    ckpt.close()
    return jax.tree_util.tree_map(np.asarray, state.params)


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- exact resume


@needs_8
@pytest.mark.parametrize("arch", list(PRETRAINING))
def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(tmp_path, arch):
    config, extra = PRETRAINING[arch]
    steps = ("--config.train.steps=40", "--config.train.log_every=1", "--config.checkpoint.every=8",
             *extra)
    full = run_beside(train_cmd(tmp_path / "full", *steps, config=config), env_with_devices(8),
                      tmp_path / "full.log")
    kill_at = random.Random().randint(10, 30)
    print(f"SIGKILL after step {kill_at}")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, *steps, config=config), env=env_with_devices(8),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(killed, kill_at, proc, saved=True)
        proc.send_signal(signal.SIGKILL)
        assert full.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]
    finally:
        for p in (proc, full):  # nothing outlives the test
            p.kill()
            p.wait()
    latest = checkpoint.Checkpointer(killed).latest_step()
    assert latest is not None and latest < 40, "the kill must land before the end"
    again = subprocess.run(train_cmd(killed, *steps, config=config), capture_output=True,
                           text=True, env=env_with_devices(8), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints'} at step {latest}" in again.stderr

    a, b = read_history(tmp_path / "full"), read_history(killed)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 41))
    assert [h["loss"] for h in a] == [h["loss"] for h in b]          # bitwise, every step
    assert [h["grad_norm"] for h in a] == [h["grad_norm"] for h in b]
    assert_trees_equal(saved_params(tmp_path / "full", 40), saved_params(killed, 40))


# ----------------------------------------------------------------------------- preemption


@needs_8
def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path):
    cmd = train_cmd(tmp_path, "--config.train.steps=100000", "--config.train.log_every=1",
                    "--config.checkpoint.every=1000")
    proc = subprocess.Popen(cmd, env=env_with_devices(8), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(tmp_path, 5, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    saved = checkpoint.Checkpointer(tmp_path).steps()
    assert len(saved) == 1 and 5 <= saved[0] < 1000, saved
    assert f"preempted (SIGTERM): saved step {saved[0]}; exiting" in out
    assert "Few-shot results" not in out


def _local_launcher():
    import importlib.util
    spec = importlib.util.spec_from_file_location("local_launcher", REPO / "launch/local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    local = _local_launcher()
    cmds = local.commands(2, 4, local.free_port(),
                          train_cmd(tmp_path, "--config.train.steps=100000",
                                    "--config.train.log_every=1",
                                    "--config.checkpoint.every=1000")[1:])
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(c, env=local.child_env(4), stdout=f, stderr=subprocess.STDOUT)
             for c, f in zip(cmds, logs)]
    try:
        wait_for_step(tmp_path, 5, procs[0])
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for f in logs:
            f.close()
    texts = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], texts[0][-2000:] + texts[1][-2000:]
    saved = checkpoint.Checkpointer(tmp_path).steps()
    assert len(saved) == 1 and 5 <= saved[0] < 1000, saved
    for text in texts:
        assert f"preempted (SIGTERM): saved step {saved[0]}; exiting" in text


# ----------------------------------------------------------------------------- kill mid-save

_SAVE_THEN_DIE = textwrap.dedent("""
    import os, signal, sys, time
    import jax.numpy as jnp
    from jaxlm import checkpoint
    workdir, delay = sys.argv[1], float(sys.argv[2])
    ckpt = checkpoint.Checkpointer(workdir)
    state = lambda v: {"w": jnp.full((2048, 2048), v, jnp.float32), "step": jnp.int32(v)}
    ckpt.save(1, state(1.0), {"step": 1})
    ckpt.wait()
    ckpt.save(2, state(2.0), {"step": 2})   # asynchronous: returns while it is written
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_restorable(tmp_path):
    partial = 0
    for i, delay in enumerate([0.0, 0.0, 0.01, 0.05]):
        workdir = tmp_path / str(i)
        proc = subprocess.run([sys.executable, "-c", _SAVE_THEN_DIE, str(workdir), str(delay)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        entries = [p.name for p in (workdir / "checkpoints").iterdir()]
        partial += any("tmp" in name for name in entries)
        ckpt = checkpoint.Checkpointer(workdir)
        assert ckpt.latest_step() in (1, 2)
        for step in ckpt.steps():
            target = {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32),
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}
            shardings = jax.tree_util.tree_map(
                lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
            state, meta = ckpt.restore(step, target, shardings)
            assert meta["step"] == step and int(state["step"]) == step  # checksums verified
            assert float(state["w"].min()) == float(state["w"].max()) == float(step)
        ckpt.close()
    # The test is only a test if some kill landed while step 2 was being written.
    assert partial >= 1


# ----------------------------------------------------------------------------- other meshes


def _mesh_cfg(strategy, **axes):
    cfg = tiny_config(vocab_size=264)   # divisible by a tensor axis of 4 or 8
    cfg.mesh.update(strategy=strategy, **axes)
    return cfg


@needs_8
def test_fsdp_checkpoint_restores_on_one_device_and_on_fsdp_x_tensor(tmp_path):
    cfg = _mesh_cfg("fsdp", data=1, fsdp=8)
    cfg.train.steps, cfg.checkpoint.every = 3, 3
    loop.train(cfg, tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path)
    fsdp = build_train(cfg)
    original, _ = ckpt.restore(3, fsdp.abstract_state, fsdp.state_shardings)
    fc = models.block_params(original.params, 0)["mlp"]["fc_in"]["kernel"]
    assert fc.addressable_shards[0].data.size == fc.size // 8   # really saved from 8 shards

    for devices, target in [(jax.devices()[:1], _mesh_cfg("dp", data=1)),
                            (None, _mesh_cfg("fsdp_tp", data=1, fsdp=2, tensor=4))]:
        run = build_train(target, devices)
        state, _ = ckpt.restore(3, run.abstract_state, run.state_shardings)
        for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(run.state_shardings)):
            assert got.sharding == want
        assert_trees_equal(jax.device_get(state), jax.device_get(original))
    ckpt.close()


# ----------------------------------------------------------------------------- bad checkpoints


def _tiny_run_cfg():
    cfg = tiny_config()
    cfg.train.steps, cfg.checkpoint.every = 4, 2
    return cfg


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    loop.train(_tiny_run_cfg(), workdir)
    return workdir


@pytest.fixture
def trained(trained_once, tmp_path):
    """(config, workdir) of a 4-step run with checkpoints at steps 2 and 4 (a fresh copy)."""
    shutil.copytree(trained_once, tmp_path, dirs_exist_ok=True)
    return _tiny_run_cfg(), tmp_path


def assert_refused_untouched(cfg, workdir, match):
    """Training on `workdir` (to step 8) fails with `match`, and no file there changes."""
    before = tree_digest(workdir / "checkpoints")
    cfg.train.steps = 8
    with pytest.raises(CheckpointError, match=match):
        loop.train(cfg, workdir)
    assert tree_digest(workdir / "checkpoints") == before


def test_truncated_checkpoint_file_is_named_and_nothing_is_overwritten(trained):
    cfg, tmp_path = trained
    files = sorted((p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*")
                    if p.is_file() and p.stat().st_size > 1000), key=lambda p: -p.stat().st_size)
    files[0].write_bytes(files[0].read_bytes()[:100])   # truncate the largest data file
    assert_refused_untouched(cfg, tmp_path, r"checkpoints/4 cannot be read .*damaged")


def test_missing_meta_is_named(trained):
    cfg, tmp_path = trained
    shutil.rmtree(tmp_path / "checkpoints" / "4" / "meta")
    with pytest.raises(CheckpointError, match=r"checkpoints/4/meta cannot be read"):
        loop.train(cfg, tmp_path)


def test_missing_step_lists_the_ones_there(trained):
    cfg, tmp_path = trained
    cfg.checkpoint.step = 3
    setup = build(cfg)
    with pytest.raises(CheckpointError, match=r"config.checkpoint.step=3: .* \[2, 4\]"):
        load_params(cfg, setup, tmp_path)
    cfg.checkpoint.step = 2
    params, step = load_params(cfg, setup, tmp_path)   # params only: no optimizer state read
    assert step == 2
    ckpt = checkpoint.Checkpointer(tmp_path)
    run = build_train(cfg)
    state, _ = ckpt.restore(2, run.abstract_state, run.state_shardings)
    ckpt.close()
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(state.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, state.params)


@pytest.mark.parametrize("field,value", [("num_layers", 3), ("vocab_size", 300)])
def test_other_model_shape_is_named(trained, field, value):
    cfg, tmp_path = trained
    cfg.model[field] = value
    assert_refused_untouched(cfg, tmp_path, rf"config.model.{field} is \S+ there and {value} here")


def test_other_data_is_refused_unless_allowed(trained):
    cfg, tmp_path = trained
    cfg.data.seed = 1   # another synthetic world: other samples at the same indices
    assert_refused_untouched(cfg, tmp_path, r"checkpoint 4 was trained on other data")
    cfg.checkpoint.check_data = False
    cfg.train.steps = 5
    assert loop.train(cfg, tmp_path)["step"] == 5


def test_other_tokenizer_is_named(trained):
    cfg, tmp_path = trained
    ckpt = checkpoint.Checkpointer(tmp_path)
    meta = ckpt.read_meta(4)
    ckpt.close()
    meta["tokenizer"]["name"] = "sentencepiece"
    setup = build(cfg)
    with pytest.raises(CheckpointError, match="made with tokenizer .*sentencepiece.* but config.data.tokenizer"):
        checkpoint.check_meta(meta, cfg, setup.tokenizer, "here")


def test_arrays_of_other_shapes_are_named(tmp_path):
    """Same config, other model code (e.g. a kernel stored [D, H, K] read as [D, H*K])."""
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, {"q": jnp.ones((4, 2, 3))}, {"step": 1})
    ckpt.wait()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(CheckpointError, match=r"other shapes .*\(4, 6\) .*stored shape: \(4, 2, 3\)"):
        ckpt.restore(1, {"q": jax.ShapeDtypeStruct((4, 6), jnp.float32)}, {"q": one})
    ckpt.close()


def test_keeps_the_latest_n_plus_every_mth(tmp_path):
    cfg = tiny_config()
    cfg.train.steps = 7
    cfg.checkpoint.update(every=1, keep=2, archive_every=3)
    loop.train(cfg, tmp_path)
    assert checkpoint.Checkpointer(tmp_path).steps() == [3, 6, 7]


# ----------------------------------------------------------------------------- NaN / inf


def test_nonfinite_step_is_not_applied():
    cfg = tiny_config()
    state, run = fresh_step(cfg, jax.devices()[:1])
    tokens = np.zeros((8, 33), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": np.full((8, 32), np.inf, np.float32)}   # an inf loss
    before = jax.device_get(state)
    after, metrics = run(state, batch, jax.random.PRNGKey(0))
    assert bool(metrics["nonfinite"]) and int(after.step) == 1
    assert_trees_equal(jax.device_get(after.params), before.params)
    assert_trees_equal(jax.device_get(after.opt_state), before.opt_state)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_diverging_run_never_checkpoints_a_nonfinite_state(tmp_path, policy):
    cfg = tiny_config()
    # A huge learning rate blows the params up on step 1; every later loss is inf/NaN.
    cfg.optimizer.update(learning_rate=1e30, warmup_steps=0, grad_clip_norm=0.0)
    cfg.train.update(steps=20, nonfinite=policy, max_skipped_steps=3)
    cfg.checkpoint.every = 1
    message = "Stopping .*nonfinite='stop'" if policy == "stop" else "4 steps in a row"
    with pytest.raises(Diverged, match=rf"step \d+.*{message}|{message}"):
        loop.train(cfg, tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path)
    for step in ckpt.steps():
        params = saved_params(tmp_path, step)
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
        if policy == "skip":
            assert ckpt.read_meta(step)["skipped_steps"] == list(range(2, step + 1))


# ----------------------------------------------------------------------------- elastic resume


@needs_8
@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_resume_on_fewer_devices_sees_the_same_samples(tmp_path, arch):
    """Elastic resume; for BERT with sentence pairs and next-sentence prediction, whose
    masks, cuts and random B's follow the global sample index."""
    if arch == "gpt":
        cfg = tiny_config()
    else:
        from conftest import tiny_bert_config
        cfg = tiny_bert_config()
        cfg.train.update(sentence_pairs=True, next_sentence=True)
    cfg.train.update(steps=6, log_every=1)
    cfg.checkpoint.every = 3
    loop.train(cfg, tmp_path / "full")
    cfg.train.steps = 3
    loop.train(cfg, tmp_path / "elastic")                        # 8 devices to step 3
    cfg.train.steps = 6
    loop.train(cfg, tmp_path / "elastic", jax.devices()[:2])     # 2 devices from step 3
    a, b = read_history(tmp_path / "full"), read_history(tmp_path / "elastic")
    assert [h["step"] for h in a] == [h["step"] for h in b]
    np.testing.assert_allclose([h["loss"] for h in a], [h["loss"] for h in b], rtol=1e-5)


# ----------------------------------------------------------------------------- watchdog


def test_watchdog_beats_then_ends_a_hung_operation():
    code = textwrap.dedent("""
        import logging, time
        logging.basicConfig(level=logging.INFO)
        from jaxlm.watchdog import Watchdog
        wd = Watchdog(heartbeat_seconds=0.2, timeout_seconds=1.0)
        with wd.watch("a quick thing"):
            time.sleep(0.05)
        with wd.watch("waiting at a barrier"):
            time.sleep(30)
        print("not reached")
    """)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == HUNG_EXIT_CODE and time.time() - t0 < 20
    assert "still waiting at a barrier after" in proc.stderr
    assert "waiting at a barrier did not finish in 1 s" in proc.stderr
    assert "a quick thing" not in proc.stderr and "not reached" not in proc.stdout
    assert "time.sleep(30)" in proc.stderr or "<string>" in proc.stderr   # the stack


# ----------------------------------------------------------------------------- exports


@needs_8
def test_export_loads_on_any_mesh_and_evaluates(tmp_path):
    cfg = _mesh_cfg("fsdp", data=1, fsdp=8)
    cfg.train.steps, cfg.checkpoint.every = 2, 2
    loop.train(cfg, tmp_path / "run")
    assert export.export(cfg, tmp_path / "run", tmp_path / "export") == 2
    with pytest.raises(Exception, match="already exists"):
        export.export(cfg, tmp_path / "run", tmp_path / "export")
    want = saved_params(tmp_path / "run", 2)
    for devices, target in [(jax.devices()[:1], _mesh_cfg("dp", data=1)),
                            (None, _mesh_cfg("fsdp_tp", data=1, fsdp=2, tensor=4))]:
        target.evaluate.params = str(tmp_path / "export")
        params, step = load_params(target, build(target, devices), tmp_path / "nowhere")
        assert step == 2
        assert_trees_equal(jax.device_get(params), want)
    other = _mesh_cfg("dp")
    other.model.num_layers = 3
    other.evaluate.params = str(tmp_path / "export")
    with pytest.raises(CheckpointError, match="config.model.num_layers is 2 there and 3 here"):
        load_params(other, build(other), tmp_path)
