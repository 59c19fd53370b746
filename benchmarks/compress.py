"""Compression measured side by side: int8 quantization (post-training and QAT) and
pruning (50% unstructured, 2:4), against the float model, in one run on one machine.

    python benchmarks/compress.py --out=runs/compress [--gpt=WORKDIR] [--steps=1000]
        [--parts=gpt,qat,prune,bert,gpt2]

Parts (each keeps its workdirs under --out, so a rerun skips finished training):
  gpt    configs/gpt/debug.py trained --steps (or --gpt=WORKDIR), quantized to int8_weight
         and int8 (python -m jaxlm.quantize).
  qat    the same config and steps with config.quant.train (int8), then quantized.
  prune  the same config and steps pruned to 50% (unstructured, per layer, cubic schedule
         from 20% to 70% of the steps) and to 2:4 (at 30% of the steps).
  bert   configs/bert/debug.py pretrained --steps, fine-tuned on the synthetic facts
         (configs/bert/facts.py); its best params quantized; scored on the validation facts.
  gpt2   a GPT-2-small-shaped model (configs/gpt/gpt2_small.py, random weights): size,
         memory and decode speed only (its accuracy means nothing).
Each GPT variant gets: bytes of its params export on disk, bytes of its params in memory
once loaded (on a CPU, device memory is host memory), held-out perplexity on 64 synthetic
documents the training never used, the few-shot suite (jaxlm.evaluate), and greedy decode
tokens/s through the serving engine (config.serve.slots rows, --decode-tokens each).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import pathlib
import subprocess
import sys
import time

import jax

import common  # benchmarks/common.py
from jaxlm import checkpoint, cli, quantize
from jaxlm.config import load_config, validate
from jaxlm.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


def gpt_config(args, **changes):
    cfg = load_config(REPO / "configs/gpt/debug.py")
    cfg.train.steps = args.steps
    cfg.evaluate.update(shots=(0, 1), num_samples=0)
    for field, value in changes.items():
        section, name = field.split("__")
        cfg[section][name] = value
    common.apply(cfg, args.overrides)
    validate(cfg)
    return cfg


def train(cfg, workdir: pathlib.Path) -> None:
    from jaxlm.train import loop
    ckpt = checkpoint.Checkpointer(workdir, read_only=True) if (workdir / "checkpoints").is_dir() else None
    if ckpt is None or ckpt.latest_step() != cfg.train.steps:
        loop.train(cfg, workdir, jax.devices())


def quantized(workdir: pathlib.Path, mode: str, dest: pathlib.Path, flag: str = "--workdir") -> pathlib.Path:
    out = dest / f"{workdir.name}_{mode}"
    if not checkpoint.is_export(out):
        cli.run(quantize.main, [f"{flag}={workdir}", f"--out={out}",
                                f"--config.quant.mode={mode}"])
    return out


def disk_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in (path / "params").rglob("*") if f.is_file())


def held_out_texts(cfg, n: int = 64) -> list[str]:
    corpus = synthetic.SyntheticCorpus(synthetic.World(cfg.data.seed))
    return [corpus.document(10_000_000 + i) for i in range(n)]


def float_export(cfg, workdir: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """The params of a run's last checkpoint as an export (what gets served or shipped)."""
    from jaxlm.setup import build
    out = dest / f"{workdir.name}_float"
    if not checkpoint.is_export(out):
        setup = build(cfg)
        params, step = checkpoint.load_params(cfg, setup, workdir)
        checkpoint.export_params(out, params, checkpoint.make_export_meta(cfg, setup.tokenizer, step))
    return out


def measure(cfg, export: pathlib.Path, scores: bool = True) -> dict:
    """The row of one variant (a params export): sizes, perplexity, few-shot scores."""
    from jaxlm.evaluate.scoring import make_scorer
    from jaxlm.setup import build
    cfg = copy.deepcopy(cfg)
    cfg.evaluate.params = str(export)
    cfg.quant.update(mode="none", train=False)  # the export's own, from its meta
    setup = build(cfg)
    before = sum(x.nbytes for x in jax.live_arrays())
    params, _ = checkpoint.load_params(cfg, setup, export)
    row = {"export_MB": disk_bytes(export) / 1e6,
           "loaded_MB": (sum(x.nbytes for x in jax.live_arrays()) - before) / 1e6}
    if scores:
        scorer = make_scorer(setup, params, setup.cfg.evaluate)
        row["perplexity"] = perplexity(scorer, setup.tokenizer, held_out_texts(cfg))
        row.update(fewshot_row(cfg, export))
    return row


