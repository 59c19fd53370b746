"""Input-pipeline throughput against what the train step consumes, at GPT-2 small shapes.

    python benchmarks/input_pipeline.py [--data_dir=/tmp/bench_tfds] [--step_batch=1]

Measures, in one process on this machine:
  1. building the token cache (TFDS read + tokenize + write), tokens/s, once;
  2. `batches.local_batch` (windows through the next-token objective) for seq_len 1024 (concatenated windows, then packing), tokens/s:
     the per-step work of the data thread;
  3. the jitted gpt2_small train step (124M parameters, seq 1024) at a batch small enough
     for this machine, tokens/s;
and prints the ratio of 2 to 3: how many times faster the data thread produces tokens
than the step consumes them (above 1: the input pipeline is not the bottleneck).
Data: tiny Shakespeare prepared offline from shared/data (byte tokens, well inside GPT-2's
vocabulary), so the numbers need no download.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import shutil
import time

import jax
import numpy as np

from jaxlm.config import load_config
from jaxlm.data import batches, sources, tfds_split, token_cache
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.train.objectives import CausalLM

REPO = pathlib.Path(__file__).resolve().parents[1]


def pipeline_tokens_per_second(source, batch: int, seconds: float) -> tuple[float, int]:
    """local_batch rows per second x seq_len, over consecutive steps for ~`seconds`."""
    make = CausalLM(source.seq_len, source.packing).example
    batches.local_batch(source, 0, batch, 1 << 20, make)  # warm the epoch permutation
    step, start = 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batches.local_batch(source, step, batch, 1 << 20, make)
        step += 1
    elapsed = time.perf_counter() - start
    return (step - 1) * batch * source.seq_len / elapsed, step - 1


def train_step_tokens_per_second(batch: int, steps: int) -> tuple[float, float]:
    from jaxlm.train.build import build_train
    cfg = load_config(REPO / "configs/gpt/gpt2_small.py")
    cfg.train.update(batch_size=batch, steps=steps + 1)
    cfg.optimizer.warmup_steps = 1
    run = build_train(cfg, jax.devices()[:1])
    state = run.place_state(run.init_state())
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, (batch, 1025)).astype(np.int32)
    rows = [run.objective.example({"tokens": t}) for t in tokens]
    b = run.place_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    t0 = time.perf_counter()
    state, m = run(state, b, jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = run(state, b, jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    return batch * 1024 * steps / (time.perf_counter() - t0), compile_s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", default="/tmp/jaxlm_bench_tfds")
    p.add_argument("--manual_dir", default=str(REPO.parent / "shared/data/tinyshakespeare"))
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--batch", type=int, default=64, help="rows per local_batch call")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--step_batch", type=int, default=1, help="train-step batch (CPU: small)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    import tensorflow_datasets as tfds
    print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}; python "
          f"{platform.python_version()}, jax {jax.__version__}, tfds {tfds.__version__}")
    tok = get_tokenizer(args.tokenizer)
    split = tfds_split.open_split("tiny_shakespeare", "train", args.data_dir, "", args.manual_dir)
    root = pathlib.Path(args.data_dir) / "bench_tokens"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    cache = token_cache.load_or_build(split, tok, root)
    build = time.perf_counter() - t0
    print(f"token cache build ({args.tokenizer}): {cache.meta['tokens']:,} tokens in {build:.2f} s"
          f" = {cache.meta['tokens'] / build:,.0f} tokens/s")

    rates = {}
    for packing in (False, True):
        src = sources.TokenSource(cache, tok, 1024, packing, seed=0)
        rates[packing], n = pipeline_tokens_per_second(src, args.batch, args.seconds)
        print(f"local_batch seq 1024, {args.batch} rows, packing={packing}: "
              f"{rates[packing]:,.0f} tokens/s ({n} batches)")
    step_rate, compile_s = train_step_tokens_per_second(args.step_batch, args.steps)
    print(f"gpt2_small train step, batch {args.step_batch} x 1024 on {jax.devices()[0].platform}: "
          f"{step_rate:,.0f} tokens/s (compile {compile_s:.0f} s, {args.steps} steps timed)")
    for packing, r in rates.items():
        print(f"ratio pipeline/step (packing={packing}): {r / step_rate:,.0f}x")


if __name__ == "__main__":
    main()
