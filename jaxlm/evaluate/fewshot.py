"""Few-shot evaluation: every task at every k, scored by log-likelihood or exact match.

`python -m jaxlm.evaluate --config=FILE --workdir=DIR` evaluates the latest checkpoint in
DIR and writes DIR/results.json and DIR/plots/*.png.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import ml_collections
import numpy as np

from jaxlm import checkpoint
from jaxlm import workdir as workdir_lib
from jaxlm.data import synthetic
from jaxlm.errors import ConfigError
from jaxlm.evaluate import plots
from jaxlm.evaluate.scoring import Scorer
from jaxlm.evaluate.tasks import Task, format_prompt, get_tasks
from jaxlm.setup import build

log = logging.getLogger("jaxlm")


def evaluate_task(scorer: Scorer, task: Task, k: int, seed: int, max_new_tokens: int) -> dict:
    """Accuracy of one task at k shots.

    multiple_choice: `accuracy` picks the choice with the highest summed log-likelihood;
    `accuracy_norm` divides it by the choice's length in bytes first (lm-eval's acc_norm).
    exact_match: greedy continuation up to the first newline must equal the gold answer.
    """
    prompts = [format_prompt(task, ex, k, seed) for ex in task.examples]
    result = {"num_examples": len(task.examples), "chance": task.chance, "k": k}
    truncated_before = scorer.truncated
    if task.kind == "multiple_choice":
        requests = [(p, c) for p, ex in zip(prompts, task.examples) for c in ex.choices]
        scores = iter(scorer.loglikelihood(requests))
        correct, correct_norm = [], []
        for ex in task.examples:
            ll = np.array([next(scores)[0] for _ in ex.choices])
            lengths = np.array([len(c.encode()) for c in ex.choices])
            correct.append(int(np.argmax(ll)) == ex.label)
            correct_norm.append(int(np.argmax(ll / lengths)) == ex.label)
        result.update(accuracy=float(np.mean(correct)), accuracy_norm=float(np.mean(correct_norm)))
    else:
        outputs = scorer.generate(prompts, max_new_tokens, stop="\n")
        correct = [out == ex.answer for out, ex in zip(outputs, task.examples)]
        result.update(accuracy=float(np.mean(correct)))
    # Requests whose prompt was cut on the left to fit model.max_len: they saw fewer shots.
    result["truncated_requests"] = scorer.truncated - truncated_before
    if result["truncated_requests"]:
        log.warning("eval %s k=%d: %d requests did not fit model.max_len=%d and were cut on the "
                    "left, so they saw fewer than %d shots (results.json: truncated_requests)",
                    task.name, k, result["truncated_requests"], scorer.max_len, k)
    return result


def run_fewshot(scorer: Scorer, tasks: dict[str, Task], shots, seed: int,
                max_new_tokens: int) -> dict:
    """{task: {"description", "kind", "chance", "num_examples", "shots": {k: result}}}."""
    results = {}
    for name, task in tasks.items():
        per_k = {}
        for k in shots:
            per_k[str(k)] = evaluate_task(scorer, task, k, seed, max_new_tokens)
            log.info("eval %-16s k=%d  accuracy %.3f  (chance %.3f, n=%d)", name, k,
                     per_k[str(k)]["accuracy"], task.chance, len(task.examples))
        results[name] = {"description": task.description, "kind": task.kind,
                         "chance": task.chance, "num_examples": len(task.examples),
                         "shots": per_k}
    return results


def format_table(results: dict, shots) -> str:
    head = f"{'task':<16} {'kind':<16} {'chance':>7} " + " ".join(f"{f'k={k}':>7}" for k in shots)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        accs = " ".join(f"{r['shots'][str(k)]['accuracy']:>7.3f}" for k in shots)
        lines.append(f"{name:<16} {r['kind']:<16} {r['chance']:>7.3f} {accs}")
    return "\n".join(lines)


def make_tasks(cfg: ml_collections.ConfigDict) -> dict[str, Task]:
    if not cfg.evaluate.tasks:  # e.g. a real corpus: samples only
        return {}
    if cfg.data.name != "synthetic":
        raise ConfigError(f"config.evaluate.tasks: no few-shot tasks for data {cfg.data.name!r} yet")
    world = synthetic.World(cfg.data.seed)
    try:
        return get_tasks(list(cfg.evaluate.tasks), world, num_examples=cfg.evaluate.num_examples)
    except ValueError as e:
        raise ConfigError(f"config.evaluate.tasks: {e}") from None


def evaluate(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Restores the parameters (see load_params), prints samples, runs the few-shot suite,
    and writes results.json and plots into `workdir`. Returns the results dict."""
    workdir = workdir_lib.check(workdir, must_exist=not cfg.evaluate.params)
    setup = build(cfg)
    params, step = checkpoint.load_params(cfg, setup, workdir)
    tasks = make_tasks(cfg)

    e = cfg.evaluate
    scorer = Scorer(setup.model, params, setup.tokenizer, setup.mesh, cfg.mesh, e.batch_size)
    samples = scorer.generate([""] * e.num_samples, e.sample_len, temperature=e.temperature,
                              seed=e.seed)
    for i, s in enumerate(samples):
        log.info("sample %d:\n%s", i, s)

    results = run_fewshot(scorer, tasks, list(e.shots), e.seed, e.max_new_tokens)
    table = format_table(results, list(e.shots))
    out = {"step": step, "tasks": results, "samples": samples,
           "truncated_requests": scorer.truncated}
    if jax.process_index() == 0:
        if results:  # config.evaluate.tasks = () writes samples only
            print(f"\nFew-shot results at step {step}:\n{table}\n", flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        workdir_lib.write_text(workdir / "results.json", json.dumps(out, indent=2))
        plots.write_plots(workdir, results, list(e.shots))
    return out
