"""Adapting the debug models to labelled tasks: LoRA against full fine-tuning (issue 28,
item 1) and augmentation against none (item 4), three seeds each.

    python benchmarks/adapt.py --out=runs/adapt

1. Pretrains configs/bert/debug.py (masked LM) and configs/gpt/debug.py (causal LM) for
   --pretrain-steps each (kept in OUT/pretrain_{bert,gpt}; an existing one is reused).
2. Fine-tunes both from them on the built-in tasks (configs/bert/facts.py, rules.py: 64
   labels each) and the SST-2 dev slice of shared/data (configs/bert/sst2.py: 400 train,
   100 validation; skipped with a message when the file is absent), full fine-tuning and
   LoRA (--lora-rank, default targets, config.lora.alpha 16, learning rate
   --lora-lr-scale times the task's), for every seed of --seeds (config.train.seed). GPT
   takes the BERT task config's finetune section, seq_len, head and dropout over
   configs/gpt/debug.py (byte tokenizer, classifying at the last token). Facts and rules
   run --epochs epochs (their configs say 40), SST-2 --sst2-epochs (its config says 5):
   shortened so that everything fits in about 30 minutes on 2 CPU cores.
3. Measures, from each arm's initialised train state: trainable parameters (elements of
   state.params) and optimizer-state bytes (checkpoint.tree_bytes(state.opt_state)); and
   the train step time of LoRA and full side by side, interleaved: per seed, --rounds
   rounds of --timed-steps steps of each arm on that seed's first training batch, the
   order of the arms alternating, after two untimed (compiling) steps; the per-seed figure
   is the median over rounds and the ratio LoRA / full of those medians.
4. Augmentation on the 64-label tasks (BERT and GPT): the full fine-tuning runs of step 2
   are the "none" arm (the same config and seed); the other arm adds
   --augment (config.finetune.augment fields; GPT's byte tokenizer has no [MASK], so
   GPT drops mask).

Accuracy is the validation accuracy at the best epoch (chosen on that same validation
set, as the README's fine-tuning tables are). Runs are interleaved (seed, task, model,
then the arms in alternating order) so that load from other processes falls on both
arms alike. Every finished run keeps its WORKDIR/results.json; re-running the command
skips them. Writes OUT/runs.jsonl, OUT/timing.jsonl and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import time

import common  # benchmarks/common.py
from jaxlm.data.tokenizers import get_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]


def config_for(arch: str, task: str, seed: int, init: str, args, *, lora: bool = False,
               augment: dict | None = None):
    """The fine-tuning config of one run."""
    from jaxlm.config import load_config, validate

    task_cfg = load_config(REPO / f"configs/bert/{task}.py")
    cfg = load_config(REPO / f"configs/{arch}/debug.py")
    if cfg.model.arch == task_cfg.model.arch:  # the task configs are BERT's
        cfg = task_cfg
    else:  # the task config's data, head and fine-tuning settings over the other debug model
        cfg.model.update(num_classes=task_cfg.model.num_classes, dropout=task_cfg.model.dropout)
        cfg.data.seq_len = task_cfg.data.seq_len
        for k, v in task_cfg.finetune.items():
            if k != "augment":
                cfg.finetune[k] = v
        cfg.evaluate.batch_size = task_cfg.evaluate.batch_size
    cfg.train.seed = seed
    cfg.finetune.init = init
    cfg.finetune.epochs = args.sst2_epochs if task == "sst2" else args.epochs
    if lora:
        cfg.lora.rank = args.lora_rank
        cfg.finetune.learning_rate *= args.lora_lr_scale
    for k, v in (augment or {}).items():
        cfg.finetune.augment[k] = v
    common.apply(cfg, args.overrides)
    validate(cfg)
    return cfg


def pretrain(arch: str, steps: int, workdir: pathlib.Path) -> float:
    """Seconds to pretrain (0 when the workdir already holds the finished run)."""
    from jaxlm.config import load_config, validate
    from jaxlm.train import loop
    cfg = load_config(REPO / f"configs/{arch}/debug.py")
    cfg.train.steps, cfg.checkpoint.every = steps, steps
    cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, steps // 5)
    validate(cfg)
    if (workdir / "checkpoints" / str(steps)).is_dir():
        return 0.0
    t0 = time.perf_counter()
    if loop.train(cfg, workdir)["preempted"]:
        raise SystemExit(f"pretraining {workdir} was interrupted; run the command again")
    return time.perf_counter() - t0


def finetune_run(cfg, workdir: pathlib.Path) -> dict:
    """Validation accuracy (best epoch) and wall seconds of one fine-tuning run."""
    from jaxlm import finetune
    done = workdir / "results.json"
    if not done.is_file():
        t0 = time.perf_counter()
        if "validation" not in finetune.finetune(cfg, workdir):  # preempted
            raise SystemExit(f"fine-tuning {workdir} was interrupted; run the command again")
        (workdir / "bench_seconds.txt").write_text(f"{time.perf_counter() - t0:.2f}\n")
    results = json.loads(done.read_text())
    return {"accuracy": results["validation"]["accuracy"],
            "f1_macro": results["validation"].get("f1_macro"),
            "seconds": float((workdir / "bench_seconds.txt").read_text())}


def training_source(cfg):
    from jaxlm import finetune, models
    from jaxlm.data import labelled
    from jaxlm.data.tokenizers import get_tokenizer
    tok = get_tokenizer(cfg.data.tokenizer)
    data = finetune.read_data(cfg, cfg.finetune.train_data, "train_data").take(
        cfg.finetune.train_examples)
    enc = labelled.Encoder(tok, cfg.data.seq_len, pooled=models.family(cfg.model.arch).pooled)
    return labelled.LabelledSource(data, enc, cfg.train.seed)


def measure(cfgs: dict, seeds: list[int], rounds: int, steps: int) -> dict:
    """Per arm: trainable parameters and optimizer-state bytes of its initialised state,
    and step seconds per seed (median of interleaved rounds)."""
    import jax

    from jaxlm import checkpoint, finetune
    from jaxlm.data.batches import local_batch
    from jaxlm.train.build import build_train
    arms, built = list(cfgs), {}
    for arm, cfg in cfgs.items():
        source = training_source(cfg)
        run = finetune.run_config(cfg, len(source))
        ts = build_train(run)
        state = ts.place_state(ts.init_state())
        built[arm] = {"step": ts, "state": state,
                      "trainable": int(sum(x.size for x in jax.tree.leaves(state.params))),
                      "opt_bytes": int(checkpoint.tree_bytes(state.opt_state)),
                      "batches": []}
        for seed in seeds:
            cfg_s = cfg.copy_and_resolve_references()
            cfg_s.train.seed = seed
            src = training_source(cfg_s)
            built[arm]["batches"].append(ts.place_batch(local_batch(
                src, 0, run.train.batch_size, run.model.vocab_size, ts.objective.example)))
    rng = jax.random.PRNGKey(0)
    for arm in arms:  # compile, and one more untimed step
        b = built[arm]
        for _ in range(2):
            b["state"], m = b["step"](b["state"], b["batches"][0], rng)
        jax.block_until_ready(m)
    out = {arm: {"trainable": built[arm]["trainable"], "opt_bytes": built[arm]["opt_bytes"],
                 "step_s": []} for arm in arms}
    for i, _ in enumerate(seeds):
        times = {arm: [] for arm in arms}
        for r in range(rounds):
            for arm in (arms if (r + i) % 2 == 0 else arms[::-1]):
                b = built[arm]
                t0 = time.perf_counter()
                for _ in range(steps):
                    b["state"], m = b["step"](b["state"], b["batches"][i], rng)
                jax.block_until_ready(m)
                times[arm].append((time.perf_counter() - t0) / steps)
        for arm in arms:
            out[arm]["step_s"].append(statistics.median(times[arm]))
    return out


def mean_std(xs, fmt="{:.3f}") -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.replace('+', '').format(sd)}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=15, help="facts and rules (configs: 40)")
    p.add_argument("--sst2-epochs", type=int, default=3, help="SST-2 (config: 5)")
    p.add_argument("--archs", default="bert,gpt")
    p.add_argument("--tasks", default="facts,rules,sst2")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-lr-scale", type=float, default=10.0)
    p.add_argument("--augment", default="delete=0.1,swap=0.1,insert=0.1,mask=0.1",
                   help="config.finetune.augment fields of the augmented arm")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--timed-steps", type=int, default=4)
    args = common.parse(p)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # One XLA cache for every run: the seeds' runs recompile the same programs.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "xla_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    import jax
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("jaxlm").setLevel(logging.WARNING)

    seeds = [int(s) for s in args.seeds.split(",")]
    archs, tasks = args.archs.split(","), args.tasks.split(",")
    augment = {k: float(v) for k, v in (kv.split("=") for kv in args.augment.split(","))}
    if "sst2" in tasks:
        from jaxlm.config import load_config
        sst2 = pathlib.Path(load_config(REPO / "configs/bert/sst2.py").finetune.train_data
                            .rpartition("[")[0])
        if not sst2.is_file():
            print(f"SST-2: {sst2} is absent; skipping the SST-2 runs", flush=True)
            tasks.remove("sst2")

    header = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
              "jax": jax.__version__, "command": "python benchmarks/adapt.py " + " ".join(sys.argv[1:])}
    print(json.dumps(header), flush=True)
    inits = {}
    for arch in archs:
        inits[arch] = out / f"pretrain_{arch}"
        seconds = pretrain(arch, args.pretrain_steps, inits[arch])
        print(f"pretrained {arch}: {args.pretrain_steps} steps, {seconds:.0f} s", flush=True)

    # Accuracy: every run, interleaved; the arms' order alternates.
    runs = []
    n = 0
    for seed in seeds:
        for task in tasks:
            for arch in archs:
                arms = {"full": {}, "lora": {"lora": True}}
                if task != "sst2":
                    masks = "mask" in get_tokenizer(config_for(arch, task, seed, "", args)
                                                     .data.tokenizer).bert_ids
                    arms["augment"] = {"augment": {k: v for k, v in augment.items()
                                                   if masks or k != "mask"}}
                order = list(arms) if n % 2 == 0 else list(arms)[::-1]
                n += 1
                for arm in order:
                    cfg = config_for(arch, task, seed, str(inits[arch]), args, **arms[arm])
                    r = finetune_run(cfg, out / "ft" / f"{arch}_{task}_{arm}_s{seed}")
                    row = {"arch": arch, "task": task, "arm": arm, "seed": seed, **r}
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))

    # Parameters, optimizer state and step time: LoRA and full, interleaved.
    timing = []
    for task in tasks:
        for arch in archs:
            cfgs = {arm: config_for(arch, task, seeds[0], "", args, lora=arm == "lora")
                    for arm in ("full", "lora")}
            m = measure(cfgs, seeds, args.rounds, args.timed_steps)
            row = {"arch": arch, "task": task, **{f"{arm}_{k}": v for arm in m for k, v in m[arm].items()}}
            timing.append(row)
            print(json.dumps(row), flush=True)
    (out / "timing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in timing))
    summary = tables(runs, timing, args, header)
    (out / "summary.md").write_text(summary)
    print(summary)


def tables(runs: list[dict], timing: list[dict], args, header: dict) -> str:
    def acc(arch, task, arm):
        return [r["accuracy"] for r in runs if (r["arch"], r["task"], r["arm"]) == (arch, task, arm)]

    lines = [f"{header['date']}, python {header['python']}, jax {header['jax']}: "
             f"`{header['command']}`", "",
             "| model | task | arm | accuracy | trainable params | optimizer state | step time | "
             "LoRA / full step time |", "|---|---|---|---|---|---|---|---|"]
    for t in timing:
        arch, task = t["arch"], t["task"]
        ratio = [lo / fu for lo, fu in zip(t["lora_step_s"], t["full_step_s"])]
        for arm in ("full", "lora"):
            lines.append(
                f"| {arch} | {task} | {arm} | {mean_std(acc(arch, task, arm))} | "
                f"{t[arm + '_trainable']:,} | {t[arm + '_opt_bytes'] / 1024:,.1f} KiB | "
                f"{mean_std([s * 1e3 for s in t[arm + '_step_s']], '{:.1f}')} ms | "
                + (mean_std(ratio, "{:.2f}") if arm == "lora" else "") + " |")
    lines += ["", "| model | task (64 labels) | none | augmented | difference (paired by seed) |",
              "|---|---|---|---|---|"]
    for arch in dict.fromkeys(r["arch"] for r in runs):
        for task in dict.fromkeys(r["task"] for r in runs if r["arm"] == "augment"):
            none, aug = acc(arch, task, "full"), acc(arch, task, "augment")
            if none and aug:
                lines.append(f"| {arch} | {task} | {mean_std(none)} | {mean_std(aug)} | "
                             f"{mean_std([a - b for a, b in zip(aug, none)], '{:+.3f}')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