def perplexity(scorer, tokenizer, texts: list[str]) -> float:
    """exp of the mean negative log-likelihood per token of `texts` (rolling windows)."""
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    return math.exp(-sum(scorer.loglikelihood_rolling(texts)) / tokens)


def fewshot_row(cfg, export: pathlib.Path) -> dict:
    """{"<task> k=<k>": score} of config.evaluate's tasks for the params at `export`
    (cfg.evaluate.params), the results written beside it."""
    from jaxlm.evaluate import fewshot
    results_dir = export.with_name(export.name + "_results")
    results_dir.mkdir(exist_ok=True)
    results = fewshot.evaluate(cfg, results_dir)["tasks"]
    return {f"{name} k={k}": r["shots"][str(k)][r["metric"]]
            for name, r in results.items() for k in cfg.evaluate.shots}


def decode_rates(cfg, exports: dict[str, pathlib.Path], steps: int, rounds: int = 3) -> dict:
    """{name: greedy decode tokens/s} of each export through the serving engine, measured
    in turns (`rounds` times round robin, the best of each kept) so that a machine busy
    with something else at one moment does not favour one variant."""
    from jaxlm.serve.__main__ import load
    engines = {}
    for name, export in exports.items():
        c = copy.deepcopy(cfg)
        c.evaluate.params = str(export)
        c.quant.update(mode="none", train=False)
        engines[name] = load(c, export)
    best = {name: 0.0 for name in exports}
    for _ in range(rounds):
        for name, service in engines.items():
            rate = decode_rate(service.batcher.engine, service.tokenizer, steps)
            best[name] = max(best[name], rate)
    return best


def decode_rate(engine, tok, steps: int) -> float:
    """Greedy tokens per second with every slot busy: prompts prefilled and inserted, then
    `steps` engine steps timed (after one untimed step)."""
    from jaxlm.inference.engine import Settings
    engine.reset()
    for slot in range(engine.slots):
        prompt = [tok.eos_id] + tok.encode(f"example {slot}: the quick brown fox")
        engine.insert(engine.prefill(prompt, Settings()), slot)
    engine.generate()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.generate()
    return engine.slots * steps / (time.perf_counter() - t0)


def lscpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    keep = [ln for ln in out.splitlines() if ln.split(":")[0] in ("Model name", "CPU(s)", "Flags")]
    return "\n".join(ln if not ln.startswith("Flags") else
                     "Flags: " + " ".join(f for f in ln.split()[1:] if f.startswith(("avx", "amx", "fma")))
                     for ln in keep)


