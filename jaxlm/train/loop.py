"""The pretraining loop: build -> restore or init -> step, log, checkpoint.

`python -m jaxlm.train --config=FILE --workdir=DIR` runs it; `jaxlm.main` chains it with
few-shot evaluation. Re-running on the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxlm import checkpoint, sharding
from jaxlm.config import ConfigError, to_json
from jaxlm.data import lm
from jaxlm.data.tokenizer import Tokenizer, get_tokenizer
from jaxlm.models.gpt import GPT, count_params, flops_per_token
from jaxlm.train import metrics as metrics_lib
from jaxlm.train import optimizer, step as step_lib
from jaxlm.train.nonfinite import NonfiniteGuard
from jaxlm.train.preemption import Preemption
from jaxlm.watchdog import Watchdog

log = logging.getLogger("jaxlm")


@dataclasses.dataclass
class Setup:
    """Everything a run builds from its config before touching data or checkpoints."""
    cfg: ml_collections.ConfigDict
    tokenizer: Tokenizer
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    shardings: object          # NamedShardings of the train state
    abstract_state: object     # its shapes/dtypes (unboxed)

    @property
    def pmap(self) -> bool:
        return self.cfg.parallelism == "pmap"

    def init_state(self) -> step_lib.TrainState:
        return step_lib.create_state(self.model, self.tx, self.cfg.data.seq_len,
                                     jax.random.PRNGKey(self.cfg.train.seed), self.shardings)

    def compile_step(self):
        """`run(state, batch, rng) -> (state, metrics)`; under pmap the state it takes and
        returns is replicated (`to_device` / `from_device` convert)."""
        if self.pmap:
            return step_lib.compile_pmap_train_step(self.model, self.tx, self.schedule,
                                                    self.cfg.train.microbatches)
        return step_lib.compile_train_step(self.model, self.tx, self.schedule,
                                           self.cfg.train.microbatches, self.mesh,
                                           self.cfg.mesh, self.shardings)

    def to_device(self, state):
        return step_lib.replicate(state) if self.pmap else state

    def from_device(self, state):
        return step_lib.unreplicate(state) if self.pmap else state

    def place_batch(self, local_batch: dict) -> dict:
        """This process's numpy rows -> device arrays in the layout the step expects."""
        if self.pmap:
            n, sh = jax.local_device_count(), step_lib.pmap_sharding()
            return {k: jax.device_put(v.reshape((n, -1) + v.shape[1:]), sh)
                    for k, v in local_batch.items()}
        batch_sharding = sharding.batch_sharding(self.mesh, self.cfg.mesh)
        return {k: jax.make_array_from_process_local_data(batch_sharding, v)
                for k, v in local_batch.items()}


def build(cfg: ml_collections.ConfigDict, devices=None) -> Setup:
    """Model, optimizer, mesh and state shardings from the config (all devices by default)."""
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"config.model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"{tokenizer.name} tokenizer's {tokenizer.vocab_size} ids")
    model = GPT(cfg.model)
    tx = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps)
    schedule = optimizer.learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    if cfg.parallelism == "pmap":  # built on one device, then replicated by to_device
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1},
                                  jax.devices()[:1])
        dp = jax.local_device_count()
    else:
        mesh = sharding.make_mesh(cfg.mesh, devices)
        dp = sharding.data_parallel_size(mesh, cfg.mesh)
        if cfg.data.seq_len % mesh.shape["sequence"]:
            raise ConfigError(f"config.data.seq_len={cfg.data.seq_len} is not divisible by the "
                              f"sequence axis ({mesh.shape['sequence']})")
        heads = sharding.split_count(mesh, cfg.mesh, "heads")
        if cfg.model.num_heads % heads:  # kernels are [D, H*K]: a split must not cut a head
            raise ConfigError(f"config.model.num_heads={cfg.model.num_heads} is not divisible "
                              f"by the {heads} parts config.mesh.strategy="
                              f"{cfg.mesh.strategy!r} splits heads into")
    if cfg.train.batch_size % (dp * cfg.train.microbatches):
        raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"the data-parallel size {dp} x config.train.microbatches="
                          f"{cfg.train.microbatches}")
    boxed = step_lib.abstract_state(model, tx, cfg.data.seq_len)
    sharding.check_divisible(boxed, mesh, cfg.mesh)
    shardings = sharding.logical_shardings(boxed, mesh, cfg.mesh)
    return Setup(cfg, tokenizer, model, tx, schedule, mesh, shardings, nn.meta.unbox(boxed))


def restore_or_init(setup: Setup, ckpt: checkpoint.Checkpointer):
    """(state, meta): resume from the workdir's latest checkpoint (meta: its metadata),
    else a fresh init (meta None)."""
    meta = ckpt.check_compatible(setup.cfg, setup.tokenizer)
    if meta is None:
        return setup.init_state(), None
    step = ckpt.latest_step()
    state, meta = ckpt.restore(step, setup.abstract_state, setup.shardings)
    log.info("resumed from %s at step %d", ckpt.directory, step)
    return state, meta


def train(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, devices=None) -> dict:
    """Pretrains to config.train.steps (resuming if the workdir has a checkpoint), on
    `devices` (default: all).

    Returns a summary: final step, last logged loss, parameter count, wall time, and
    whether the run stopped early for a preemption (SIGTERM), after saving.
    """
    workdir = pathlib.Path(workdir)
    setup = build(cfg, devices)
    workdir.mkdir(parents=True, exist_ok=True)
    watchdog = Watchdog(cfg.checkpoint.heartbeat_seconds, cfg.checkpoint.timeout_seconds)
    ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint, watchdog)
    state, meta = restore_or_init(setup, ckpt)
    source = lm.make_source(cfg.data, setup.tokenizer)
    if meta:
        checkpoint.check_data(meta, source.fingerprint(), cfg.checkpoint, ckpt.latest_step())
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(to_json(cfg))

    B, T = cfg.train.batch_size, cfg.data.seq_len
    start = int(state.step)
    next_sample = meta["data"]["next_sample"] if meta else 0
    if next_sample != start * B:
        raise ConfigError(f"checkpoint data position {next_sample} does not match step {start} "
                          f"x config.train.batch_size={B}; the batch size changed mid-run")
    # Dropout randomness: step s uses fold_in(rng, s), so the key is all the RNG state.
    rng = (jnp.asarray(meta["rng"], jnp.uint32) if meta
           else jax.random.PRNGKey(cfg.train.seed + 1))
    guard = NonfiniteGuard(cfg.train, meta.get("skipped_steps", []) if meta else [])
    last_saved = start if meta else None

    n_params = count_params(state.params)
    n_devices = jax.device_count() if setup.pmap else setup.mesh.size
    fpt = flops_per_token(cfg.model, T)
    peak = metrics_lib.peak_flops_per_device(cfg.hardware.peak_flops)
    log.info("model: %s parameters, %.3g training FLOPs/token; mesh %s; steps %d -> %d",
             f"{n_params:,}", fpt, dict(setup.mesh.shape), start, cfg.train.steps)

    run_step = setup.compile_step()
    state = setup.to_device(state)
    log.info("data: %s", lm.describe(source, start * B, cfg.train.steps * B))
    batches = lm.Batches(source, start, B, cfg.model.vocab_size, setup.place_batch,
                         cfg.data.prefetch)
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
            state, device_metrics = run_step(state, next(batches), rng)
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
                ckpt.save(done, setup.from_device(state),
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
    return {"step": int(setup.from_device(state).step), "loss": last.get("loss"),
            "params": n_params, "seconds": time.time() - t_begin, "preempted": preempted,
            "skipped_steps": len(guard.skipped)}
