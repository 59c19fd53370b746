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

A GLUE task (config.finetune.glue_task, configs/bert/glue.py; jaxlm.data.glue) sets the
data, the head (one output, a regression, for STS-B) and the class names, and adds the
task's official metrics and its score `glue` to every validation; MNLI's run also scores
dev_mismatched at the end. `--predict=DIR` writes the GLUE test-server files of the best
params (DIR/<TASK>.tsv; MNLI: MNLI-m.tsv, MNLI-mm.tsv and AX.tsv). `python -m jaxlm.glue`
runs the whole suite.

`--evaluate=DATA` scores the best params of WORKDIR (or its latest checkpoint, when it has
no best yet; or the export --config.evaluate.params, e.g. WORKDIR/best quantized by
python -m jaxlm.quantize) on any labelled data (same forms as config.finetune.validation_data) and
writes WORKDIR/evaluation-<DATA>.json.
"""

from __future__ import annotations

import copy
import json
import logging
import pathlib
import re

import jax
import ml_collections
import numpy as np

from jaxlm import cli, finetuning, models, tracking
from jaxlm import config as config_lib
from jaxlm import workdir as workdir_lib
from jaxlm.data import glue as glue_data
from jaxlm.data import labelled
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.runlog import read_history

log = logging.getLogger("jaxlm")

# Shared with jaxlm.squad (jaxlm.finetuning); under their old names here as well.
run_config, load_pretrained = finetuning.run_config, finetuning.load_pretrained
_best_params = finetuning.best_params

EVALUATE = cli.Flag("evaluate", "score the best params on this labelled data instead of "
                    "training (a file, tfds:NAME:SPLIT or synthetic:facts:SPLIT)", "",
                    metavar="DATA")
PREDICT = cli.Flag("predict", "write the GLUE test-server files of the best params into "
                   "this folder (config.finetune.glue_task)", "", metavar="DIR")


def configure(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with config.finetune.glue_task's settings filled in where they are at
    their defaults: the data (glue:TASK:train, the task's first dev split), num_classes and
    class_names. A value the task contradicts is refused naming its field."""
    name = cfg.finetune.glue_task
    if not name:
        return cfg
    task = glue_data.task(name)
    base = config_lib.base_config()
    out = copy.deepcopy(cfg)
    for section, field, value in (("model", "num_classes", task.num_classes),
                                  ("finetune", "class_names", task.class_names)):
        given = cfg[section][field]
        given = tuple(given) if isinstance(given, (list, tuple)) else given
        if given == base[section][field]:
            out[section][field] = value
        elif given != value:
            raise ConfigError(f"config.{section}.{field}={given!r} does not fit "
                              f"config.finetune.glue_task={name!r} ({value!r}); leave it unset")
    for field, split in (("train_data", "train"), ("validation_data", task.dev[0])):
        given = cfg.finetune[field]
        if given == base.finetune[field]:
            out.finetune[field] = f"glue:{name}:{split}"
        elif not given.startswith(f"glue:{name}:"):
            raise ConfigError(f"config.finetune.{field}={given!r} is not data of "
                              f"config.finetune.glue_task={name!r}: leave it unset (glue:{name}:"
                              f"{split}) or name one of its splits, glue:{name}:SPLIT")
    return out


def check_metric(cfg: ml_collections.ConfigDict) -> None:
    """Refuses a head or selection metric that cannot work together (after configure)."""
    n, metric = cfg.model.num_classes, cfg.finetune.best_metric
    if n < 1:
        raise ConfigError(f"config.model.num_classes={n}: fine-tuning needs at least 2 "
                          "classes (or 1: a regression head)")
    if metric == "glue" and not cfg.finetune.glue_task:
        raise ConfigError("config.finetune.best_metric='glue' is a GLUE task's official score: "
                          "it needs config.finetune.glue_task")
    if n == 1 and metric not in ("pearson", "spearman", "glue"):
        raise ConfigError(f"config.finetune.best_metric={metric!r} scores classes; "
                          "config.model.num_classes=1 is a regression: use pearson, spearman "
                          "(or glue with a GLUE task)")
    if n > 1 and metric in ("pearson", "spearman"):
        raise ConfigError(f"config.finetune.best_metric={metric!r} scores a regression "
                          f"(config.model.num_classes=1); with {n} classes use accuracy, f1, "
                          "f1_macro, mcc or roc_auc")
    if metric == "f1" and n != 2:
        raise ConfigError(f"config.finetune.best_metric='f1' is binary F1, defined for 2 "
                          f"classes; config.model.num_classes={n}: use "
                          "f1_macro (or accuracy, mcc, roc_auc)")


