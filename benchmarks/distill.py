"""Distillation to a half-width student against the same student trained alone, on the
built-in synthetic corpus: same data, steps and seeds; scored by the few-shot suite
(jaxlm.evaluate) after training.

    python benchmarks/distill.py --out=runs/distill --teacher-steps=1000 --student-steps=500

The teacher is configs/gpt/debug.py trained --teacher-steps (or --teacher=WORKDIR, kept);
the student is the same config at half the width (d_model 64, mlp 256, 4 heads), trained
--student-steps with config.train.objective=causal_lm ("alone") or distill (the teacher,
temperature --temperature, alpha --alpha), for each of --seeds (config.train.seed; the
data order follows it too). Extra `--config.FIELD=VALUE` arguments go to every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import time

import jax

import common  # benchmarks/common.py
from jaxlm.config import load_config, validate
from jaxlm.evaluate import fewshot
from jaxlm.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]


def config(args, steps: int, seed: int, student: bool, teacher: str = ""):
    cfg = load_config(REPO / "configs/gpt/debug.py")
    cfg.train.update(steps=steps, seed=seed)
    cfg.evaluate.update(shots=(0, 1), num_samples=0)
    if student:
        cfg.model.update(d_model=64, mlp_dim=256, num_heads=4)
    if teacher:
        cfg.train.objective = "distill"
        cfg.distill.update(teacher=teacher, temperature=args.temperature, alpha=args.alpha)
    common.apply(cfg, args.overrides)
    validate(cfg)
    return cfg


def run(cfg, workdir: pathlib.Path) -> dict:
    t0 = time.perf_counter()
    loop.train(cfg, workdir, jax.devices())
    seconds = time.perf_counter() - t0
    results = fewshot.evaluate(cfg, workdir)["tasks"]
    scores = {f"{name} k={k}": r["shots"][str(k)][r["metric"]]
              for name, r in results.items() for k in (0, 1)}
    return {"seconds": seconds, **scores}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher", default="", help="a trained teacher workdir (else trained)")
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--student-steps", type=int, default=500)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = common.parse(parser)
    out = pathlib.Path(args.out)
    teacher = args.teacher or str(out / "teacher")
    if not args.teacher:
        print("teacher:", json.dumps(run(config(args, args.teacher_steps, 0, False), out / "teacher")),
              flush=True)
    rows = {"alone": [], "distilled": []}
    for seed in map(int, args.seeds.split(",")):
        for kind in rows:
            cfg = config(args, args.student_steps, seed, True, teacher if kind == "distilled" else "")
            rows[kind].append(run(cfg, out / f"{kind}_{seed}"))
            print(kind, seed, json.dumps(rows[kind][-1]), flush=True)
    print(f"\n# {datetime.date.today()}  jax {jax.__version__}; python benchmarks/distill.py "
          + " ".join(__import__("sys").argv[1:]))
    metrics = [m for m in rows["alone"][0] if m != "seconds"]
    print(f"{'metric':<22} {'alone':>16} {'distilled':>16}")
    for m in metrics + ["seconds"]:
        cells = []
        for kind in rows:
            v = [r[m] for r in rows[kind]]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):8.3f} ± {sd:5.3f}")
        print(f"{m:<22} {cells[0]:>16} {cells[1]:>16}")


if __name__ == "__main__":
    main()
