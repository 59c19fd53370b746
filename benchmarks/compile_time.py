"""Compile time of the train step by depth, blocks unrolled vs scanned (config.model.scan_layers).

    python benchmarks/compile_time.py --config=configs/gpt/gpt2_small.py --layers=12,24,48

Each (depth, layout) is traced, lowered and compiled ahead of time for this host's first
device (jaxlm.plan's path), in a fresh process so that no cache is shared; the batch is
tiny since compile time depends on the program, not the batch. Extra --config.FIELD=VALUE
arguments apply to every case (e.g. --config.model.remat=true).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import jax

import common  # benchmarks/common.py

CHILD = """
import json, sys, time
import jax
from jaxlm.config import apply_override, load_config, validate
from jaxlm.plan import compile_train_step
config, layers, scan, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
cfg = load_config(config)
for o in ["model.dtype=float32", f"model.num_layers={layers}", f"model.scan_layers={scan}",
          "train.batch_size=1", "data.seq_len=128", "model.attention_impl=xla", *overrides]:
    apply_override(cfg, *o.removeprefix("--").removeprefix("config.").split("=", 1))
validate(cfg)
t0 = time.perf_counter()
compile_train_step(cfg, jax.devices()[:1])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/gpt/gpt2_small.py")
    p.add_argument("--layers", default="12,24,48")
    args = common.parse(p)  # + --config.FIELD=VALUE arguments
    depths = [int(x) for x in args.layers.split(",")]
    times = {}
    for scan in ("false", "true"):
        for n in depths:
            out = subprocess.run([sys.executable, "-c", CHILD, args.config, str(n), scan,
                                  *args.overrides], capture_output=True, text=True, check=True)
            times[scan, n] = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
            print(f"layers {n:3d}  {'scanned' if scan == 'true' else 'unrolled':8s}  "
                  f"{times[scan, n]:7.1f} s", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"{args.config}, batch 1 x 128, fp32, compile for one CPU device")
    print("| layers | unrolled (s) | scanned (s) |\n|---|---|---|")
    for n in depths:
        print(f"| {n} | {times['false', n]:.1f} | {times['true', n]:.1f} |")
    for scan in ("false", "true"):
        print(f"{'scanned' if scan == 'true' else 'unrolled'}: {depths[-1]} vs {depths[0]} layers "
              f"{times[scan, depths[-1]] / times[scan, depths[0]]:.2f}x")


if __name__ == "__main__":
    main()