def scores(cfg: ml_collections.ConfigDict, labels: np.ndarray, outputs: np.ndarray) -> dict:
    """The validation metrics of `outputs` (class probabilities [N, C], or scores [N, 1]
    of a regression head); a GLUE task's official metrics and score `glue` on top, computed
    as jaxlm.evaluate.glue writes them."""
    from jaxlm.evaluate import classification
    from jaxlm.evaluate import glue as glue_eval
    if cfg.model.num_classes == 1:
        out = glue_eval.regression_metrics(labels, outputs[:, 0])
    else:
        out = classification.metrics(labels, outputs)
    if cfg.finetune.glue_task:
        out.update(glue_eval.task_metrics(glue_data.TASKS[cfg.finetune.glue_task], labels, outputs))
    return out


def _loss(labels: np.ndarray, outputs: np.ndarray) -> float:
    """Mean cross-entropy of class probabilities, or mean squared error of scores [N, 1]."""
    if outputs.shape[1] == 1:
        return float(np.mean((outputs[:, 0] - labels) ** 2))
    return float(-np.mean(np.log(np.maximum(outputs[np.arange(len(labels)), labels], 1e-12))))


def read_data(cfg, spec: str, what: str) -> labelled.Labelled:
    try:
        reader = glue_data.read if spec.startswith("glue:") else labelled.read
        return reader(spec, cfg.finetune, cfg.model.num_classes, cfg.data.data_dir)
    except ConfigError as e:
        raise ConfigError(f"config.finetune.{what}={spec!r}: {e}") from None


