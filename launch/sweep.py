#!/usr/bin/env python3
"""Runs a grid of fine-tuning runs one after another and tabulates them over seeds.

    python launch/sweep.py --config=configs/bert/facts.py --workdir=runs/sweep \
        --grid finetune.learning_rate=1e-4,3e-4 --grid train.seed=0,1,2 \
        [--command=jaxlm.finetune] [--dry-run] [-- --config.finetune.init=runs/bert_debug]

Each point of the grid (every combination of the --grid values) is one run of
`python -m <command>` in WORKDIR/<field=value,...>, with the overrides after `--` added to
every run. Before printing or running anything, every run's config (the --config file, its
grid values, then the overrides after `--`) is checked against jaxlm's schema, and a grid
whose points would share a run folder or a configuration (a value given twice, 1e-4 and
0.0001, a grid field also set after `--`) is refused: each run is counted once. A bad
input is one line, `error: ...`, and exit code 2.

A run whose results.json exists is finished and skipped, so re-running the sweep continues
it; --dry-run prints every command and runs none (paste them into a cluster's job array).
When any run has finished, the table, WORKDIR/sweep.csv and WORKDIR/sweep.md, has one row
per setting of the fields other than the seed (any grid field whose name ends in "seed"):
the number of finished runs ("seeds"), and the mean and standard deviation over them of
each validation metric in their results.json (a metric some runs lack says over how many
it is: "(n=2)"). The failed runs are listed last with the `error: ...` line each printed;
the exit code is that of the first failed run (after trying the others), else 0.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import pathlib
import shlex
import signal
import subprocess
import sys

import numpy as np

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError

METRICS = ("accuracy", "f1", "f1_macro", "mcc", "roc_auc")
# Shown when some run reports them: a regression head's, and a GLUE task's score.
EXTRA_METRICS = ("pearson", "spearman", "glue")


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
        if not e.startswith("--config.") or "=" not in e:
            p.error(f"after --, only --config.FIELD=VALUE overrides are passed on, not {e}")
    return args, extra


def grid_points(grids: list[str]) -> list[list[tuple[str, str]]]:
    """Every combination of the --grid values, as [(field, value), ...]; ConfigError for a
    --grid that is malformed, names a field twice or gives a value twice."""
    axes = []
    for g in grids:
        field, _, values = g.partition("=")
        field = field.removeprefix("config.")
        if not field or not values:
            raise ConfigError(f"--grid {g!r}: expected FIELD=V1,V2,...")
        if field in [axis[0][0] for axis in axes]:
            raise ConfigError(f"--grid {field} is given twice; list all its values in one --grid")
        split = values.split(",")
        repeated = next((v for i, v in enumerate(split) if v in split[:i]), None)
        if repeated is not None:
            raise ConfigError(f"--grid {g}: {repeated!r} is given twice; give each value once")
        axes.append([(field, v) for v in split])
    return [list(point) for point in itertools.product(*axes)]


def run_name(point: list[tuple[str, str]]) -> str:
    text = ",".join(f"{f}={v}" for f, v in point) or "default"
    return "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in text)


def command(args, point, extra) -> list[str]:
    return [sys.executable, "-m", args.command, f"--config={args.config}",
            f"--workdir={pathlib.Path(args.workdir) / run_name(point)}",
            *[f"--config.{f}={v}" for f, v in point], *extra]


def check(config_path: str, points, extra: list[str]) -> None:
    """Raises ConfigError (one line, naming the override) unless every run's config loads,
    takes its overrides and validates, and no two runs share a folder or a configuration."""
    overrides = [tuple(e.removeprefix("--config.").partition("=")[::2]) for e in extra]
    fields = {f for f, _ in points[0]}
    for f, v in overrides:
        if f in fields:
            raise ConfigError(f"--config.{f}={v} after -- would override --grid {f} in every "
                              "run; drop one of them")
    base = config_lib.load_config(config_path)
    folders, configs = {}, {}  # run folder -> point, config JSON -> point
    for point in points:
        cfg = copy.deepcopy(base)
        flags = [f"--grid {f}={v}" for f, v in point] + \
                [f"--config.{f}={v} (after --)" for f, v in overrides]
        for (f, v), flag in zip(point + overrides, flags):
            try:
                config_lib.apply_override(cfg, f, v)
            except ConfigError as e:
                raise ConfigError(f"{flag}: {e}") from None
        try:
            config_lib.validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"run {run_name(point)}: {e}") from None
        name = run_name(point)
        for other, what in ((folders.setdefault(name, point), f"would share the run folder {name}"),
                            (configs.setdefault(config_lib.to_json(cfg), point),
                             "are the same configuration")):
            if other is not point:  # name each by the values in which the two differ
                a, b = (",".join(f"{f}={v}" for f, v in p if (f, v) not in q)
                        for p, q in ((other, point), (point, other)))
                raise ConfigError(f"--grid values {a} and {b} {what}: one run would count "
                                  "as two")


def run(cmd: list[str]) -> tuple[int, str, bool]:
    """Runs one command, passing its stderr through line by line. Returns its exit code
    (128 + N for signal N), its last `error: ...` line (else its last line) and whether
    Ctrl-C came: the run gets it too, saves and stops, and its stderr is read to the end (a
    second Ctrl-C stops the sweep at once)."""
    error = last = ""
    interrupted = False

    def on_ctrl_c(*_):
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True  # no exception: it could lose a line read but not yet returned

    previous = signal.getsignal(signal.SIGINT)
    catch = previous not in (signal.SIG_IGN, None)  # a background job stays deaf to Ctrl-C
    if catch:
        signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
            for line in proc.stderr:
                sys.stderr.write(line)
                sys.stderr.flush()
                last = line.strip() or last
                error = line.strip() if line.startswith("error: ") else error
    finally:
        if catch:
            signal.signal(signal.SIGINT, previous)
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    return code, error or last or f"exit code {code}", interrupted


def table(workdir: pathlib.Path, points) -> list[dict]:
    """One row per setting of the non-seed fields: the number of finished runs ("seeds"),
    and for each metric its mean, std and number of runs that report it."""
    rows: dict[tuple, dict] = {}
    for point in points:
        setting = tuple((f, v) for f, v in point if not f.endswith("seed"))
        results = workdir / run_name(point) / "results.json"
        row = rows.setdefault(setting, {"setting": setting, "runs": []})
        if results.exists():
            row["runs"].append(json.loads(results.read_text())["validation"])
    out = []
    runs = [r for row in rows.values() for r in row["runs"]]
    metrics = METRICS + tuple(m for m in EXTRA_METRICS if any(m in r for r in runs))
    for setting, row in rows.items():
        entry = {**dict(setting), "seeds": len(row["runs"])}
        for m in metrics:
            values = [r[m] for r in row["runs"] if r.get(m) is not None]
            entry[f"{m}_mean"] = float(np.mean(values)) if values else None
            entry[f"{m}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            entry[f"{m}_n"] = len(values)
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
    settings = [k for k in fields if k != "seeds" and not k.endswith(("_mean", "_std", "_n"))]
    metrics = [k[:-len("_mean")] for k in fields if k.endswith("_mean")]
    head = settings + ["seeds"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[k]) for k in settings] + [str(r["seeds"])]
        for m in metrics:
            mean, std, n = r[f"{m}_mean"], r[f"{m}_std"], r[f"{m}_n"]
            cells.append("-" if mean is None else f"{mean:.3f}"
                         + (f" ± {std:.3f}" if std is not None else "")
                         + (f" (n={n})" if n != r["seeds"] else ""))  # over fewer runs
        lines.append("| " + " | ".join(cells) + " |")
    (workdir / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    try:
        points = grid_points(args.grid)
        check(args.config, points, extra)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = pathlib.Path(args.workdir)
    failures = []  # (run name, exit code, its error line)
    interrupted = False
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
        code, error, interrupted = run(cmd)
        if code:
            failures.append((run_name(point), code, error))
        if interrupted:
            print("sweep.py: interrupted (Ctrl-C); the remaining runs were not started",
                  file=sys.stderr)
            break
    if args.dry_run:
        return 0
    if any((workdir / run_name(p) / "results.json").exists() for p in points):
        write_table(workdir, table(workdir, points))
    if failures:
        print(f"sweep.py: {len(failures)} of {len(points)} runs failed:", file=sys.stderr)
        for name, code, error in failures:
            print(f"  {name} (exit code {code}): {error}", file=sys.stderr)
    return failures[0][1] if failures else 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
