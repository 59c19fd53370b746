"""Few-shot evaluation throughput: jaxlm's evaluator in process against lm-evaluation-harness
driving the same model through jaxlm's adapter, in one run, on the same documents.

    python benchmarks/fewshot_eval.py [--workdir=runs/debug] [--limit=200] [--shots=0]

Model: the checkpoint in --workdir when it holds one (e.g. the main job's runs/debug),
else the debug GPT's random initialisation (throughput does not depend on the weights).
Tasks: piqa, arc_easy, winogrande, copa, sst2 from ../shared/data/fewshot. Each side is run
twice and the second run is timed, so compilation is not counted. Prints documents per
second for both and their ratio; lm-eval (pip install -e '.[test]') is needed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import tempfile
import time

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("piqa", "arc_easy", "winogrande", "copa", "sst2")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(REPO / "runs/debug"))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--shots", type=int, default=0)
    args = parser.parse_args()
    import lm_eval

    from jaxlm import checkpoint
    from jaxlm.config import load_config
    from jaxlm.evaluate import fewshot, tasks as tasks_lib
    from jaxlm.evaluate.lm_eval_adapter import JaxlmLM, evaluate_local
    from jaxlm.evaluate.scoring import make_scorer
    from jaxlm.setup import build

    cfg = load_config(REPO / "configs/gpt/debug.py")
    cfg.evaluate.update(tasks=TASKS, shots=(args.shots,), num_examples=args.limit)
    setup = build(cfg)
    workdir = pathlib.Path(args.workdir)
    if (workdir / "checkpoints").is_dir():
        params, step = checkpoint.load_params(cfg, setup, workdir)
        model = f"{workdir} step {step}"
    else:
        params, model = jax.jit(setup.init_params)(jax.random.PRNGKey(0)), "random init"
    scorer = make_scorer(setup, params, cfg.evaluate)
    tasks = tasks_lib.get_tasks(cfg.evaluate)
    docs = sum(len(t.docs[:args.limit]) for t in tasks.values())
    folder = tempfile.mkdtemp(prefix="lm_eval_tasks")

    def jaxlm_side():
        fewshot.run_fewshot(scorer, tasks, cfg.evaluate)

    def lm_eval_side():
        evaluate_local(JaxlmLM(scorer), tasks, folder, args.shots, args.limit)

    times = {}
    for name, fn in (("jaxlm", jaxlm_side), ("lm-eval + adapter", lm_eval_side)):
        fn()  # compiles every length bucket
        start = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - start
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax "
          f"{jax.__version__}, lm_eval {lm_eval.__version__}; model: {model}; tasks "
          f"{', '.join(TASKS)}, k={args.shots}, {docs} documents")
    for name, t in times.items():
        print(f"{name:<18} {t:7.2f} s  {docs / t:8.1f} documents/s")
    print(f"ratio jaxlm / lm-eval: {times['lm-eval + adapter'] / times['jaxlm']:.2f}x")


if __name__ == "__main__":
    main()
