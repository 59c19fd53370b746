"""Params-only export of a checkpoint, for evaluation and inference on any mesh.

    python -m jaxlm.export --config=FILE --workdir=DIR --output=PATH [--merge]
        [--config.checkpoint.step=N]

Writes PATH/params (an Orbax checkpoint of the parameters alone: no optimizer state, so
about a third of a train checkpoint in fp32) and PATH/meta (config, tokenizer, step). PATH
and the workdir may be local or gs:// (docs/cloud.md).
Evaluate it with `python -m jaxlm.evaluate --config=FILE --workdir=OUT
--config.evaluate.params=PATH`, on whatever mesh config.mesh describes there.

A LoRA run (config.lora.rank) is exported with its adapters beside the base weights, and
its config.lora, which evaluation adopts from the export. `--merge` folds the adapters
into the weights instead (W + alpha/rank A @ B; an int8 QLoRA base dequantized): a plain
model (config.lora.rank=0, float) that evaluation, the server and python -m
jaxlm.quantize load as any other, at the base model's size and speed.
"""

from __future__ import annotations

import logging
import pathlib

import jax

from jaxlm import checkpoint, cli
from jaxlm import workdir as workdir_lib
from jaxlm.errors import ConfigError
from jaxlm.models import transforms
from jaxlm.setup import build
from jaxlm.train import prune

log = logging.getLogger("jaxlm")

OUTPUT = cli.Flag("output", "where the export goes (must not exist)", None, metavar="PATH")
MERGE = cli.Flag("merge", "fold a LoRA run's adapters into the weights: a plain model",
                 switch=True)


def export(cfg, workdir: pathlib.Path, output: pathlib.Path, merge: bool = False) -> int:
    """Exports checkpoint config.checkpoint.step (-1: latest) of `workdir` (or the export
    config.evaluate.params), with `merge` its LoRA adapters folded in; returns the step."""
    output = workdir_lib.check_output(output, bucket=True)
    workdir = workdir_lib.check(workdir, must_exist=not cfg.evaluate.params)
    setup = build(cfg)
    if merge and not setup.cfg.lora.rank:
        raise ConfigError("--merge folds LoRA adapters into the weights, and config.lora.rank "
                          "is 0: pass the LoRA run's --config.lora.* (or drop --merge)")
    params, step = checkpoint.load_params(cfg, setup, workdir)
    out_cfg = setup.cfg
    if merge:
        out_cfg = transforms.merged_config(setup.cfg)
        plain = build(out_cfg, setup.mesh.devices.flatten())
        params = jax.jit(lambda p: transforms.merge_lora(p, setup.cfg),
                         out_shardings=plain.param_shardings)(params)
        log.info("folded %d LoRA adapters (rank %d, alpha %g) into their weights",
                 len(transforms.adapter_paths(setup.abstract_params)) // 2, setup.cfg.lora.rank,
                 setup.cfg.lora.alpha)
    elif setup.cfg.lora.rank:
        log.info("exporting the LoRA adapters (config.lora.rank=%d) beside the base weights; "
                 "--merge would fold them in", setup.cfg.lora.rank)
    meta = checkpoint.make_export_meta(out_cfg, setup.tokenizer, step)
    if prune.enabled(cfg.prune):  # zeros are stored as zeros: the export is as large
        meta["sparsity"] = prune.sparsity_of(params, cfg.prune)
        log.info("pruned parameters: %.1f%% zeros on average over %d of them",
                 100 * sum(meta["sparsity"].values()) / len(meta["sparsity"]),
                 len(meta["sparsity"]))
    checkpoint.export_params(output, params, meta)
    log.info("exported the params of step %d from %s to %s", step, workdir, output)
    return step


def main(argv):
    args = cli.parse(argv, "jaxlm.export", __doc__, flags=[OUTPUT, MERGE])
    cli.start(args.config)
    return export(args.config, args.workdir, args.flags["output"],
                  args.flags["merge"])


if __name__ == "__main__":
    cli.run(main)
