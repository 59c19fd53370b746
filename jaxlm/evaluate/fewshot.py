"""Few-shot evaluation: every task at every k, scored as lm-evaluation-harness scores it.

`python -m jaxlm.evaluate --config=FILE --workdir=DIR` evaluates the latest checkpoint in
DIR (or config.evaluate.params, an export), prints a table and writes DIR/results.json,
DIR/plots/*.png and, with config.evaluate.log_samples, DIR/samples/<task>_<k>shot.jsonl.

Metrics per task and k (names as lm-eval's):
  acc           multiple choice: the choice of highest summed log-likelihood is the gold
                one (ties: the first); loglikelihood tasks (LAMBADA): greedy decoding gives
                exactly the target
  acc_norm      the same after dividing each log-likelihood by its choice's length in
                characters
  perplexity    exp(-mean log-likelihood of the target) (LAMBADA)
  exact_match   generate_until tasks: the generated text, cut at the task's stop
                sequences, equals the target delimiter + target
and `<metric>_stderr`: the standard error of the mean with the sample standard deviation,
as lm-eval; for perplexity lm-eval bootstraps, jaxlm reports the delta-method estimate
perplexity x stderr(log-likelihood), which the bootstrap approximates. A result that
departs from lm-eval's protocol for its task (a split the files lack, or
config.evaluate.fewshot_exclude_self; tasks/base.py) lists why under `nonstandard`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import pathlib

import jax
import ml_collections
import numpy as np

from jaxlm import checkpoint, models, tracking
from jaxlm import workdir as workdir_lib
from jaxlm.errors import ConfigError, DataError
from jaxlm.evaluate import harness as harness_lib, plots, tasks as tasks_lib
from jaxlm.evaluate.scoring import Scorer, make_scorer
from jaxlm.evaluate.tasks.base import Task, contexts, mean_stderr, requests
from jaxlm.models import transforms
from jaxlm.setup import build

log = logging.getLogger("jaxlm")


def score_task(scorer: Scorer, task: Task, k: int, cfg_evaluate) -> tuple[dict, list[dict]]:
    """(metrics of `task` at k shots, one record per document for log_samples)."""
    e = cfg_evaluate
    docs = task.docs[:e.num_examples]
    try:
        ctxs = contexts(task, k, e.fewshot_seed, len(docs))
    except ValueError as err:
        raise ConfigError(f"config.evaluate.shots: {err}") from None
    truncated_before = scorer.truncated
    values: dict[str, list[float]] = {m: [] for m in task.metrics}
    records = []
    if task.kind == "generate_until":
        outputs = scorer.generate(ctxs, e.max_new_tokens, stop=task.until)
        for i, (doc, out) in enumerate(zip(docs, outputs)):
            target = task.target_delimiter + task.target(doc)
            values["exact_match"].append(float(out == target))
            records.append({"doc_id": i, "prompt": ctxs[i], "target": target, "output": out,
                            "exact_match": float(out == target)})
    else:
        per_doc = [requests(task, doc, ctx) for doc, ctx in zip(docs, ctxs)]
        scores = iter(scorer.loglikelihood([r for reqs in per_doc for r in reqs]))
        for i, (doc, reqs) in enumerate(zip(docs, per_doc)):
            results = [next(scores) for _ in reqs]
            lls = np.array([ll for ll, _ in results])
            record = {"doc_id": i, "arguments": reqs, "loglikelihoods": lls.tolist()}
            if task.kind == "loglikelihood":
                record.update(acc=float(results[0][1]), loglikelihood=float(lls[0]))
                values["acc"].append(record["acc"])
                values["perplexity"].append(float(lls[0]))
            else:
                gold = task.gold(doc)
                record.update(gold=gold, acc=float(int(np.argmax(lls)) == gold))
                values["acc"].append(record["acc"])
                if "acc_norm" in task.metrics:
                    lengths = np.array([float(len(c)) for c in task.choices(doc)])
                    record["acc_norm"] = float(int(np.argmax(lls / lengths)) == gold)
                    values["acc_norm"].append(record["acc_norm"])
            records.append(record)
    result = {"k": k, "num_examples": len(docs),
              "fewshot_seed": e.seed if task.sampler else e.fewshot_seed}
    for metric, v in values.items():
        if metric == "perplexity":
            mean_ll = float(np.mean(v))
            result["perplexity"] = math.exp(-mean_ll)
            result["perplexity_stderr"] = result["perplexity"] * mean_stderr(v)
        else:
            result[metric], result[f"{metric}_stderr"] = float(np.mean(v)), mean_stderr(v)
    # Requests whose context was cut on the left to fit model.max_len: fewer shots seen.
    result["truncated_requests"] = scorer.truncated - truncated_before
    if result["truncated_requests"]:
        lost = f"so they saw fewer than {k} shots" if k else "losing the start of the question"
        log.warning("eval %s k=%d: %d requests did not fit model.max_len=%d and were cut on the "
                    "left, %s (results.json: truncated_requests)",
                    task.name, k, result["truncated_requests"], scorer.max_len, lost)
    # How this differs from lm-eval's protocol for the task (empty: it does not).
    if nonstandard := list(task.nonstandard) + (list(task.nonstandard_shots) if k else []):
        result["nonstandard"] = nonstandard
    return result, records


def run_fewshot(scorer: Scorer, tasks: dict[str, Task], cfg_evaluate,
                samples_dir: pathlib.Path | None = None) -> dict:
    """{task: {description, kind, metric, chance, num_examples, source, shots: {k: result}}};
    with `samples_dir`, every document's requests and scores go to <task>_<k>shot.jsonl."""
    results = {}
    for name, task in tasks.items():
        headline = task.metrics[0]
        per_k = {}
        for k in cfg_evaluate.shots:
            per_k[str(k)], records = score_task(scorer, task, k, cfg_evaluate)
            r = per_k[str(k)]
            log.info("eval %-16s k=%d  %s %.4f ± %.4f  (chance %.3f, n=%d)", name, k, headline,
                     r[headline], r[f"{headline}_stderr"], task.chance, r["num_examples"])
            for note in r.get("nonstandard", ()):
                log.warning("eval %s k=%d is not lm-eval's protocol: %s", name, k, note)
            if samples_dir is not None and jax.process_index() == 0:
                samples_dir.mkdir(parents=True, exist_ok=True)
                workdir_lib.write_text(samples_dir / f"{name}_{k}shot.jsonl",
                                       "".join(json.dumps(x) + "\n" for x in records))
        results[name] = {"description": task.description, "kind": task.kind, "metric": headline,
                         "chance": task.chance, "num_examples": len(task.docs[:cfg_evaluate.num_examples]),
                         "source": task.source, "shots": per_k}
    return results


