"""Fine-tuning for sequence classification: a pretrained encoder (or GPT), a fresh head.

    python -m jaxlm.finetune --config=configs/bert/sst2.py --workdir=DIR \
        --config.finetune.init=runs/bert_debug
    python -m jaxlm.finetune --config=configs/bert/sst2.py --workdir=DIR --evaluate=FILE

The run starts from `config.finetune.init` (a jaxlm workdir, one of its checkpoints, or a
params export): every parameter of the pretrained model is restored and the
classification head (config.model.num_classes) is initialised fresh. The pretrained model
must be of the same family, shape and tokenizer; anything else is refused naming the field.
It then trains through the pretraining loop itself (jaxlm.train.loop: the same
checkpoints, preemption, NaN policy and exact resume; re-running the command continues an
interrupted run) for config.finetune.epochs passes over the training examples, with its
own learning rate, batch size and warmup, scores the validation examples after every
epoch, and keeps the params of the best epoch by config.finetune.best_metric in WORKDIR/best
(a params export). It ends by scoring the best params once more and writes
WORKDIR/results.json and WORKDIR/plots/{curves,roc,confusion}.png.

`--evaluate=DATA` scores the best params of WORKDIR (or its latest checkpoint, when it has
no best yet; or the export --config.evaluate.params, e.g. WORKDIR/best quantized by
python -m jaxlm.quantize) on any labelled data (same forms as config.finetune.validation_data) and
writes WORKDIR/evaluation-<DATA>.json.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pathlib
import re
import shutil

import jax
import ml_collections
import numpy as np

from jaxlm import checkpoint, cli, models, tracking
from jaxlm import config as config_lib
from jaxlm import workdir as workdir_lib
from jaxlm.data import labelled
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.runlog import read_history

log = logging.getLogger("jaxlm")

EVALUATE = cli.Flag("evaluate", "score the best params on this labelled data instead of "
                    "training (a file, tfds:NAME:SPLIT or synthetic:facts:SPLIT)", "",
                    metavar="DATA")


def run_config(cfg: ml_collections.ConfigDict, train_examples: int) -> ml_collections.ConfigDict:
    """The training config of a fine-tuning run: the classification objective, and steps,
    batch, learning rate, warmup and checkpoints derived from config.finetune."""
    from jaxlm.train.privacy import examples_per_step
    ft = cfg.finetune
    run = copy.deepcopy(cfg)
    # An epoch: as many examples as the training set (DP-SGD's Poisson sampling: on average)
    steps_per_epoch = math.ceil(train_examples / examples_per_step(cfg.privacy, ft.batch_size))
    steps = ft.epochs * steps_per_epoch
    # A fine-tuning run learns the labels, or with objective=distill a teacher's too.
    objective = "distill" if cfg.train.objective == "distill" else "classification"
    run.train.update(objective=objective, steps=steps, batch_size=ft.batch_size,
                     log_every=min(run.train.log_every, steps_per_epoch))
    run.optimizer.update(learning_rate=ft.learning_rate, warmup_steps=int(ft.warmup_ratio * steps))
    run.checkpoint.every = steps_per_epoch
    config_lib.validate(run)
    return run


def read_data(cfg, spec: str, what: str) -> labelled.Labelled:
    try:
        return labelled.read(spec, cfg.finetune, cfg.model.num_classes, cfg.data.data_dir)
    except ConfigError as e:
        raise ConfigError(f"config.finetune.{what}={spec!r}: {e}") from None


def load_pretrained(cfg, setup):
    """The params of config.finetune.init on `setup`'s mesh (jaxlm.train.init); the class
    head (config.model.num_classes) starts fresh."""
    from jaxlm.train.init import pretrained_params
    params = pretrained_params(cfg, setup, cfg.finetune.init, "config.finetune.init")
    log.info("fine-tuning with a fresh head of %d classes", cfg.model.num_classes)
    return params


class Validation:
    """Scores the validation examples after each epoch; keeps the best params in
    WORKDIR/best (a params export whose meta holds the epoch's metrics)."""

    def __init__(self, cfg, workdir: pathlib.Path, source: labelled.LabelledSource):
        self.cfg, self.source, self.metric = cfg, source, cfg.finetune.best_metric
        self.best_dir = pathlib.Path(workdir) / "best"
        old = self.best_dir.with_name("best.old")
        if old.is_dir() and not self.best_dir.exists():  # killed between the two renames
            os.rename(old, self.best_dir)
        self.best = self.best_metrics().get(self.metric)

    def best_metrics(self) -> dict:
        if not (self.best_dir / "meta").is_dir():
            return {}
        return checkpoint.read_export_meta(self.best_dir).get("metrics", {})

    def __call__(self, setup, params, step: int) -> dict:
        from jaxlm.evaluate import classification
        probs, labels = classification.predict(setup, params, self.source,
                                               self.cfg.evaluate.batch_size)
        scores = classification.metrics(labels, probs)
        scores["loss"] = float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))))
        value = scores.get(self.metric)
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            self._keep(setup, params, step, scores)
        return {f"validation_{k}": v for k, v in scores.items()
                if isinstance(v, float) or v is None}

    def _keep(self, setup, params, step: int, scores: dict) -> None:
        """Replaces WORKDIR/best: written beside it, then swapped in by renames."""
        new, old = self.best_dir.with_name("best.new"), self.best_dir.with_name("best.old")
        for leftover in (new, old):
            shutil.rmtree(leftover, ignore_errors=True)
        meta = {**checkpoint.make_export_meta(setup.cfg, setup.tokenizer, step), "metrics": scores}
        checkpoint.export_params(new, params, meta, "the best params so far")
        if jax.process_index() == 0:
            if self.best_dir.exists():
                os.rename(self.best_dir, old)
            os.rename(new, self.best_dir)
            shutil.rmtree(old, ignore_errors=True)
        log.info("step %d: best %s so far (%.4f); params kept in %s", step, self.metric,
                 scores[self.metric], self.best_dir)


