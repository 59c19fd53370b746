"""Params-only export of a checkpoint, for evaluation and inference on any mesh.

    python -m jaxlm.export --config=FILE --workdir=DIR --output=PATH [--config.checkpoint.step=N]

Writes PATH/params (an Orbax checkpoint of the parameters alone: no optimizer state, so
about a third of a train checkpoint in fp32) and PATH/meta (config, tokenizer, step).
Evaluate it with `python -m jaxlm.evaluate --config=FILE --workdir=OUT
--config.evaluate.params=PATH`, on whatever mesh config.mesh describes there.
"""

from __future__ import annotations

import logging
import pathlib

from jaxlm import checkpoint, cli
from jaxlm import workdir as workdir_lib
from jaxlm.setup import build
from jaxlm.train import prune

log = logging.getLogger("jaxlm")

OUTPUT = cli.Flag("output", "where the export goes (must not exist)", None, metavar="PATH")


def export(cfg, workdir: pathlib.Path, output: pathlib.Path) -> int:
    """Exports checkpoint config.checkpoint.step (-1: latest) of `workdir`; returns the step."""
    output = workdir_lib.check_output(output)
    workdir = workdir_lib.check(workdir, must_exist=not cfg.evaluate.params)
    setup = build(cfg)
    params, step = checkpoint.load_params(cfg, setup, pathlib.Path(workdir))
    meta = checkpoint.make_export_meta(cfg, setup.tokenizer, step)
    if prune.enabled(cfg.prune):  # zeros are stored as zeros: the export is as large
        meta["sparsity"] = prune.sparsity_of(params, cfg.prune)
        log.info("pruned parameters: %.1f%% zeros on average over %d of them",
                 100 * sum(meta["sparsity"].values()) / len(meta["sparsity"]),
                 len(meta["sparsity"]))
    checkpoint.export_params(output, params, meta)
    log.info("exported the params of step %d from %s to %s", step, workdir, output)
    return step


def main(argv):
    args = cli.parse(argv, "jaxlm.export", __doc__, flags=[OUTPUT])
    cli.start(args.config)
    return export(args.config, args.workdir, pathlib.Path(args.flags["output"]))


if __name__ == "__main__":
    cli.run(main)
