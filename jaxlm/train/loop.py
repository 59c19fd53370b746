"""The pretraining loop: build -> restore or init -> step, log, checkpoint.

`python -m jaxlm.train --config=FILE --workdir=DIR` runs it; `jaxlm.main` chains it with
few-shot evaluation. Re-running on the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import checkpoint, models
from jaxlm.config import to_json
from jaxlm.data import batches as batches_lib
from jaxlm.data import sources
from jaxlm.errors import CheckpointError
from jaxlm.setup import build_train
from jaxlm.train import metrics as metrics_lib
from jaxlm.train.nonfinite import NonfiniteGuard
from jaxlm.train.preemption import Preemption
from jaxlm.watchdog import Watchdog

log = logging.getLogger("jaxlm")


def restore_or_init(step, ckpt: checkpoint.Checkpointer):
    """(state, meta): resume from the workdir's latest checkpoint (meta: its metadata),
    else a fresh init (meta None)."""
    setup = step.setup
    meta = ckpt.check_compatible(setup.cfg, setup.tokenizer)
    if meta is None:
        return step.init_state(), None
    latest = ckpt.latest_step()
    state, meta = ckpt.restore(latest, step.abstract_state, step.state_shardings)
    log.info("resumed from %s at step %d", ckpt.directory, latest)
    return state, meta


def train(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, devices=None) -> dict:
    """Pretrains to config.train.steps (resuming if the workdir has a checkpoint), on
    `devices` (default: all).

    Returns a summary: final step, last logged loss, parameter count, wall time, whether
    the run stopped early for a preemption (SIGTERM, after saving), steps skipped for a
    non-finite loss, and how often the step was compiled (1 unless something is wrong).
    """
    workdir = pathlib.Path(workdir)
    train_step = build_train(cfg, devices)
    setup, objective = train_step.setup, train_step.objective
    workdir.mkdir(parents=True, exist_ok=True)
    watchdog = Watchdog(cfg.checkpoint.heartbeat_seconds, cfg.checkpoint.timeout_seconds)
    ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint, watchdog)
    state, meta = restore_or_init(train_step, ckpt)
    source = sources.make_source(cfg.data, setup.tokenizer, objective.extra_tokens)
    if meta:
        checkpoint.check_data(meta, source.fingerprint(), cfg.checkpoint, ckpt.latest_step())
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(to_json(cfg))

    B, T = cfg.train.batch_size, cfg.data.seq_len
    start = int(state.step)
    next_sample = meta["data"]["next_sample"] if meta else 0
    if next_sample != start * B:
        raise CheckpointError(f"checkpoint data position {next_sample} does not match step "
                              f"{start} x config.train.batch_size={B}; the batch size changed "
                              "mid-run")
    # Dropout randomness: step s uses fold_in(rng, s), so the key is all the RNG state.
    rng = (jnp.asarray(meta["rng"], jnp.uint32) if meta
           else jax.random.PRNGKey(cfg.train.seed + 1))
    guard = NonfiniteGuard(cfg.train, meta.get("skipped_steps", []) if meta else [])
    last_saved = start if meta else None

    n_params = models.count_params(train_step.abstract_state.params)
    n_devices = train_step.num_devices
    fpt = setup.family.flops_per_token(cfg.model, T)
    peak = metrics_lib.peak_flops_per_device(cfg.hardware.peak_flops)
    log.info("model: %s parameters, %.3g training FLOPs/token; mesh %s; steps %d -> %d",
             f"{n_params:,}", fpt, dict(setup.mesh.shape), start, cfg.train.steps)

    state = train_step.place_state(state)
    log.info("data: %s", sources.describe(source, start * B, cfg.train.steps * B))
    batches = batches_lib.Batches(source, start, B, cfg.model.vocab_size, objective.example,
                                  train_step.place_batch, cfg.data.prefetch)
    sink = metrics_lib.MetricSink(workdir, cfg.train.steps, start)
    preemption = Preemption()

    t_begin = time.time()
    window = (start, time.time())  # (step, time) where the throughput window starts
    pending = None                 # (step, device metrics) of the step before: read one late
    last, preempted = {}, False

    def report(step, device_metrics):
        """Writes a finished step's metrics, restarts the throughput window. The first
        step of a run includes compilation: its throughput is not measured."""
        nonlocal window
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.time()
        tps = (step - window[0]) * B * T / (now - window[1]) if step > start + 1 else None
        m.update(perplexity=math.exp(min(m["loss"], 30.0)), tokens_per_second=tps,
                 mfu=metrics_lib.mfu(fpt, tps, n_devices, peak) if tps else None,
                 skipped_steps=len(guard.skipped))
        del m["tokens"], m["nonfinite"]
        sink.write(step, m)
        window = (step, now)
        return m

    try:
        for step in range(start, cfg.train.steps):
            state, device_metrics = train_step(state, next(batches), rng)
            done = step + 1
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
            preempted = preemption.reached(done)
            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps or preempted:
                with watchdog.watch(f"waiting for step {done}"):
                    guard.check(done, device_metrics, last_saved)
                ckpt.save(done, train_step.global_state(state),
                          checkpoint.make_meta(cfg, setup.tokenizer, done * B, source.fingerprint(),
                                               rng, guard.skipped))
                last_saved = done
            if preempted:
                log.warning("preempted (SIGTERM): saved step %d; exiting", done)
                break
        if pending is not None and pending[0] > window[0]:
            last = report(*pending)
    finally:
        batches.close()
        sink.close()
        preemption.close()
        ckpt.wait()
        ckpt.close()
    if train_step.traces > 1:  # every step has the same shapes: one compilation is enough
        log.warning("the train step was compiled %d times; batches changed shape or dtype",
                    train_step.traces)
    return {"step": int(train_step.global_state(state).step), "loss": last.get("loss"),
            "params": n_params, "seconds": time.time() - t_begin, "preempted": preempted,
            "skipped_steps": len(guard.skipped), "compiles": train_step.traces}
