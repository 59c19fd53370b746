"""What training builds on top of jaxlm.setup: the objective, the optimizer and the
compiled step (jaxlm.train.step.JitTrainStep, or the pmap adapter)."""

from __future__ import annotations

import copy
import pathlib

import ml_collections

from jaxlm import checkpoint
from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.models import transforms
from jaxlm.setup import build
from jaxlm.train import objectives, optimizer, pmap, step
from jaxlm.trainable import Trainable


def build_train(cfg: ml_collections.ConfigDict, devices=None, aux=None, init_extra=None):
    """`build` plus what training needs: the objective, the optimizer and the compiled step
    (jaxlm.train.step.JitTrainStep, or the pmap adapter when config.parallelism = pmap).
    `aux(setup) -> tree` makes the step's auxiliary inputs on its mesh (e.g. a teacher's
    params); `init_extra(params) -> tree` its extra state (both: JitTrainStep)."""
    setup = build(cfg, devices)
    if transforms.is_quantized(setup.cfg) and not setup.cfg.lora.rank:  # QLoRA: frozen int8
        raise ConfigError(f"config.quant.mode={setup.cfg.quant.mode!r} without "
                          "config.quant.train: training needs float weights; pass "
                          "--config.quant.train=true (quantization-aware training), "
                          "quantize after training with python -m jaxlm.quantize, or train "
                          "LoRA adapters over the int8 weights (config.lora.rank)")
    objective = objectives.make_objective(cfg, setup.tokenizer)
    inputs = aux(setup) if aux else None
    if isinstance(objective, objectives.Distill):
        teacher, teacher_params = load_teacher(cfg, setup)
        objective.with_teacher(teacher.model, teacher.abstract_params)
        inputs = {**(inputs or {}), "teacher": teacher_params}
    split = Trainable.of(setup.cfg, setup.abstract_params)  # pruning: trainables only
    tx = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps, cfg.prune,
                                  split.split(setup.abstract_params)[0])
    schedule = optimizer.learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    kind = pmap.PmapTrainStep if cfg.parallelism == "pmap" else step.JitTrainStep
    train_step = kind(setup, objective, tx, schedule, aux=inputs, init_extra=init_extra)
    dp, micro = train_step.data_parallel, cfg.train.microbatches
    if cfg.train.batch_size % (dp * micro):
        raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"the data-parallel size {dp} x config.train.microbatches={micro}")
    return train_step


def load_teacher(cfg: ml_collections.ConfigDict, setup):
    """(Setup, params) of config.distill.teacher, a workdir (its latest checkpoint) or a
    params export, built on the student's devices with the student's mesh rules (so its
    params are sharded as the student's are), after checking that its predictions compare
    with the student's: the same tokenizer and vocabulary, a causal model for a causal
    student, as many classes for a classifier."""
    spec = cfg.distill.teacher
    what = f"config.distill.teacher={spec!r}"
    if not spec:
        raise ConfigError("config.train.objective='distill' needs config.distill.teacher (a "
                          "workdir or a params export)")
    path = pathlib.Path(spec).expanduser()
    if not (checkpoint.is_export(path) or (path / "checkpoints").is_dir()):
        raise ConfigError(f"{what}: not a jaxlm workdir or params export")
    meta = checkpoint.latest_meta(path, what)
    tcfg = config_lib.from_dict(meta["config"], what)
    transforms.refuse_quantized(tcfg, what)
    tcfg.mesh = copy.deepcopy(cfg.mesh)
    tcfg.evaluate.params = str(path) if checkpoint.is_export(path) else ""
    tcfg.checkpoint.step = -1
    teacher = build(tcfg, setup.mesh.devices.flatten())
    objectives.check_aux_model(what, setup, teacher)
    if teacher.family.causal != setup.family.causal or \
            tcfg.model.num_classes != cfg.model.num_classes:
        kind = lambda c, s: f"{c.model.num_classes} classes" if c.model.num_classes else (  # noqa: E731
            "a causal LM" if s.family.causal else "a masked LM")
        raise ConfigError(f"{what} is {kind(tcfg, teacher)} ({tcfg.model.arch}); the student "
                          f"is {kind(cfg, setup)}: their predictions do not compare")
    params, _ = checkpoint.load_params(tcfg, teacher, path)
    return teacher, params