def _num(x: float | None) -> str:
    if x is None:  # a metric lm-eval gives no standard error (harness tasks)
        return "n/a"
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.3g}"


def format_table(results: dict, shots) -> str:
    """One row per task and metric: value ± standard error at each k."""
    width = max([12] + [len(m) for r in results.values() for m in r["shots"][str(shots[0])]
                        if f"{m}_stderr" in r["shots"][str(shots[0])]])  # harness: filter/metric
    tw = max([16] + [len(n) + 1 for n in results])
    head = (f"{'task':<{tw}} {'metric':<{width}} {'chance':>7} "
            + " ".join(f"{f'k={k}':>16}" for k in shots))
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        metrics = [m for m in r["shots"][str(shots[0])] if f"{m}_stderr" in r["shots"][str(shots[0])]]
        for i, m in enumerate(sorted(metrics, key=lambda m: m != r["metric"])):
            cells = " ".join(f"{_num(r['shots'][str(k)][m]):>7} ± {_num(r['shots'][str(k)][m + '_stderr']):<6}"
                             for k in shots)
            chance = (f"{r['chance']:>7.3f}" if m in ("acc", "acc_norm", "exact_match")
                      and r["chance"] is not None else " " * 7)
            marked = name + ("*" if any("nonstandard" in r["shots"][str(k)] for k in shots) else "")
            lines.append(f"{marked if i == 0 else '':<{tw}} {m:<{width}} {chance} {cells}")
    notes = {(name, note) for name, r in results.items() for k in shots
             for note in r["shots"][str(k)].get("nonstandard", ())}
    lines += [f"* {name}: {note}" for name, note in sorted(notes)]
    return "\n".join(lines)


def make_tasks(cfg: ml_collections.ConfigDict) -> dict[str, Task]:
    """The configured tasks, read and checked (before any training or compiling)."""
    if not cfg.evaluate.tasks:  # e.g. a real corpus: samples only
        return {}
    try:
        tasks = tasks_lib.get_tasks(cfg.evaluate)
    except DataError as e:
        raise DataError(f"config.evaluate.tasks: {e}") from None
    for task in tasks.values():  # every k must be drawable before anything runs
        if task.kind == "generate_until" and not models.family(cfg.model.arch).causal:
            raise ConfigError(f"config.evaluate.tasks: {task.name} generates text, which a "
                              f"masked LM (config.model.arch={cfg.model.arch!r}) does not do")
        for k in cfg.evaluate.shots:
            try:
                contexts(task, k, cfg.evaluate.fewshot_seed, min(2, len(task.docs)))
            except ValueError as err:
                raise ConfigError(f"config.evaluate.shots: {err}") from None
    return tasks