def _best_params(cfg, setup, workdir: pathlib.Path):
    """(params, step) of the export config.evaluate.params (e.g. an int8 one, python -m
    jaxlm.quantize), else of WORKDIR/best, else of the checkpoint config.checkpoint.step."""
    best = workdir / "best"
    if cfg.evaluate.params or not (best / "meta").is_dir():
        return checkpoint.load_params(cfg, setup, workdir)
    meta = checkpoint.read_export_meta(best)
    checkpoint.check_meta(meta, cfg, setup.tokenizer, f"export {best}")
    return checkpoint.load_export(best, setup.abstract_params, setup.param_shardings, meta,
                                  cfg.checkpoint.verify), meta["step"]


def _encoder(cfg, tokenizer) -> labelled.Encoder:
    return labelled.Encoder(tokenizer, cfg.data.seq_len,
                            pooled=models.family(cfg.model.arch).pooled)


def _sources(cfg, tokenizer):
    encoder = _encoder(cfg, tokenizer)
    train = read_data(cfg, cfg.finetune.train_data, "train_data").take(cfg.finetune.train_examples)
    # Only training examples are augmented (config.finetune.augment; off by default).
    train_source = labelled.LabelledSource(train, encoder, cfg.train.seed,
                                           augment=cfg.finetune.augment)
    val_encoder = _encoder(cfg, tokenizer)
    validation = read_data(cfg, cfg.finetune.validation_data, "validation_data")
    val_source = labelled.LabelledSource(validation, val_encoder, cfg.train.seed)
    for name, enc, data in (("training", encoder, train), ("validation", val_encoder, validation)):
        log.info("%s examples: %d from %s; %d cut to config.data.seq_len=%d (longest part first)",
                 name, len(data), data.name, enc.truncated, cfg.data.seq_len)
    if train_source.augmenter:
        log.info("training examples augmented (config.finetune.augment): %s; %d words to "
                 "insert from", train_source.augmenter.rates, len(train_source.augmenter.vocabulary))
    return train_source, val_source


