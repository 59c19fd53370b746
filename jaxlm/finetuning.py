"""What fine-tuning commands share (jaxlm.finetune: classification; jaxlm.squad: span
extraction): the run's training config, the pretrained params with a fresh head, the
validation after each epoch that keeps the best params in WORKDIR/best, and reading them
back. Commands are leaves (no command imports another), so these live here.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import pathlib

import jax
import ml_collections

from jaxlm import checkpoint, files
from jaxlm import config as config_lib

log = logging.getLogger("jaxlm")


def run_config(cfg: ml_collections.ConfigDict, train_examples: int,
               objective: str = "classification") -> ml_collections.ConfigDict:
    """The training config of a fine-tuning run: `objective` (jaxlm.squad: span_extraction),
    and steps, batch, learning rate, warmup and checkpoints derived from config.finetune."""
    from jaxlm.train.privacy import examples_per_step
    ft = cfg.finetune
    run = copy.deepcopy(cfg)
    # An epoch: as many examples as the training set (DP-SGD's Poisson sampling: on average)
    steps_per_epoch = math.ceil(train_examples / examples_per_step(cfg.privacy, ft.batch_size))
    steps = ft.epochs * steps_per_epoch
    # A fine-tuning run learns the labels, or with objective=distill a teacher's too.
    objective = "distill" if cfg.train.objective == "distill" else objective
    run.train.update(objective=objective, steps=steps, batch_size=ft.batch_size,
                     log_every=min(run.train.log_every, steps_per_epoch))
    run.optimizer.update(learning_rate=ft.learning_rate, warmup_steps=int(ft.warmup_ratio * steps))
    run.checkpoint.every = steps_per_epoch
    config_lib.validate(run)
    return run


def load_pretrained(cfg, setup):
    """The params of config.finetune.init on `setup`'s mesh (jaxlm.train.init); the class
    head (config.model.num_classes) or span head (config.model.span_head) starts fresh."""
    from jaxlm.train.init import pretrained_params
    params = pretrained_params(cfg, setup, cfg.finetune.init, "config.finetune.init")
    if cfg.model.span_head:
        log.info("fine-tuning with a fresh span head")
    else:
        log.info("fine-tuning with a fresh head of %d classes", cfg.model.num_classes)
    return params


class Validation:
    """Scores the validation data after each epoch (`measure`, a subclass's); keeps the
    best params by config.finetune.best_metric in WORKDIR/best (a params export whose meta
    holds the epoch's metrics)."""

    def __init__(self, cfg, workdir: pathlib.Path, source):
        self.cfg, self.source, self.metric = cfg, source, cfg.finetune.best_metric
        self.best_dir = files.path(workdir) / "best"
        self._recover()
        checkpoint.sync("jaxlm: best params recovered")
        self.best = self.best_metrics().get(self.metric)

    def _recover(self) -> None:
        """Completes a swap of WORKDIR/best (`_keep`) that a killed process left half done."""
        new, old = self.best_dir.with_name("best.new"), self.best_dir.with_name("best.old")
        if jax.process_index() != 0 or checkpoint.is_export(self.best_dir):
            return
        if not files.is_remote(self.best_dir):
            if old.is_dir() and not self.best_dir.exists():  # killed between the renames
                os.rename(old, self.best_dir)
        elif checkpoint.is_export(new):  # killed while copying best.new to best
            files.remove_tree(self.best_dir)
            files.copy_tree(new, self.best_dir)
            files.remove_tree(new)

    def best_metrics(self) -> dict:
        if not checkpoint.is_export(self.best_dir):
            return {}
        return checkpoint.read_export_meta(self.best_dir).get("metrics", {})

    def measure(self, setup, params) -> dict:
        """{metric: value} of `params` on the validation data (a subclass's own)."""
        raise NotImplementedError

    def __call__(self, setup, params, step: int) -> dict:
        found = self.measure(setup, params)
        value = found.get(self.metric)
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            self._keep(setup, params, step, found)
        return {f"validation_{k}": v for k, v in found.items()
                if isinstance(v, float) or v is None}

    def _keep(self, setup, params, step: int, scores: dict) -> None:
        """Replaces WORKDIR/best: written beside it, then swapped in by renames (in a
        bucket: best removed, best.new copied to best and removed; see `_recover`)."""
        new, old = self.best_dir.with_name("best.new"), self.best_dir.with_name("best.old")
        if jax.process_index() == 0:
            for leftover in (new, old):
                files.remove_tree(leftover)
        checkpoint.sync("jaxlm: leftovers of best removed")
        meta = {**checkpoint.make_export_meta(setup.cfg, setup.tokenizer, step), "metrics": scores}
        checkpoint.export_params(new, params, meta, "the best params so far")
        if jax.process_index() == 0:
            if files.is_remote(self.best_dir):
                files.remove_tree(self.best_dir)
                files.copy_tree(new, self.best_dir)
            else:
                if self.best_dir.exists():
                    os.rename(self.best_dir, old)
                os.rename(new, self.best_dir)
            files.remove_tree(old)
            files.remove_tree(new)
        log.info("step %d: best %s so far (%.4f); params kept in %s", step, self.metric,
                 scores[self.metric], self.best_dir)


def best_params(cfg, setup, workdir: pathlib.Path):
    """(params, step) of the export config.evaluate.params (e.g. an int8 one, python -m
    jaxlm.quantize), else of WORKDIR/best, else of the checkpoint config.checkpoint.step."""
    best = files.path(workdir) / "best"
    if cfg.evaluate.params or not checkpoint.is_export(best):
        return checkpoint.load_params(cfg, setup, workdir)
    meta = checkpoint.read_export_meta(best)
    checkpoint.check_meta(meta, cfg, setup.tokenizer, f"export {best}")
    return checkpoint.load_export(best, setup.abstract_params, setup.param_shardings, meta,
                                  cfg.checkpoint.verify), meta["step"]
