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
import ml_collections
import optax

from jaxlm import checkpoint, sharding
from jaxlm.config import ConfigError, to_json
from jaxlm.data import lm
from jaxlm.data.tokenizer import Tokenizer, get_tokenizer
from jaxlm.models.gpt import GPT, count_params, flops_per_token
from jaxlm.train import metrics as metrics_lib
from jaxlm.train import optimizer, step as step_lib

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
    if cfg.train.batch_size % (dp * cfg.train.microbatches):
        raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"the data-parallel size {dp} x config.train.microbatches="
                          f"{cfg.train.microbatches}")
    boxed = step_lib.abstract_state(model, tx, cfg.data.seq_len)
    sharding.check_divisible(boxed, mesh, cfg.mesh)
    shardings = sharding.logical_shardings(boxed, mesh, cfg.mesh)
    return Setup(cfg, tokenizer, model, tx, schedule, mesh, shardings, nn.meta.unbox(boxed))


def restore_or_init(setup: Setup, ckpt: checkpoint.Checkpointer):
    """(state, next_sample): resume from the workdir's latest checkpoint, else a fresh init."""
    if ckpt.check_compatible(setup.cfg, setup.tokenizer) is not None:
        step = ckpt.latest_step()
        state, meta = ckpt.restore(step, setup.abstract_state, setup.shardings)
        log.info("resumed from %s at step %d", ckpt.directory, step)
        return state, meta["data"]["next_sample"]
    return setup.init_state(), 0


def train(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Pretrains to config.train.steps (resuming if the workdir has a checkpoint).

    Returns a summary: final step, last logged loss, parameter count, wall time.
    """
    workdir = pathlib.Path(workdir)
    setup = build(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
    state, next_sample = restore_or_init(setup, ckpt)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(to_json(cfg))

    B, T = cfg.train.batch_size, cfg.data.seq_len
    start = int(state.step)
    if next_sample != start * B:
        raise ConfigError(f"checkpoint data position {next_sample} does not match step {start} "
                          f"x config.train.batch_size={B}; the batch size changed mid-run")
    n_params = count_params(state.params)
    fpt = flops_per_token(cfg.model, T)
    peak = metrics_lib.peak_flops_per_device(cfg.hardware.peak_flops)
    log.info("model: %s parameters, %.3g training FLOPs/token; mesh %s; steps %d -> %d",
             f"{n_params:,}", fpt, dict(setup.mesh.shape), start, cfg.train.steps)

    run_step = setup.compile_step()
    state = setup.to_device(state)
    source = lm.make_source(cfg.data, setup.tokenizer)
    batches = lm.Batches(source, start, B, cfg.model.vocab_size, setup.place_batch,
                         cfg.data.prefetch)
    sink = metrics_lib.MetricSink(workdir, cfg.train.steps, start)
    rng = jax.random.PRNGKey(cfg.train.seed + 1)

    t_begin = time.time()
    window = (start, time.time())  # (step, time) where the throughput window starts
    pending = None                 # (step, device metrics) of the step before: read one late
    last = {}

    def report(step, device_metrics):
        """Blocks on a finished step's metrics, writes them, restarts the window."""
        nonlocal window
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.time()
        tps = (step - window[0]) * B * T / (now - window[1])
        m.update(perplexity=math.exp(min(m["loss"], 30.0)), tokens_per_second=tps,
                 mfu=metrics_lib.mfu(fpt, tps, jax.device_count(), peak))
        del m["tokens"]
        sink.write(step, m)
        window = (step, now)
        return m

    try:
        for step in range(start, cfg.train.steps):
            state, device_metrics = run_step(state, next(batches), rng)
            done = step + 1
            if pending is not None:
                p_step, p_metrics = pending
                if p_step == start + 1:  # the first step includes compilation: not timed
                    jax.block_until_ready(p_metrics)
                    window = (p_step, time.time())
                elif p_step % cfg.train.log_every == 0:
                    last = report(p_step, p_metrics)
            pending = (done, device_metrics)
            sink.advance()
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                loss = float(device_metrics["loss"])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {done}; not saving a "
                                             "checkpoint of a diverged state")
                ckpt.save(done, setup.from_device(state),
                          checkpoint.make_meta(cfg, setup.tokenizer, done * B),
                          force=True)
        if pending is not None and pending[0] > window[0]:
            last = report(*pending)
    finally:
        batches.close()
        sink.close()
        ckpt.wait()
        ckpt.close()
    return {"step": int(setup.from_device(state).step), "loss": last.get("loss"), "params": n_params,
            "seconds": time.time() - t_begin}

