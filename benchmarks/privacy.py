"""Differentially private fine-tuning (DP-SGD, config.privacy) against the same runs
without privacy: validation accuracy at epsilon 1, 3 and 8, over seeds, and the step
time of the private step beside the plain one.

    python benchmarks/privacy.py --out=runs/privacy [--seeds=0,1,2] [--epsilons=1,3,8] \
        [--noise=S] [--tasks=sst2,rules] [--epochs=sst2=3,rules=10] [--config.FIELD=VALUE ...]

Tasks (python -m jaxlm.finetune in this process, from random init: no pretraining):
  sst2   configs/bert/sst2.py: the first 400 sentences of the SST-2 dev slice in
         shared/data for training, the last 100 for validation;
  rules  configs/bert/rules.py: all 600 synthetic:rules:train lines, scored on the 600
         validation lines (6 classes).
Both keep the debug BERT's shape (4 blocks, width 128, 0.9M parameters) and each
config's batch size B (16) and learning rate (1e-4, 3e-4); --epochs replaces the
configs' epochs (default: sst2 3, rules 10), --seq-len the sequence length (default:
sst2 64, rules 32).
Non-private runs take B rows a step. Private runs sample Poisson with B examples a step
on average in 2B rows (config.privacy.expected_batch_size = B, so both see the same
examples per step and the same number of steps), clip each example's gradient to 1.0,
and solve the noise for config.privacy.target_epsilon at delta 1e-5 over the run's steps
(dp-accounting PLD, add/remove-one adjacency); --noise=S adds private runs at noise
multiplier S instead (a small S: the clipping and sampling alone, at a large epsilon).
config.privacy.seed = config.train.seed,
for reproducible numbers (a real run keeps the default -1: a secret seed). The runs go
seed by seed, each seed's non-private and private runs one after the other.

Step time: after the runs, for each task the plain step (B rows) and the private step at
B rows and at 2B rows are timed in turns (--rounds rounds of --steps steps each, on the
same real rows), so that load from other processes hits them alike; the table gives the
median seconds per step and the ratio to the plain step.
Extra `--config.FIELD=VALUE` arguments go to every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = {"sst2": "configs/bert/sst2.py", "rules": "configs/bert/rules.py"}


def parse_args():
    import common  # benchmarks/common.py
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs and results.json")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epsilons", default="1,3,8", help="target epsilons ('' for none)")
    p.add_argument("--noise", default="", help="noise multipliers of further private runs")
    p.add_argument("--tasks", default="sst2,rules")
    p.add_argument("--epochs", default="sst2=3,rules=10", help="TASK=EPOCHS,...")
    p.add_argument("--seq-len", type=int, default=0, help="0: sst2 64, rules its config's 32")
    p.add_argument("--rounds", type=int, default=5, help="0: no step timing")
    p.add_argument("--steps", type=int, default=10)
    return common.parse(p)


def task_config(task: str, args, seed: int, epsilon: float | None, noise: float = 0.0):
    import common
    from jaxlm.config import load_config
    cfg = load_config(REPO / TASKS[task])
    epochs = dict(e.split("=") for e in args.epochs.split(","))
    cfg.finetune.update(epochs=int(epochs[task]))
    if task == "rules":
        cfg.finetune.train_examples = 0  # all 600
    cfg.data.seq_len = args.seq_len or (64 if task == "sst2" else cfg.data.seq_len)
    cfg.train.update(seed=seed, log_every=5)
    cfg.checkpoint.keep = 1
    if epsilon is not None or noise:
        b = cfg.finetune.batch_size
        cfg.finetune.batch_size = 2 * b
        cfg.privacy.update(target_epsilon=float(epsilon or 0), noise_multiplier=float(noise),
                           delta=1e-5, l2_clip=1.0, sampling="poisson",
                           expected_batch_size=b, seed=seed)
    common.apply(cfg, args.overrides)
    return cfg


def one_run(task, args, seed, setting, root: pathlib.Path) -> dict:
    """`setting`: None (non-private), ("epsilon", target) or ("noise", multiplier)."""
    from jaxlm import finetune
    epsilon = setting[1] if setting and setting[0] == "epsilon" else None
    noise = setting[1] if setting and setting[0] == "noise" else 0.0
    cfg = task_config(task, args, seed, epsilon, noise)
    label = "plain" if setting is None else f"{setting[0]}{setting[1]:g}"
    t0 = time.time()
    out = finetune.finetune(cfg, root / f"{task}-{label}-seed{seed}")
    row = {"task": task, "setting": label, "epsilon": epsilon, "seed": seed,
           "seconds": time.time() - t0,
           "steps": out["train"]["step"], "best_accuracy": out["validation"]["accuracy"],
           "final_accuracy": out["epochs"][-1]["accuracy"], "best_step": out["best_step"]}
    if "privacy" in out:
        row.update(noise_multiplier=out["privacy"]["noise_multiplier"],
                   spent_epsilon=out["privacy"]["epsilon"])
    print(json.dumps(row), flush=True)
    return row


def time_steps(task, args) -> dict:
    """Seconds per step (median over rounds) of the plain step and the private step at
    B and 2B rows, timed in turns on the same real rows."""
    import jax
    import numpy as np

    from jaxlm import finetune
    from jaxlm.data.tokenizers import get_tokenizer
    from jaxlm.train.build import build_train

    runs = {}
    for kind, epsilon, rows_mult in (("plain", None, 1), ("dp_B_rows", 3.0, 1),
                                     ("dp_2B_rows", 3.0, 2)):
        cfg = task_config(task, args, 0, epsilon)
        if kind == "dp_B_rows":
            cfg.finetune.batch_size //= 2
            cfg.privacy.expected_batch_size = cfg.finetune.batch_size // 2
        source, _ = finetune._sources(cfg, get_tokenizer(cfg.data.tokenizer))
        run = finetune.run_config(cfg, len(source))
        step = build_train(run)
        if step.private:
            step.set_privacy(1.0, 1.0, run.privacy.expected_batch_size)
        rows = [step.objective.example(source.example(i), i) for i in range(run.train.batch_size)]
        batch = step.place_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
        state = step.place_state(step.init_state())
        state, m = step(state, batch, jax.random.PRNGKey(0))  # compile
        jax.block_until_ready(m)
        runs[kind] = {"step": step, "state": state, "batch": batch, "times": [],
                      "rows": run.train.batch_size}
    for r in range(args.rounds):
        for kind, x in runs.items():
            t0 = time.perf_counter()
            for i in range(args.steps):
                x["state"], m = x["step"](x["state"], x["batch"], jax.random.PRNGKey(i))
            jax.block_until_ready((x["state"], m))
            x["times"].append((time.perf_counter() - t0) / args.steps)
    plain = statistics.median(runs["plain"]["times"])
    return {kind: {"rows": x["rows"], "seconds_per_step": statistics.median(x["times"]),
                   "ratio": statistics.median(x["times"]) / plain, "rounds": x["times"]}
            for kind, x in runs.items()}


def device() -> dict:
    model, flags = "", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = sorted({f for f in line.split(":", 1)[1].split()
                                if f.startswith(("avx512", "amx"))})
    except OSError:
        pass
    return {"cpu": model, "flags": flags, "cores": os.cpu_count()}


def table(rows: list[dict], timing: dict) -> str:
    lines = ["| task | setting | noise multiplier | steps | accuracy best epoch (mean ± std) "
             "| accuracy last epoch (mean ± std) | seeds |", "|---|---|---|---|---|---|---|"]
    tasks = sorted({r["task"] for r in rows}, key=list(TASKS).index)
    for task in tasks:
        for label in dict.fromkeys(r["setting"] for r in rows if r["task"] == task):
            group = [r for r in rows if r["task"] == task and r["setting"] == label]
            ms = lambda k: (f"{statistics.mean(r[k] for r in group):.3f} ± "  # noqa: E731
                            f"{statistics.stdev(r[k] for r in group) if len(group) > 1 else 0:.3f}")
            noise = (f"{statistics.mean(r['noise_multiplier'] for r in group):.3f}"
                     if label != "plain" else "-")
            name = ("non-private" if label == "plain" else
                    f"epsilon {group[0]['epsilon']:g}" if group[0]["epsilon"] is not None else
                    f"epsilon {group[0]['spent_epsilon']:.0f} (noise given)")
            lines.append(f"| {task} | {name} | {noise} | {group[0]['steps']} | "
                         f"{ms('best_accuracy')} | {ms('final_accuracy')} | {len(group)} |")
    lines += ["", "| task | step | rows | seconds per step (median) | vs non-private |",
              "|---|---|---|---|---|"]
    for task, kinds in timing.items():
        for kind, t in kinds.items():
            lines.append(f"| {task} | {kind} | {t['rows']} | {t['seconds_per_step']:.4f} | "
                         f"{t['ratio']:.2f}x |")
    return "\n".join(lines)


def main():
    args = parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # One compilation cache for all runs: seeds and epsilons share the same programs
    # (the clip, noise and denominator are arguments of the private step).
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "xla-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    import jax

    from jaxlm import cli
    cli.run(lambda argv: None, [])  # jaxlm's logging setup
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [None, *[("epsilon", float(e)) for e in args.epsilons.split(",") if e],
                *[("noise", float(s)) for s in args.noise.split(",") if s]]
    tasks = args.tasks.split(",")
    t_start = time.time()
    root = pathlib.Path(tempfile.mkdtemp(prefix="runs-", dir=out))
    rows = []
    for task in tasks:
        for seed in seeds:
            for setting in settings:
                rows.append(one_run(task, args, seed, setting, root))
    timing = {task: time_steps(task, args) for task in tasks} if args.rounds else {}
    import dp_accounting
    import jax_privacy
    result = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "device": device(), "seconds": time.time() - t_start,
              "load_average_at_end": os.getloadavg(),
              "versions": {"python": platform.python_version(), "jax": jax.__version__,
                           "jax_privacy": jax_privacy.__version__,
                           "dp_accounting": getattr(dp_accounting, "__version__", "0.6.0")},
              "runs": rows, "timing": timing}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    text = table(rows, timing)
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\n{time.time() - t_start:.0f} s; runs in {root}")


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    main()
