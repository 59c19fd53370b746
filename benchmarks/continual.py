"""Continued pretraining and forgetting, measured side by side: the debug GPT trained on the
synthetic corpus, then trained on tiny Shakespeare from its params, without and with
replay of the synthetic corpus (configs/gpt/continual.py).

    python benchmarks/continual.py --out=runs/continual [--base=WORKDIR] [--steps=500]
        [--replay=0.25] [--config.FIELD=VALUE ...]

--base: a finished run of configs/gpt/debug.py (README command 1); without it the base is
trained first under --out. Each arm starts from the base's params with a fresh optimizer
and a re-warmed learning rate (config.train.init) and trains --steps. Every model gets:
the few-shot suite of the old tasks (jaxlm.evaluate, k = 0 and 1), perplexity on 64
held-out synthetic documents (old data) and on tiny Shakespeare's validation split (new
data: characters 1,003,854 to 1,059,623 of input.txt, the slice TFDS calls validation,
scored in 1,000-character documents). Workdirs stay under --out, so a rerun skips
finished training. Results: OUT/continual.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import sys

import common  # benchmarks/common.py
from compress import fewshot_row, float_export, held_out_texts, lscpu, perplexity
from jaxlm import checkpoint
from jaxlm.config import load_config, validate

REPO = pathlib.Path(__file__).resolve().parents[1]
VALIDATION = (1_003_854, 1_059_624)  # tiny_shakespeare's validation split in input.txt


def arm_config(args, data: dict, init: str, steps: int, path: str = "configs/gpt/continual.py"):
    cfg = load_config(REPO / path)
    cfg.data.update(data)
    cfg.train.update(init=init, steps=steps)
    cfg.evaluate.update(shots=(0, 1), num_samples=0)
    common.apply(cfg, args.overrides)
    validate(cfg)
    return cfg


def train(cfg, workdir: pathlib.Path) -> None:
    from jaxlm.train import loop
    done = (workdir / "checkpoints").is_dir() and \
        checkpoint.Checkpointer(workdir, read_only=True).latest_step() == cfg.train.steps
    if not done:
        loop.train(cfg, workdir)


def shakespeare_validation(manual_dir: str) -> list[str]:
    text = (pathlib.Path(manual_dir) / "input.txt").read_text()[slice(*VALIDATION)]
    return [text[i:i + 1000] for i in range(0, len(text), 1000)]


def measure(cfg, workdir: pathlib.Path, out: pathlib.Path, manual_dir: str) -> dict:
    """Few-shot scores of the old tasks and perplexities on old and new held-out text, of
    the run's last params (exported to OUT, scored there: the run's workdir is only read)."""
    from jaxlm.evaluate.scoring import make_scorer
    from jaxlm.setup import build
    cfg = copy.deepcopy(cfg)
    cfg.train.init = ""
    export = float_export(cfg, workdir, out)
    cfg.evaluate.params = str(export)
    setup = build(cfg)
    params, _ = checkpoint.load_params(cfg, setup, export)
    scorer = make_scorer(setup, params, setup.cfg.evaluate)
    row = {"old ppl": perplexity(scorer, setup.tokenizer, held_out_texts(cfg)),
           "new ppl": perplexity(scorer, setup.tokenizer, shakespeare_validation(manual_dir))}
    row.update(fewshot_row(cfg, export))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--base", default="", help="a finished configs/gpt/debug.py run")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--replay", type=float, default=0.25)
    args = common.parse(parser)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
          "python benchmarks/continual.py " + " ".join(sys.argv[1:]) + "\n" + lscpu(), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    base = pathlib.Path(args.base) if args.base else args.out / "base"
    base_cfg = arm_config(args, {}, "", 1000, "configs/gpt/debug.py")
    if not args.base:
        train(base_cfg, base)
    new = round(1 - args.replay, 6)
    arms = {"base (synthetic, 1000 steps)": (base_cfg, base),
            "Shakespeare only": (arm_config(args, {"name": "tiny_shakespeare"}, str(base),
                                            args.steps), args.out / "new_only"),
            f"Shakespeare + {args.replay:.0%} replay": (arm_config(
                args, {"name": "mixture", "mixture": (f"tiny_shakespeare={new}",
                                                      f"synthetic={args.replay}")},
                str(base), args.steps), args.out / "replay")}
    rows = {}
    for name, (cfg, workdir) in arms.items():
        train(cfg, workdir)
        rows[name] = measure(cfg, workdir, args.out, arms["Shakespeare only"][0].data.manual_dir)
        print(name, json.dumps(rows[name]), flush=True)
    (args.out / "continual.json").write_text(json.dumps(rows, indent=2))
    columns = list(next(iter(rows.values())))
    print("\n| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
