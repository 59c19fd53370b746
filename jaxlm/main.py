"""The main job: pretrain, then few-shot evaluate.

    python -m jaxlm.main --config=configs/gpt/debug.py --workdir=runs/debug

`python -m jaxlm.train` and `python -m jaxlm.evaluate` are its two halves, same flags.
"""

from __future__ import annotations

import logging
import sys

from jaxlm import config as config_lib
from jaxlm.train.nonfinite import Diverged

log = logging.getLogger("jaxlm")


def run(train: bool = True, evaluate: bool = True, argv: list[str] | None = None) -> dict:
    """Parses flags, then trains and/or evaluates. User errors exit 2 with one line."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)  # our lines at INFO; libraries (orbax, absl) at WARNING
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = config_lib.parse_args(argv)
        # Imported here so that a bad flag fails fast, before JAX starts up.
        from jaxlm import distributed
        from jaxlm.evaluate.fewshot import evaluate as run_eval
        from jaxlm.train.loop import train as run_train
        distributed.initialize(args.config.distributed)
        out = {}
        if train:
            out["train"] = run_train(args.config, args.workdir)
            log.info("training done: %s", out["train"])
            if out["train"]["preempted"]:
                return out  # saved; rerun the same command to continue
        if evaluate:
            out["evaluate"] = run_eval(args.config, args.workdir)
        return out
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run()
