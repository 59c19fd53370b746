"""The pretraining loop: build -> restore or init -> step, log, checkpoint.

`python -m jaxlm.train --config=FILE --workdir=DIR` runs it; `jaxlm.main` chains it with
few-shot evaluation. Re-running on the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import checkpoint, files, models
from jaxlm import tracking
from jaxlm import workdir as workdir_lib
from jaxlm.config import from_dict, to_json
from jaxlm.data import batches as batches_lib
from jaxlm.data import sources
from jaxlm.errors import CheckpointError, ConfigError, Interrupted, JaxlmError
from jaxlm.train.build import build_train
from jaxlm.train import metrics as metrics_lib
from jaxlm.train import init as init_lib
from jaxlm.train import privacy, prune
from jaxlm.train.nonfinite import NonfiniteGuard
from jaxlm.train.preemption import Preemption
from jaxlm.train.profile import StepProfiler
from jaxlm.watchdog import Watchdog

log = logging.getLogger("jaxlm")


@dataclasses.dataclass
class Hooks:
    """What a caller plugs into the loop; the defaults pretrain. jaxlm.finetune brings its
    data, init and validation; jaxlm.train and jaxlm.main bring the few-shot evaluation of
    config.evaluate.every (jaxlm.evaluate.fewshot.during_training). The loop imports no
    evaluation: evaluation is a client of training, so its caller wires it in.

    source:         examples by global index; None: the one config.data describes.
    init_params:    setup -> params to start from when the workdir has no checkpoint (the
                    parameters it returns replace those of a fresh init); None: fresh.
    evaluate:       (setup, params, step) -> {name: value}, run every `evaluate_every`
                    steps and at the end; the values go to the metrics (metrics.jsonl, tb).
    """
    source: object = None
    init_params: Callable | None = None
    evaluate: Callable | None = None
    evaluate_every: int = 0


def _refuse_changed(section: str, saved, now, enabled: Callable, directory) -> None:
    """One line naming the first field of config.<section> that differs from the one the
    checkpoints were made with, when either side enables the feature."""
    if not (enabled(saved) or enabled(now)):
        return
    for field in now:
        if saved[field] != now[field]:
            raise CheckpointError(
                f"config.{section}.{field}={now[field]!r}, but the checkpoints in {directory} "
                f"were made with {saved[field]!r}; pass the same config.{section} to resume, "
                "or use another --workdir")


def restore_or_init(step, ckpt: checkpoint.Checkpointer, init_params: Callable | None = None):
    """(state, meta): resume from the workdir's latest checkpoint (meta: its metadata),
    else a fresh init (meta None), from `init_params(setup)` if given. A damaged latest
    checkpoint is named together with the newest older one that is intact. The restore
    order: resume > init_params > random."""
    setup = step.setup
    meta = ckpt.check_compatible(setup.cfg, setup.tokenizer)
    if meta is None:
        return step.init_state(init_params(setup) if init_params else None), None
    latest = ckpt.latest_step()
    if latest > setup.cfg.train.steps:
        raise CheckpointError(f"config.train.steps={setup.cfg.train.steps} is below the step of "
                              f"the latest checkpoint in {ckpt.directory} ({latest}); raise it to "
                              "continue the run, or use another --workdir")
    saved = meta["config"]["train"].get("trainable", [])
    if tuple(saved) != tuple(setup.cfg.train.trainable):
        raise CheckpointError(f"config.train.trainable={tuple(setup.cfg.train.trainable)!r}, but "
                              f"the checkpoints in {ckpt.directory} train {tuple(saved)!r}; pass "
                              "the same value to resume, or use another --workdir")
    made_with = from_dict(meta["config"], f"checkpoints in {ckpt.directory}")
    for section, enabled in (("prune", prune.enabled), ("privacy", privacy.enabled)):
        # the masks and schedule, or the epsilon and sampling, would no longer add up
        _refuse_changed(section, made_with[section], setup.cfg[section], enabled,
                        ckpt.directory)
    restore = lambda s: ckpt.restore(s, step.abstract_state, step.state_shardings)
    state, meta = ckpt.restore_or_name_intact(
        latest, restore, lambda i: f"move {ckpt.directory / str(latest)} out of "
        f"{ckpt.directory} and run again to resume from step {i}")
    if meta.get("frozen"):
        step.frozen = checkpoint.load_frozen(ckpt.directory.parent, meta, step.abstract_frozen,
                                             step.frozen_shardings, ckpt.verify)
    log.info("resumed from %s at step %d", ckpt.directory, latest)
    return state, meta


def _claim(workdir: pathlib.Path):
    """Process 0 locks the workdir (jaxlm.workdir); every process learns whether it could."""
    claim, error = workdir_lib.NO_CLAIM, None
    if jax.process_index() == 0:
        try:
            claim = workdir_lib.claim(workdir)
        except JaxlmError as e:
            error = e
    if jax.process_count() > 1:
        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = ConfigError(f"--workdir={workdir}: process 0 could not take it (see its log)")
    if error is not None:
        raise error
    return claim


def _resume_checked(train_step, workdir, source, watchdog, init_params):
    """(state, meta, first step) of the run, after every check that can refuse it: a
    checkpoint of another model, damaged, of other data, another batch size, or past
    config.train.steps. Reads only: a refused run leaves the workdir as it was."""
    cfg = train_step.setup.cfg
    reader = checkpoint.Checkpointer(workdir, cfg.checkpoint, watchdog, read_only=True)
    try:
        state, meta = restore_or_init(train_step, reader, init_params)
        latest = reader.latest_step()
    finally:
        reader.close()
    start = int(state.step)
    if meta:
        checkpoint.check_data(meta, source.fingerprint(), cfg.checkpoint, latest)
        B = cfg.train.batch_size
        if meta["data"]["next_sample"] != start * B:
            raise CheckpointError(f"checkpoint data position {meta['data']['next_sample']} does "
                                  f"not match step {start} x config.train.batch_size={B}; the "
                                  "batch size changed mid-run")
    return state, meta, start


def train(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, devices=None,
          hooks: Hooks | None = None) -> dict:
    """Pretrains to config.train.steps (resuming if the workdir has a checkpoint), on
    `devices` (default: all), with what `hooks` plugs in (None: plain pretraining; the
    caller wires config.evaluate.every, see Hooks). Nothing is written to the workdir until
    every check passed.

    Returns a summary: final step, last logged loss, parameter count, wall time, whether
    the run stopped early for a preemption (SIGTERM, after saving), steps skipped for a
    non-finite loss, and how often the step was compiled (1 unless something is wrong).
    """
    workdir = workdir_lib.check(workdir, must_exist=False)
    claim = _claim(workdir)
    try:
        return _train(cfg, workdir, devices, claim, hooks or Hooks())
    finally:
        claim.release()


def _init_params(cfg, hooks: Hooks) -> Callable | None:
    """What a run without a checkpoint starts from: the caller's (fine-tuning), else
    config.train.init (continued pretraining: jaxlm.train.init), else random."""
    if hooks.init_params is not None:
        if cfg.train.init:
            raise ConfigError(f"config.train.init={cfg.train.init!r}: this command starts from "
                              "its own init (fine-tuning: config.finetune.init); leave it empty")
        return hooks.init_params
    if cfg.finetune.init:
        raise ConfigError(f"config.finetune.init={cfg.finetune.init!r} is read by python -m "
                          "jaxlm.finetune; to continue pretraining from a model, set "
                          "config.train.init")
    if cfg.train.init:
        return lambda setup: init_lib.pretrained_params(cfg, setup, cfg.train.init,
                                                        "config.train.init")
    return None


def _train(cfg, workdir: pathlib.Path, devices, claim, hooks: Hooks) -> dict:
    train_step = build_train(cfg, devices)
    setup, objective = train_step.setup, train_step.objective
    source = hooks.source or sources.make_source(cfg.data, setup.tokenizer, objective.extra_tokens)
    watchdog = Watchdog(cfg.checkpoint.heartbeat_seconds, cfg.checkpoint.timeout_seconds)
    state, meta, start = _resume_checked(train_step, workdir, source, watchdog,
                                         _init_params(cfg, hooks))
    plan = privacy.make_plan(cfg, source, meta)  # DP-SGD's checks that need the data
    if plan:
        train_step.set_privacy(plan.l2_clip, plan.noise_std, plan.denominator)
        log.info("%s", plan.describe())

    claim.accept()  # the run is accepted: from here on it writes
    if jax.process_index() == 0:
        workdir_lib.write_text(workdir / "config.json", to_json(cfg))
    frozen = meta.get("frozen") if meta else None  # the frozen base, saved once per run
    if train_step.frozen and frozen is None:
        frozen = checkpoint.save_frozen(workdir, train_step.frozen, cfg, setup.tokenizer)
    ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint, watchdog)
    try:
        return _run(cfg, workdir, train_step, source, ckpt, watchdog, state, meta, start, hooks,
                    frozen, plan)
    finally:
        try:
            ckpt.wait()  # a failed save surfaces here at the latest
        finally:
            ckpt.close()


def _run(cfg, workdir, train_step, source, ckpt, watchdog, state, meta, start, hooks,
         frozen, plan=None) -> dict:
    """The steps, with logging, checkpoints, preemption and the NaN policy; with a privacy
    `plan` (jaxlm.train.privacy) its sampled batches, and epsilon in the metrics, every
    checkpoint's meta and the summary."""
    setup, objective = train_step.setup, train_step.objective
    B, T = cfg.train.batch_size, cfg.data.seq_len
    # Dropout randomness: step s uses fold_in(rng, s), so the key is all the RNG state
    # (DP-SGD: the run's secret key, which also draws the samples and the noise).
    rng = (jnp.asarray(meta["rng"], jnp.uint32) if meta
           else jnp.asarray(plan.key) if plan else jax.random.PRNGKey(cfg.train.seed + 1))
    read, make_example = source, objective.example
    if plan:
        read = plan.sampled(source)
        make_example = read.make_example(objective.example)
    guard = NonfiniteGuard(cfg.train, meta.get("skipped_steps", []) if meta else [])
    last_saved = start if meta else None

    n_params = models.count_params(setup.abstract_params)
    n_trainable = models.count_params(train_step.abstract_state.params)
    n_devices = train_step.num_devices
    fpt = setup.family.flops_per_token(cfg.model, T)
    peak = metrics_lib.peak_flops_per_device(cfg.hardware.peak_flops)
    log.info("model: %s parameters%s, %.3g training FLOPs/token; mesh %s; steps %d -> %d",
             f"{n_params:,}", f" ({n_trainable:,} trained)" if n_trainable < n_params else "",
             fpt, dict(setup.mesh.shape), start, cfg.train.steps)

    state = train_step.place_state(state)
    log.info("data: %s", sources.describe(source, start * B, cfg.train.steps * B))
    t_begin = time.time()
    window = (start, time.time())  # (step, time) where the throughput window starts
    pending = None                 # (step, device metrics) of the step before: read one late
    last, stopped = {}, None

    def report(step, device_metrics):
        """Writes a finished step's metrics, restarts the throughput window. The first
        step of a run includes compilation: its throughput is not measured."""
        nonlocal window
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.time()
        tps = (step - window[0]) * B * T / (now - window[1]) if step > start + 1 else None
        if objective.tokens_loss:  # a perplexity only for token losses
            m["perplexity"] = math.exp(min(m["loss"], 30.0))
        m.update(tokens_per_second=tps,
                 mfu=metrics_lib.mfu(fpt, tps, n_devices, peak) if tps else None,
                 skipped_steps=len(guard.skipped),
                 eta_seconds=(cfg.train.steps - step) * B * T / tps if tps else None)
        if plan:
            m["epsilon"] = plan.epsilon(step)
        del m["tokens"], m["nonfinite"]
        sink.write(step, m)
        window = (step, now)
        return m

    with contextlib.ExitStack() as closing:
        batches = closing.enter_context(contextlib.closing(batches_lib.Batches(
            read, start, B, cfg.model.vocab_size, make_example, train_step.place_batch,
            cfg.data.prefetch, objective.batch_spec(B))))
        sink = closing.enter_context(contextlib.closing(
            metrics_lib.MetricSink(workdir, cfg.train.steps, start, tracking.start(
                cfg, workdir, "train", jax.process_index() == 0))))
        preemption = closing.enter_context(contextlib.closing(Preemption()))
        profiler = closing.enter_context(contextlib.closing(
            StepProfiler(cfg.train.profile_steps, workdir)))
        for step in range(start, cfg.train.steps):
            profiler.before(step)
            state, device_metrics = train_step(state, next(batches), rng)
            done = step + 1
            profiler.after(done, state)
            if pending is not None:
                # Waiting for the step before keeps one step queued on the devices while
                # the host looks at its flags (and notices a hung collective).
                p_step, p_metrics = pending
                with watchdog.watch(f"waiting for step {p_step}"):
                    guard.check(p_step, p_metrics, last_saved)
                if p_step % cfg.train.log_every == 0:
                    last = report(p_step, p_metrics)
                elif p_step == start + 1:  # the first step includes compilation: not timed
                    window = (p_step, time.time())
            pending = (done, device_metrics)
            sink.advance()
            stopped = preemption.reached(done)
            if hooks.evaluate and (done % hooks.evaluate_every == 0 or done == cfg.train.steps):
                with watchdog.watch(f"waiting for step {done}"):
                    guard.check(done, device_metrics, last_saved)
                sink.write(done, hooks.evaluate(setup, train_step.params(state), done))
            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps or stopped:
                with watchdog.watch(f"waiting for step {done}"):
                    guard.check(done, device_metrics, last_saved)
                meta_now = checkpoint.make_meta(cfg, setup.tokenizer, done * B,
                                                source.fingerprint(), rng, guard.skipped, frozen)
                if plan:  # the guarantee of the params saved (and the noise, for resumes)
                    meta_now["privacy"] = plan.record(done)
                ckpt.save(done, train_step.global_state(state), meta_now)
                last_saved = done
            if stopped:
                break
        if pending is not None and pending[0] > window[0]:
            last = report(*pending)
    if stopped == "Ctrl-C":
        ckpt.wait()
        raise Interrupted(f"interrupted (Ctrl-C): saved checkpoint {last_saved}; run the same "
                          "command to continue")
    if stopped:
        log.warning("preempted (%s): saved step %d; exiting", stopped, last_saved)
    if train_step.traces > 1:  # every step has the same shapes: one compilation is enough
        log.warning("the train step was compiled %d times; batches changed shape or dtype",
                    train_step.traces)
    final_step = int(train_step.global_state(state).step)
    return {"step": final_step, "loss": last.get("loss"),
            "params": n_params, "seconds": time.time() - t_begin, "preempted": bool(stopped),
            "skipped_steps": len(guard.skipped), "compiles": train_step.traces,
            **({"privacy": plan.record(final_step)} if plan else {})}