def during_training(cfg: ml_collections.ConfigDict):
    """The training loop's evaluate hook for config.evaluate.every: (setup, params, step) ->
    {"fewshot_<task>_k<k>_<metric>": value} for every_tasks at every_shots. The tasks are
    read now (bad ones stop the run before it starts); the scorer is made once, on the
    training mesh, and gets the current params at each call (no recompilation)."""
    run_cfg = copy.deepcopy(cfg)
    e = run_cfg.evaluate
    e.update(tasks=tuple(e.every_tasks or e.tasks), shots=tuple(e.every_shots))
    tasks = make_tasks(run_cfg)
    if not tasks:
        raise ConfigError("config.evaluate.every is set, but there are no tasks to score "
                          "(config.evaluate.every_tasks and config.evaluate.tasks are empty)")
    scorer = None

    def hook(setup, params, step) -> dict:
        nonlocal scorer
        if scorer is None:
            scorer = make_scorer(setup, params, e)
        scorer.params = scorer.generator.params = params
        results = run_fewshot(scorer, tasks, e)
        return {f"fewshot_{name}_k{k}_{m}": r["shots"][str(k)][m]
                for name, r in results.items() for k in e.shots
                for m in tasks[name].metrics}

    return hook


def evaluate(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Restores the parameters (see load_params), prints samples, runs the few-shot suite,
    and writes results.json and plots into `workdir`. Returns the results dict."""
    workdir = workdir_lib.check(workdir, must_exist=not cfg.evaluate.params)
    tasks = make_tasks(cfg)
    harness = harness_lib.prepare(cfg)  # lm-eval's catalog: names and data checked now
    setup = build(cfg)
    params, step = checkpoint.load_params(cfg, setup, workdir)

    e = cfg.evaluate
    scorer = make_scorer(setup, params, e)
    samples = scorer.generate(
        [""] * e.num_samples, e.sample_len, temperature=e.temperature, top_k=e.top_k,
        top_p=e.top_p, seed=e.seed) if setup.family.causal else []  # an encoder: no text
    for i, s in enumerate(samples):
        log.info("sample %d:\n%s", i, s)

    results = run_fewshot(scorer, tasks, e, workdir / "samples" if e.log_samples else None)
    table = format_table(results, list(e.shots))
    if harness:
        from jaxlm.evaluate.lm_eval_adapter import JaxlmLM
        harness_results = harness.run(JaxlmLM(scorer), workdir / "samples" if e.log_samples else None)
    quant = setup.cfg.quant.mode if transforms.is_quantized(setup.cfg) else None
    out = {"step": step, "tasks": results, "samples": samples,
           "truncated_requests": scorer.truncated, **({"quant": quant} if quant else {}),
           **({"harness": harness_results} if harness else {})}
    if jax.process_index() == 0:
        if results:  # config.evaluate.tasks = () writes samples only
            print(f"\nFew-shot results at step {step}{f' ({quant} weights)' if quant else ''}"
                  f":\n{table}\n", flush=True)
        if harness:
            print(f"lm-evaluation-harness tasks at step {step}:\n"
                  f"{format_table(harness_results, list(e.shots))}\n", flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        workdir_lib.write_text(workdir / "results.json", json.dumps(out, indent=2))
        written = plots.write_plots(workdir, results, list(e.shots))
        tracker = tracking.start(cfg, workdir, "evaluate", is_writer=True)
        if tracker is not None:
            track_results(tracker, step, {**results, **(harness_results if harness else {})},
                          written)
    return out


def track_results(tracker, step: int, results: dict, plot_files) -> None:
    """The few-shot table (one row per task, metric and k) and the plots, to W&B."""
    rows = [[name, metric, int(k), r[metric], r.get(f"{metric}_stderr")]
            for name, task in results.items() for k, r in task["shots"].items()
            for metric in r if isinstance(r[metric], float) and not metric.endswith("_stderr")]
    tracker.table(step, "fewshot", ["task", "metric", "k", "value", "stderr"], rows)
    tracker.images(step, plot_files)
    tracker.summary({f"fewshot/{t}/{m}/k{k}": v for t, m, k, v, _ in rows})
    tracker.close()