def cell(value) -> str:
    if not isinstance(value, float):
        return "" if value is None else str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def table(title: str, rows: dict[str, dict], out: pathlib.Path | None = None) -> None:
    """Prints the rows as a markdown table (and keeps them as JSON in `out`)."""
    if out is not None:
        out.write_text(json.dumps(rows, indent=2))
    columns = []
    for r in rows.values():
        columns += [c for c in r if c not in columns]
    print(f"\n## {title}\n")
    print("| variant | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, r in rows.items():
        cells = [cell(r.get(c)) for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpt", default="", help="a trained configs/gpt/debug.py workdir")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--parts", default="gpt,qat,prune,bert,gpt2")
    args = common.parse(parser)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    print(f"# {datetime.date.today()}  jax {jax.__version__}  {jax.devices()[0].device_kind}; "
          "python benchmarks/compress.py " + " ".join(sys.argv[1:]) + "\n" + lscpu(), flush=True)
    rows = {}
    float_cfg = gpt_config(args)
    gpt = pathlib.Path(args.gpt) if args.gpt else out / "gpt"
    if "gpt" in parts:
        train(float_cfg, gpt)
        rows["float"] = measure(float_cfg, float_export(float_cfg, gpt, out))
        for mode in ("int8_weight", "int8"):
            rows[mode] = measure(float_cfg, quantized(gpt, mode, out))
            table("debug GPT", rows, out / "gpt.json")
    if "qat" in parts:
        cfg = gpt_config(args, quant__mode="int8", quant__train=True)
        train(cfg, out / "qat")
        rows["QAT int8"] = measure(float_cfg, quantized(out / "qat", "int8", out))
        table("debug GPT", rows, out / "gpt.json")
    if "prune" in parts:
        s = args.steps
        for name, changes in (("pruned 50%", dict(prune__sparsity=0.5, prune__start_step=s // 5,
                                                   prune__end_step=7 * s // 10, prune__every=50)),
                              ("pruned 2:4", dict(prune__pattern="2:4", prune__start_step=3 * s // 10,
                                                   prune__end_step=3 * s // 10))):
            cfg = gpt_config(args, **changes)
            workdir = out / name.replace(" ", "_").replace("%", "").replace(":", "of")
            train(cfg, workdir)
            rows[name] = measure(float_cfg, float_export(cfg, workdir, out))
            table("debug GPT", rows, out / "gpt.json")
    if rows:
        exports = {"float": out / f"{gpt.name}_float", "int8_weight": out / f"{gpt.name}_int8_weight",
                   "int8": out / f"{gpt.name}_int8", "QAT int8": out / "qat_int8"}
        exports = {k: v for k, v in exports.items() if k in rows}
        for name, rate in decode_rates(float_cfg, exports, args.decode_tokens).items():
            rows[name]["decode_tok_s"] = rate
        table("debug GPT", rows, out / "gpt.json")
    if "bert" in parts:
        bert_rows(args, out)
    if "gpt2" in parts:
        gpt2_rows(args, out)


def bert_rows(args, out: pathlib.Path) -> None:
    from jaxlm import finetune
    pre = load_config(REPO / "configs/bert/debug.py")
    pre.train.steps = args.steps
    train(pre, out / "bert")
    ft = load_config(REPO / "configs/bert/facts.py")
    ft.finetune.init = str(out / "bert")
    if not (out / "bert_facts" / "best" / "meta").is_dir():
        finetune.finetune(ft, out / "bert_facts")
    best = out / "bert_facts" / "best"
    rows = {}
    for name, export in (("float", best), ("int8_weight", quantized(best, "int8_weight", out, "--params")),
                         ("int8", quantized(best, "int8", out, "--params"))):
        cfg = copy.deepcopy(ft)
        cfg.evaluate.params = str(export)
        got = finetune.evaluate_file(cfg, out / "bert_facts", ft.finetune.validation_data)
        rows[name] = {"export_MB": disk_bytes(export) / 1e6, "accuracy": got["accuracy"],
                      "f1": got["f1"], "examples": got["examples"]}
    table("fine-tuned debug BERT (facts, validation)", rows, out / "bert.json")


def gpt2_rows(args, out: pathlib.Path) -> None:
    from jaxlm.setup import build
    cfg = load_config(REPO / "configs/gpt/gpt2_small.py")
    cfg.model.scan_layers = False
    cfg.serve.slots = 4
    export = out / "gpt2_small"
    if not checkpoint.is_export(export):
        setup = build(cfg)
        params = jax.jit(setup.init_params, out_shardings=setup.param_shardings)(jax.random.PRNGKey(0))
        checkpoint.export_params(export, params, checkpoint.make_export_meta(cfg, setup.tokenizer, 0))
        del params
    exports = {"float": export, **{m: quantized(export, m, out, "--params") for m in ("int8_weight", "int8")}}
    rows = {name: measure(cfg, e, scores=False) for name, e in exports.items()}
    for name, rate in decode_rates(cfg, exports, args.decode_tokens // 4).items():
        rows[name]["decode_tok_s"] = rate
    table("GPT-2 small shape (random weights), 4 slots", rows, out / "gpt2.json")


if __name__ == "__main__":
    main()
