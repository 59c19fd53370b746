"""The main job: pretrain, then few-shot evaluate.

    python -m jaxlm.main --config=configs/gpt/debug.py --workdir=runs/debug

`python -m jaxlm.train` and `python -m jaxlm.evaluate` run the two halves alone, with the
same flags. Re-running on the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import pathlib

import ml_collections

from jaxlm import cli

log = logging.getLogger("jaxlm")


def pretrain_then_evaluate(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """{"train": training summary, "evaluate": results} (no evaluation after a preemption:
    the run saved and stopped; the same command continues it)."""
    from jaxlm import checkpoint  # JAX and friends: after the flags are known good
    from jaxlm.evaluate import fewshot
    from jaxlm.train import loop

    # The evaluation half is checked now, not after a long training run.
    fewshot.make_tasks(cfg)
    if cfg.evaluate.params:
        checkpoint.read_export_meta(cfg.evaluate.params)
    hooks = None
    if cfg.evaluate.every:  # few-shot scores beside the loss: wired here, not in the loop
        hooks = loop.Hooks(evaluate=fewshot.during_training(cfg), evaluate_every=cfg.evaluate.every)
    out = {"train": loop.train(cfg, workdir, hooks=hooks)}
    log.info("training done: %s", out["train"])
    if not out["train"]["preempted"]:
        out["evaluate"] = fewshot.evaluate(cfg, workdir)
        if "privacy" in out["train"] and not cfg.evaluate.params:
            _record_privacy(workdir, out["train"]["privacy"])
    return out


def _record_privacy(workdir: pathlib.Path, record: dict) -> None:
    """DP-SGD (config.privacy): the guarantee of the params just evaluated joins
    results.json, as in a fine-tuning run's."""
    import json

    import jax

    from jaxlm import files, workdir as workdir_lib
    path = files.path(workdir) / "results.json"
    if jax.process_index() == 0 and path.exists():
        results = json.loads(path.read_text())
        workdir_lib.write_text(path, json.dumps({**results, "privacy": record}, indent=2))


def main(argv) -> dict:
    args = cli.parse(argv, "jaxlm.main", __doc__)
    cli.start(args.config)
    return pretrain_then_evaluate(args.config, args.workdir)


if __name__ == "__main__":
    cli.run(main)