class Validation(finetuning.Validation):
    """Scores the validation examples after each epoch (classification metrics, a GLUE
    task's on top); keeps the best params in WORKDIR/best (jaxlm.finetuning.Validation)."""

    def measure(self, setup, params) -> dict:
        """The validation metrics of `params` (jaxlm.squad's subclass: EM and F1)."""
        from jaxlm.evaluate import classification
        probs, labels = classification.predict(setup, params, self.source,
                                               self.cfg.evaluate.batch_size)
        found = scores(self.cfg, labels, probs)
        found["loss"] = _loss(labels, probs)
        return found


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

    cfg = configure(cfg)
    check_metric(cfg)
    workdir = workdir_lib.check(workdir, must_exist=False)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    train_source, val_source = _sources(cfg, tokenizer)
    other_dev = _other_dev_sources(cfg, tokenizer)
    missing = sorted(set(range(cfg.model.num_classes)) - {int(r["label"]) for r in val_source.encoded})
    if cfg.finetune.best_metric == "roc_auc" and missing and cfg.model.num_classes > 1:
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
    found = scores(run, labels, probs)
    history = read_history(workdir)
    out = {"best_step": best_step, "best_metric": cfg.finetune.best_metric,
           "validation": found,
           **{split: _score(run, setup, params, source) for split, source in other_dev.items()},
           "train_examples": len(train_source),
           "validation_examples": len(val_source),
           "truncated": {"training": train_source.encoder.truncated,
                         "validation": val_source.encoder.truncated},
           "epochs": [{k[11:]: v for k, v in h.items() if k.startswith("validation_")} | {"step": h["step"]}
                      for h in history if "validation_loss" in h],
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
            best = {f"best/{k}": v for k, v in found.items() if isinstance(v, float)}
            tracker.log(summary["step"], best)
            tracker.images(summary["step"], written)
            tracker.summary({**best, "best/step": best_step})
            tracker.close()
        print(f"\nValidation at the best step ({best_step}, by {cfg.finetune.best_metric}): "
              + "  ".join(f"{k} {v:.4f}" for k, v in found.items() if isinstance(v, float)),
              flush=True)
    return out


def _score(cfg, setup, params, source) -> dict:
    from jaxlm.evaluate import classification
    probs, labels = classification.predict(setup, params, source, cfg.evaluate.batch_size)
    return scores(cfg, labels, probs)


def _other_dev_sources(cfg, tokenizer) -> dict:
    """A GLUE task's dev splits besides the validation data (MNLI: dev_mismatched), read
    (and checked) before training: {split: LabelledSource}."""
    if not cfg.finetune.glue_task:
        return {}
    task = glue_data.TASKS[cfg.finetune.glue_task]
    specs = {split: f"glue:{task.name}:{split}" for split in task.dev}
    return {split: labelled.LabelledSource(read_data(cfg, spec, "glue_task"),
                                           _encoder(cfg, tokenizer), cfg.train.seed)
            for split, spec in specs.items() if spec != cfg.finetune.validation_data}


def predict_glue(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, folder: str) -> list:
    """Writes the GLUE test-server files of the best params of `workdir` into `folder`:
    <TASK>.tsv (MNLI: MNLI-m.tsv, MNLI-mm.tsv, and AX.tsv when GLUE's diagnostic/ folder is
    in config.finetune.glue_dir). Every test file is read and checked first: a bad one
    stops the command before anything is written."""
    from jaxlm.evaluate import classification
    from jaxlm.evaluate import glue as glue_eval
    from jaxlm.setup import build
    cfg = configure(cfg)
    if not cfg.finetune.glue_task:
        raise ConfigError("--predict writes GLUE test predictions: it needs "
                          "config.finetune.glue_task")
    task = glue_data.TASKS[cfg.finetune.glue_task]
    workdir = workdir_lib.check(workdir, must_exist=True)
    wanted = [(task, split, name) for split, name in task.test.items()]
    diagnostic = pathlib.Path(cfg.finetune.glue_dir).expanduser() / glue_data.AX.folder
    if task.name == "mnli" and cfg.finetune.glue_dir and diagnostic.is_dir():
        wanted += [(glue_data.AX, "test", "AX.tsv")]
    tests = [(t, name, *glue_data.read_split(t, split, cfg.finetune.glue_dir, cfg.data.data_dir))
             for t, split, name in wanted]
    run = copy.deepcopy(cfg)
    run.train.objective = "classification"
    setup = build(run)
    params, step = _best_params(run, setup, workdir)
    files = {}
    for t, name, data, ids in tests:
        source = labelled.LabelledSource(data, _encoder(run, setup.tokenizer), run.train.seed)
        outputs, _ = classification.predict(setup, params, source, run.evaluate.batch_size)
        files[name] = glue_eval.submission_lines(t, ids, outputs)
    written = []
    if jax.process_index() == 0:
        out = pathlib.Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        try:
            for name, text in files.items():
                workdir_lib.write_text(out / name, text)
                written.append(out / name)
        except OSError:  # all or none: the files written before the failure go too
            for path in written:
                path.unlink(missing_ok=True)
            raise
        print(f"GLUE test predictions of step {step}: " + ", ".join(str(p) for p in written),
              flush=True)
    return written


def evaluate_file(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, spec: str) -> dict:
    """Scores the best params of `workdir` (else its checkpoint config.checkpoint.step) on
    the labelled data `spec`; writes WORKDIR/evaluation.json."""
    from jaxlm.evaluate import classification
    from jaxlm.setup import build

    workdir = workdir_lib.check(workdir, must_exist=True)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    cfg = configure(cfg)
    check_metric(cfg)
    data = read_data(cfg, spec, "--evaluate")
    source = labelled.LabelledSource(data, _encoder(cfg, tokenizer), cfg.train.seed)
    run = copy.deepcopy(cfg)
    run.train.objective = "classification"
    setup = build(run)
    params, step = _best_params(run, setup, workdir)
    probs, labels = classification.predict(setup, params, source, run.evaluate.batch_size)
    out = {"data": spec, "step": step, **scores(run, labels, probs),
           "truncated": source.encoder.truncated}
    if jax.process_index() == 0:
        name = re.sub(r"[^\w.-]+", "_", spec).strip("_")
        workdir_lib.write_text(workdir / f"evaluation-{name}.json", json.dumps(out, indent=2))
        print("  ".join(f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float)), flush=True)
    return out


def main(argv) -> dict:
    args = cli.parse(argv, "jaxlm.finetune", __doc__, flags=[EVALUATE, PREDICT])
    cli.start(args.config)
    if args.flags["predict"]:
        return predict_glue(args.config, args.workdir, args.flags["predict"])
    if args.flags["evaluate"]:
        return evaluate_file(args.config, args.workdir, args.flags["evaluate"])
    return finetune(args.config, args.workdir)


if __name__ == "__main__":
    cli.run(main)
