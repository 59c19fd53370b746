"""What training builds on top of jaxlm.setup: the objective, the optimizer and the
compiled step (jaxlm.train.step.JitTrainStep, or the pmap adapter)."""

from __future__ import annotations

import ml_collections

from jaxlm.errors import ConfigError
from jaxlm.setup import build
from jaxlm.train import objectives, optimizer, pmap, step


def build_train(cfg: ml_collections.ConfigDict, devices=None, aux=None, init_extra=None):
    """`build` plus what training needs: the objective, the optimizer and the compiled step
    (jaxlm.train.step.JitTrainStep, or the pmap adapter when config.parallelism = pmap).
    `aux(setup) -> tree` makes the step's auxiliary inputs on its mesh (e.g. a teacher's
    params); `init_extra(params) -> tree` its extra state (both: JitTrainStep)."""
    setup = build(cfg, devices)
    objective = objectives.make_objective(cfg, setup.tokenizer)
    tx = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps)
    schedule = optimizer.learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    kind = pmap.PmapTrainStep if cfg.parallelism == "pmap" else step.JitTrainStep
    train_step = kind(setup, objective, tx, schedule, aux=aux(setup) if aux else None,
                      init_extra=init_extra)
    dp, micro = train_step.data_parallel, cfg.train.microbatches
    if cfg.train.batch_size % (dp * micro):
        raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"the data-parallel size {dp} x config.train.microbatches={micro}")
    return train_step

