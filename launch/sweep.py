#!/usr/bin/env python3
"""Runs a grid of fine-tuning runs one after another and tabulates them over seeds.

    python launch/sweep.py --config=configs/bert/facts.py --workdir=runs/sweep \
        --grid finetune.learning_rate=1e-4,3e-4 --grid train.seed=0,1,2 \
        [--command=jaxlm.finetune] [--dry-run] [-- --config.finetune.init=runs/bert_debug]

Each point of the grid (every combination of the --grid values) is one run of
`python -m <command>` in WORKDIR/<field=value,...>, with the overrides after `--` added to
every run. A run whose results.json exists is finished and skipped, so re-running the
sweep continues it; --dry-run prints every command and runs none (paste them into a
cluster's job array). The table, WORKDIR/sweep.csv and WORKDIR/sweep.md, has one row per
setting of the fields other than the seed (any grid field whose name ends in "seed"): the
mean and standard deviation over seeds of each validation metric in the runs' results.json.
The exit code is that of the first failed run (after trying the others), else 0.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import pathlib
import shlex
import subprocess
import sys

import numpy as np

METRICS = ("accuracy", "f1", "f1_macro", "mcc", "roc_auc")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                   help="a config field and its values; repeat for more fields")
    p.add_argument("--command", default="jaxlm.finetune", help="the module each run executes")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    for e in extra:
        if not e.startswith("--config."):
            p.error(f"after --, only --config.FIELD=VALUE overrides are passed on, not {e}")
    return args, extra


def grid_points(grids: list[str]) -> list[list[tuple[str, str]]]:
    axes = []
    for g in grids:
        field, _, values = g.partition("=")
        if not field or not values:
            raise SystemExit(f"sweep.py: --grid {g!r}: expected FIELD=V1,V2,...")
        axes.append([(field.removeprefix("config."), v) for v in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


def run_name(point: list[tuple[str, str]]) -> str:
    text = ",".join(f"{f}={v}" for f, v in point) or "default"
    return "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in text)


def command(args, point, extra) -> list[str]:
    return [sys.executable, "-m", args.command, f"--config={args.config}",
            f"--workdir={pathlib.Path(args.workdir) / run_name(point)}",
            *[f"--config.{f}={v}" for f, v in point], *extra]


def table(workdir: pathlib.Path, points) -> list[dict]:
    """One row per setting of the non-seed fields: mean and std of each metric over seeds."""
    rows: dict[tuple, dict] = {}
    for point in points:
        setting = tuple((f, v) for f, v in point if not f.endswith("seed"))
        results = workdir / run_name(point) / "results.json"
        row = rows.setdefault(setting, {"setting": setting, "runs": []})
        if results.exists():
            row["runs"].append(json.loads(results.read_text())["validation"])
    out = []
    for setting, row in rows.items():
        entry = {**dict(setting), "seeds": len(row["runs"])}
        for m in METRICS:
            values = [r[m] for r in row["runs"] if r.get(m) is not None]
            entry[f"{m}_mean"] = float(np.mean(values)) if values else None
            entry[f"{m}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out.append(entry)
    return out


def write_table(workdir: pathlib.Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(rows[0])
    with open(workdir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    settings = [k for k in fields if k != "seeds" and not k.endswith(("_mean", "_std"))]
    head = settings + ["seeds"] + list(METRICS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[k]) for k in settings] + [str(r["seeds"])]
        for m in METRICS:
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            cells.append("-" if mean is None else f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    (workdir / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    points = grid_points(args.grid)
    workdir = pathlib.Path(args.workdir)
    failed = 0
    for point in points:
        cmd = command(args, point, extra)
        done = (workdir / run_name(point) / "results.json").exists()
        if args.dry_run:
            print(("# finished: " if done else "") + shlex.join(cmd))
            continue
        if done:
            print(f"skip (finished): {run_name(point)}", flush=True)
            continue
        print(f"run: {shlex.join(cmd)}", flush=True)
        code = subprocess.run(cmd).returncode
        failed = failed or code
    if not args.dry_run:
        write_table(workdir, table(workdir, points))
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
