"""Checkpoint throughput: save and restore GB/s, and how long an asynchronous save blocks
the training loop, for the full train state of a config (default: gpt2_medium, 355M
parameters: fp32 params + two Adam moments, about 4.3 GB).

    python benchmarks/checkpoint.py --config=configs/gpt/gpt2_medium.py --dir=/tmp/ckpt_bench

For each of `--repeats` rounds: an asynchronous save (the time `save()` blocks the caller
is what the loop loses; the rest is written in the background), then a synchronous save
of the same state for comparison, then a restore into the same shardings, then a
params-only restore (what evaluation and export read); then the synchronous save and the
full restore again with config.checkpoint.verify=false (no checksums computed on save,
none checked on restore), which prices the verification. The state is a real initialised
train state on this process's devices (mesh from the config).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp

from jaxlm import checkpoint
from jaxlm.config import apply_override, load_config
from jaxlm.train.build import build_train


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/gpt/gpt2_medium.py")
    p.add_argument("--dir", default="/tmp/jaxlm_ckpt_bench")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="config.a.b=value")
    args = p.parse_args()
    cfg = load_config(args.config)
    for o in args.overrides:
        field, value = o.removeprefix("--").removeprefix("config.").split("=", 1)
        apply_override(cfg, field, value)

    run = build_train(cfg)
    setup = run.setup
    t = time.perf_counter()
    state = jax.block_until_ready(run.init_state())
    size = nbytes(state)
    print(f"state: {size / 1e9:.3f} GB on {len(jax.devices())} {jax.devices()[0].platform} "
          f"device(s); init {time.perf_counter() - t:.1f} s", flush=True)
    meta = checkpoint.make_meta(cfg, setup.tokenizer, 0, "", jax.random.PRNGKey(0), [])

    root = pathlib.Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    for r in range(args.repeats):
        row = {}
        for mode in ("async", "sync"):
            cfg.checkpoint.async_save = mode == "async"
            ckpt = checkpoint.Checkpointer(root / f"{mode}{r}", cfg.checkpoint)
            t0 = time.perf_counter()
            ckpt.save(1, state, meta)
            t1 = time.perf_counter()
            ckpt.wait()
            t2 = time.perf_counter()
            row[f"{mode}_blocked_s"] = t1 - t0
            row[f"{mode}_total_s"] = t2 - t0
            row[f"{mode}_GBps"] = size / 1e9 / (t2 - t0)
            ckpt.close()
        ckpt = checkpoint.Checkpointer(root / f"sync{r}", cfg.checkpoint, read_only=True)
        t0 = time.perf_counter()
        restored, _ = ckpt.restore(1, run.abstract_state, run.state_shardings)
        jax.block_until_ready(restored)
        row["restore_s"] = time.perf_counter() - t0
        row["restore_GBps"] = size / 1e9 / row["restore_s"]
        del restored
        t0 = time.perf_counter()
        params = jax.block_until_ready(
            ckpt.restore_params(1, setup.abstract_params, setup.param_shardings))
        row["restore_params_s"] = time.perf_counter() - t0  # what evaluation and export read
        row["restore_params_GB"] = nbytes(params) / 1e9
        del params
        ckpt.close()
        t0 = time.perf_counter()
        checkpoint.checksums(state)  # the verification pass itself, alone
        row["checksums_s"] = time.perf_counter() - t0
        row["checksums_GBps"] = size / 1e9 / row["checksums_s"]
        cfg.checkpoint.update(async_save=False, verify=False)  # the same without checksums
        ckpt = checkpoint.Checkpointer(root / f"unverified{r}", cfg.checkpoint)
        t0 = time.perf_counter()
        ckpt.save(1, state, meta)
        ckpt.wait()
        row["unverified_sync_total_s"] = time.perf_counter() - t0
        row["unverified_sync_GBps"] = size / 1e9 / row["unverified_sync_total_s"]
        t0 = time.perf_counter()
        jax.block_until_ready(ckpt.restore(1, run.abstract_state, run.state_shardings)[0])
        row["unverified_restore_s"] = time.perf_counter() - t0
        row["unverified_restore_GBps"] = size / 1e9 / row["unverified_restore_s"]
        ckpt.close()
        cfg.checkpoint.verify = True
        print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
        rows.append(row)
    shutil.rmtree(root, ignore_errors=True)
    print(f"python {platform.python_version()}, jax {jax.__version__}, orbax-checkpoint "
          f"{ocp.__version__ if hasattr(ocp, '__version__') else '?'}; {sys.argv[1:]}")


if __name__ == "__main__":
    main()
