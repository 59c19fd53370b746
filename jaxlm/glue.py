"""The GLUE suite: every task fine-tuned over a grid of learning rates and seeds, the
table of dev results and the GLUE score.

    python -m jaxlm.glue --config=configs/bert/glue.py --workdir=runs/glue --glue-dir=GLUE \
        --lrs=1e-4,3e-4 --seeds=0,1,2 [--tasks=rte,mrpc] [--predict] [--dry-run] \
        [--config.finetune.init=runs/bert_debug ...]

Each task is one sweep (launch/sweep.py: the runs one after another, finished ones
skipped, so re-running continues) in WORKDIR/<task>/, each run `python -m jaxlm.finetune`
with --config.finetune.glue_task=<task> and the --config overrides given here. Every
task's files are read and checked before the first run starts: a missing column or a
label outside the task's set is one line naming the file and line, and nothing is written.

The table (printed, and WORKDIR/glue.json, WORKDIR/glue.md): per task, the learning rate
whose mean dev score over the seeds is best, and at it the mean ± standard deviation over
the seeds of each official metric and of the task's score, with the number of runs (MNLI:
matched picks the learning rate, mismatched is reported at it). The GLUE score averages
the task scores as the leaderboard does (jaxlm.evaluate.glue); picking the learning rate on
the dev set that is then reported makes these dev numbers optimistic, as everyone's are.
`--predict` writes the test-server files of each task's best run (the best seed at the
best learning rate) into WORKDIR/submission/ (tasks whose test files are absent are
skipped and named).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np

from jaxlm import cli
from jaxlm import workdir as workdir_lib
from jaxlm.data import glue as glue_data
from jaxlm.errors import ConfigError
from jaxlm.evaluate import glue as glue_eval

SWEEP = pathlib.Path(__file__).resolve().parents[1] / "launch" / "sweep.py"
FLAGS = [
    cli.Flag("tasks", "comma-separated GLUE tasks (default: all nine)", ",".join(glue_data.TASKS)),
    cli.Flag("lrs", "comma-separated learning rates (config.finetune.learning_rate)", None),
    cli.Flag("seeds", "comma-separated seeds (config.train.seed)", "0,1,2"),
    cli.Flag("glue-dir", "GLUE's folder (config.finetune.glue_dir; empty: TFDS glue/TASK "
             "prepared in config.data.data_dir)", ""),
    cli.Flag("predict", "write the test-server files of each task's best run", switch=True),
    cli.Flag("dry-run", "print every run's command, run none", switch=True),
]
OWN_FIELDS = ("finetune.glue_task", "finetune.learning_rate", "train.seed", "finetune.glue_dir")


def _sweep():
    """launch/sweep.py as a module (its run folder names and grid)."""
    if not SWEEP.is_file():
        raise ConfigError(f"{SWEEP}: no such file; python -m jaxlm.glue runs from a clone of "
                          "jaxlm (pip install -e .)")
    spec = importlib.util.spec_from_file_location("jaxlm_launch_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_list(flags: dict, name: str, kind=None) -> list[str]:
    """The comma-separated values of --name; with `kind` (float: positive, int: >= 0)
    each one checked."""
    values = [v.strip() for v in flags[name].split(",") if v.strip()]
    for v in values if kind else []:
        try:
            ok = kind(v) > 0 if kind is float else kind(v) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"--{name}={flags[name]}: {v!r} is not a "
                              f"{'positive number' if kind is float else 'whole number >= 0'}")
    if not values:
        raise ConfigError(f"--{name}= is empty")
    return values


def check_data(tasks: list[glue_data.Task], glue_dir: str, data_dir: str) -> None:
    """Reads every split a run will read (train and dev): a bad file stops the suite here."""
    for t in tasks:
        for split in ("train",) + t.dev:
            glue_data.read_split(t, split, glue_dir, data_dir)


def run_sweep(args, task: str, lrs, seeds, overrides, dry_run: bool) -> int:
    cmd = [sys.executable, str(SWEEP), f"--config={args.config_path}",
           f"--workdir={args.workdir / task}",
           "--grid", f"finetune.learning_rate={','.join(lrs)}",
           "--grid", f"train.seed={','.join(seeds)}"] + (["--dry-run"] if dry_run else []) + \
        ["--", f"--config.finetune.glue_task={task}"] + overrides
    print(f"\n== GLUE {task}", flush=True)
    return subprocess.run(cmd).returncode


def collect(workdir: pathlib.Path, task: glue_data.Task, lrs, seeds, run_name) -> list[dict]:
    """The table rows of one task: the best learning rate by mean dev score, and at it
    each metric's mean, sd and number of runs (MNLI: a row for each dev split)."""
    runs = {}  # lr -> [(seed, results)]
    for lr in lrs:
        for seed in seeds:
            path = workdir / task.name / run_name([("finetune.learning_rate", lr),
                                                   ("train.seed", seed)]) / "results.json"
            if path.is_file():
                runs.setdefault(lr, []).append((seed, json.loads(path.read_text())))
    if not runs:
        return []
    best_lr = max(runs, key=lambda lr: np.mean([r["validation"]["glue"] for _, r in runs[lr]]))
    rows = []
    for i, split in enumerate(task.dev):
        key = "validation" if i == 0 else split
        name = task.name if len(task.dev) == 1 else f"{task.name}-{'m' if i == 0 else 'mm'}"
        values = [r[key] for _, r in runs[best_lr] if key in r]
        row = {"task": name, "learning_rate": best_lr, "runs": len(values),
               "best_seed": max(runs[best_lr], key=lambda sr: sr[1]["validation"]["glue"])[0]}
        for m in task.metrics + ("glue",):
            xs = [v[m] for v in values]
            row[m] = {"mean": float(np.mean(xs)),
                      "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else None}
        rows.append(row)
    return rows


def markdown(rows: list[dict], score: float, missing: list[str]) -> str:
    lines = ["| task | metric | dev (mean ± sd over seeds) | task score | runs | lr |",
             "|---|---|---|---|---|---|"]
    fmt = lambda v: f"{100 * v['mean']:.1f}" + (f" ± {100 * v['sd']:.1f}" if v["sd"] is not None else "")  # noqa: E731
    for r in rows:
        metrics = [m for m in r if m not in ("task", "learning_rate", "runs", "best_seed", "glue")]
        lines.append(f"| {r['task']} | {' / '.join(metrics)} | "
                     f"{' / '.join(fmt(r[m]) for m in metrics)} | {fmt(r['glue'])} | "
                     f"{r['runs']} | {r['learning_rate']} |")
    done = 9 - len(missing)
    lines.append("")
    lines.append(f"GLUE score (dev, x100): {100 * score:.1f} over {done} of 9 tasks"
                 + (f" (missing: {', '.join(missing)}; not comparable to a full GLUE score)"
                    if missing else ""))
    return "\n".join(lines) + "\n"


def predict(args, rows, overrides, glue_dir: str, run_name) -> None:
    """Each task's best run writes its test-server files into WORKDIR/submission/."""
    for r in rows:
        if r["task"].endswith("-mm"):  # MNLI's run writes both test files with the -m row
            continue
        name = r["task"].removesuffix("-m")
        t = glue_data.TASKS[name]
        if glue_dir and not all((pathlib.Path(glue_dir) / t.folder / t.files()[s]).is_file()
                                for s in t.test):
            print(f"{name}: no test files in {glue_dir}/{t.folder}; no predictions", flush=True)
            continue
        point = [("finetune.learning_rate", r["learning_rate"]), ("train.seed", r["best_seed"])]
        cmd = [sys.executable, "-m", "jaxlm.finetune", f"--config={args.config_path}",
               f"--workdir={args.workdir / name / run_name(point)}",
               f"--predict={args.workdir / 'submission'}", f"--config.finetune.glue_task={name}",
               *[f"--config.{f}={v}" for f, v in point], *overrides]
        if subprocess.run(cmd).returncode:
            raise ConfigError(f"{name}: writing the test predictions failed (see above)")


def main(argv) -> dict:
    args = cli.parse(argv, "jaxlm.glue", __doc__, flags=FLAGS)
    flags = args.flags
    tasks = [glue_data.task(t, "--tasks") for t in parse_list(flags, "tasks")]
    lrs, seeds = parse_list(flags, "lrs", float), parse_list(flags, "seeds", int)
    for field, _ in args.overrides:
        if field in OWN_FIELDS:
            raise ConfigError(f"--config.{field}: the suite sets it (--tasks, --lrs, --seeds, "
                              "--glue-dir)")
    glue_dir = flags["glue-dir"] or args.config.finetune.glue_dir
    overrides = [f"--config.{f}={v}" for f, v in args.overrides] + \
        ([f"--config.finetune.glue_dir={glue_dir}"] if glue_dir else [])
    if not flags["dry-run"]:
        check_data(tasks, glue_dir, args.config.data.data_dir)
    sweep = _sweep()
    failed = [t.name for t in tasks
              if run_sweep(args, t.name, lrs, seeds, overrides, flags["dry-run"])]
    if flags["dry-run"]:
        return {}
    rows = [row for t in tasks for row in collect(args.workdir, t, lrs, seeds, sweep.run_name)]
    score, missing = glue_eval.glue_score({r["task"]: r["glue"]["mean"] for r in rows})
    table = markdown(rows, score, missing)
    out = {"rows": rows, "glue_score": score, "missing_tasks": missing, "failed": failed}
    if rows:
        workdir_lib.write_text(args.workdir / "glue.json", json.dumps(out, indent=2))
        workdir_lib.write_text(args.workdir / "glue.md", table)
        print("\n" + table, flush=True)
    if flags["predict"] and rows:
        predict(args, rows, overrides, glue_dir, sweep.run_name)
    if failed:
        raise ConfigError(f"runs of {', '.join(failed)} failed (their errors are above); "
                          "re-run the command to continue")
    return out


if __name__ == "__main__":
    cli.run(main)