def finetune(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Trains (or resumes) the fine-tuning run of `cfg` in `workdir`; returns the results."""
    from jaxlm.evaluate import classification
    from jaxlm.setup import build
    from jaxlm.train import loop

    if cfg.model.num_classes < 2:
        raise ConfigError(f"config.model.num_classes={cfg.model.num_classes}: fine-tuning needs "
                          "at least 2 classes")
    if cfg.finetune.best_metric == "f1" and cfg.model.num_classes != 2:
        raise ConfigError(f"config.finetune.best_metric='f1' is binary F1, defined for 2 "
                          f"classes; config.model.num_classes={cfg.model.num_classes}: use "
                          "f1_macro (or accuracy, mcc, roc_auc)")
    workdir = workdir_lib.check(workdir, must_exist=False)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    train_source, val_source = _sources(cfg, tokenizer)
    missing = sorted(set(range(cfg.model.num_classes)) - {int(r["label"]) for r in val_source.encoded})
    if cfg.finetune.best_metric == "roc_auc" and missing:
        raise ConfigError(f"config.finetune.best_metric='roc_auc' needs every class among the "
                          f"validation examples (config.finetune.validation_data="
                          f"{cfg.finetune.validation_data!r} has none of class {missing[0]}): "
                          "pick another metric or other validation data")
    run = run_config(cfg, len(train_source))
    validation = Validation(run, workdir, val_source)
    hooks = loop.Hooks(source=train_source, evaluate=validation,
                       evaluate_every=run.checkpoint.every,
                       init_params=(lambda setup: load_pretrained(run, setup))
                       if cfg.finetune.init else None)
    summary = loop.train(run, workdir, hooks=hooks)
    if summary["preempted"]:
        return {"train": summary}

    setup = build(run)
    params, best_step = _best_params(run, setup, workdir)
    probs, labels = classification.predict(setup, params, val_source, run.evaluate.batch_size)
    scores = classification.metrics(labels, probs)
    history = read_history(workdir)
    out = {"best_step": best_step, "best_metric": cfg.finetune.best_metric,
           "validation": scores, "train_examples": len(train_source),
           "validation_examples": len(val_source),
           "truncated": {"training": train_source.encoder.truncated,
                         "validation": val_source.encoder.truncated},
           "epochs": [{k[11:]: v for k, v in h.items() if k.startswith("validation_")} | {"step": h["step"]}
                      for h in history if "validation_accuracy" in h],
           "train": summary,
           # DP-SGD: the guarantee of every params the run wrote, the best epoch's included
           # (picking it looked at the later epochs too): epsilon after the last step.
           **({"privacy": summary["privacy"]} if "privacy" in summary else {})}
    if jax.process_index() == 0:
        workdir_lib.write_text(workdir / "results.json", json.dumps(out, indent=2))
        names = list(cfg.finetune.class_names) or [str(c) for c in range(cfg.model.num_classes)]
        written = classification.write_plots(workdir / "plots", history, labels, probs, names)
        tracker = tracking.start(run, workdir, "finetune", is_writer=True)
        if tracker is not None:  # logged at the last step: W&B's steps only move forward
            best = {f"best/{k}": v for k, v in scores.items() if isinstance(v, float)}
            tracker.log(summary["step"], best)
            tracker.images(summary["step"], written)
            tracker.summary({**best, "best/step": best_step})
            tracker.close()
        print(f"\nValidation at the best step ({best_step}, by {cfg.finetune.best_metric}): "
              + "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)),
              flush=True)
    return out


def evaluate_file(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, spec: str) -> dict:
    """Scores the best params of `workdir` (else its checkpoint config.checkpoint.step) on
    the labelled data `spec`; writes WORKDIR/evaluation.json."""
    from jaxlm.evaluate import classification
    from jaxlm.setup import build

    workdir = workdir_lib.check(workdir, must_exist=True)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    data = read_data(cfg, spec, "--evaluate")
    source = labelled.LabelledSource(data, _encoder(cfg, tokenizer), cfg.train.seed)
    run = copy.deepcopy(cfg)
    run.train.objective = "classification"
    setup = build(run)
    params, step = _best_params(run, setup, workdir)
    probs, labels = classification.predict(setup, params, source, run.evaluate.batch_size)
    out = {"data": spec, "step": step, **classification.metrics(labels, probs),
           "truncated": source.encoder.truncated}
    if jax.process_index() == 0:
        name = re.sub(r"[^\w.-]+", "_", spec).strip("_")
        workdir_lib.write_text(workdir / f"evaluation-{name}.json", json.dumps(out, indent=2))
        print("  ".join(f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float)), flush=True)
    return out


def main(argv) -> dict:
    args = cli.parse(argv, "jaxlm.finetune", __doc__, flags=[EVALUATE])
    cli.start(args.config)
    if args.flags["evaluate"]:
        return evaluate_file(args.config, args.workdir, args.flags["evaluate"])
    return finetune(args.config, args.workdir)


if __name__ == "__main__":
    cli.run(main)
