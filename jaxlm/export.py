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
import sys

from jaxlm import config as config_lib

log = logging.getLogger("jaxlm")


def export(cfg, workdir: pathlib.Path, output: pathlib.Path) -> int:
    """Exports checkpoint config.checkpoint.step (-1: latest) of `workdir`; returns the step."""
    from jaxlm import checkpoint
    from jaxlm.evaluate.fewshot import load_params
    from jaxlm.train.loop import build

    output = pathlib.Path(output)
    if output.exists():  # checked before the (possibly long) restore
        raise config_lib.ConfigError(f"--output={output} already exists; not overwriting it")
    setup = build(cfg)
    params, step = load_params(cfg, setup, pathlib.Path(workdir))
    meta = checkpoint.make_export_meta(cfg, setup.tokenizer, step)
    checkpoint.export_params(output, params, meta)
    log.info("exported the params of step %d from %s to %s", step, workdir, output)
    return step


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    try:
        args = config_lib.parse_args(sys.argv[1:] if argv is None else argv,
                                     flags={"output": ""})
        if not args.flags["output"]:
            raise config_lib.ConfigError("--output=PATH is required (where the export goes)")
        from jaxlm import distributed
        distributed.initialize(args.config.distributed)
        return export(args.config, args.workdir, pathlib.Path(args.flags["output"]))
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
