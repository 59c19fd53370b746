"""Memory of a Hugging Face import: tensors placed one at a time, never the model twice.

    python benchmarks/interop_load.py [--size=medium] [--devices=8]

Writes a GPT-2-shaped model of random weights (configs/gpt/_gpt2.py sizes) as a Hugging
Face folder, then imports it in a fresh process onto `--devices` fake CPU devices under
FSDP and reports that process's peak resident memory against the model's bytes. On fake
CPU devices the devices' memory is this host's, so the floor is 1x the model (the placed
params); a converter that loaded the whole file first would need about 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

_IMPORT = """
import json, resource, sys, threading, time
import jax

peak_anon = [0]
def sample():  # anonymous resident memory (what the process holds, not file pages it maps)
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
from jaxlm.config import base_config
from jaxlm.interop import hf
cfg = base_config()
cfg.mesh.update(strategy="fsdp", data=1, fsdp=jax.device_count())
jax.block_until_ready(jax.numpy.ones(8) + 1)  # the runtime is up: its memory is the baseline
time.sleep(0.05)
base, base_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_anon[0]
start = time.perf_counter()
_, setup, params = hf.read(sys.argv[1], cfg)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
n = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
time.sleep(0.05)
print(json.dumps({"seconds": seconds, "param_bytes": n, "baseline_rss_bytes": base,
                  "baseline_anon_bytes": base_anon, "peak_anon_bytes": peak_anon[0],
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium")
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}",
               JAX_PLATFORMS="cpu")
    sys.path.insert(0, str(REPO / "configs/gpt"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "hf"
        write = (f"import sys; sys.path.insert(0, {str(REPO / 'configs/gpt')!r}); import jax, numpy as np\n"
                 "from _gpt2 import gpt2_config\nfrom jaxlm.setup import build\nfrom jaxlm.interop import hf\n"
                 f"cfg = gpt2_config({args.size!r})\n"
                 "cfg.mesh.update(strategy='fsdp', data=1, fsdp=jax.device_count())\n"
                 "s = build(cfg)\n"
                 "p = jax.jit(s.init_params, out_shardings=s.param_shardings)(jax.random.PRNGKey(0))\n"
                 f"hf.export_folder(cfg, p, 'byte', {str(folder)!r})\n")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", write], env=env, check=True, cwd=REPO)
        written = time.perf_counter() - start
        from jaxlm.data.tokenizers.gpt2 import byte_alphabet
        alpha = byte_alphabet()
        vocab = {c: i for i, c in enumerate(sorted(alpha, key=alpha.get))}
        vocab["<|endoftext|>"] = 256
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        files = sorted(p.name for p in folder.iterdir())
        out = subprocess.run([sys.executable, "-c", _IMPORT, str(folder)], env=env, check=True,
                             cwd=REPO, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
    gb = 1e9
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; gpt2_{args.size}, "
          f"{args.devices} fake devices (FSDP); files {files}; export {written:.1f} s")
    grew = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
    anon = r["peak_anon_bytes"] - r["baseline_anon_bytes"]
    print(f"import: {r['seconds']:.1f} s, params {r['param_bytes'] / gb:.2f} GB; resident memory "
          f"grew {grew / gb:.2f} GB ({grew / r['param_bytes']:.2f}x the params; includes the "
          f"file's pages mapped by safetensors, which the kernel can drop); anonymous memory "
          f"grew {anon / gb:.2f} GB ({anon / r['param_bytes']:.2f}x the params)")


if __name__ == "__main__":
    main()
