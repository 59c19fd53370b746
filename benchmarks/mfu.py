"""Training-step throughput and model FLOPs utilisation (MFU) on this machine's accelerator,
over a matrix of configurations (model, attention kernel, scanned or unrolled blocks,
remat, batch), each in a process of its own, so that one that fails (out of memory, a
kernel the backend lacks) is recorded and the next one still runs. Made for the few
minutes of a lent GPU: one call measures everything, within `--deadline` seconds.

    python benchmarks/mfu.py --out=results/mfu                  # the GPU matrix below
    python benchmarks/mfu.py --matrix=smoke --out=/tmp/mfu      # tiny shapes, any backend

For each configuration: compile time, step time (median of `--steps` timed steps after
two warm-up steps), tokens/s, peak device memory (the allocator's, where the backend
reports it), and MFU: the model's training FLOPs per step (jaxlm.plan.model_flops: 6N per
token plus attention, no recomputation) over the step time and the dense bf16 matmul rate
measured first, in the same call, on random data (`--peak-n`^3). An out-of-memory
configuration is retried at half the batch, down to one sequence. Then one
profile (`jax.profiler`, 3 steps) of the configuration with the highest MFU, with its
longest device operations summed by name. Written to OUT: results.jsonl (one line per
attempt), profile/ (the trace) and table.txt (what is printed last).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import statistics
import subprocess
import sys
import time

# (config, batch, overrides) per configuration; batches sized for one 80-141 GB GPU.
MATRICES = {
    "gpu": [
        ("gpt2_small", 32, {"attention_impl": "cudnn"}),
        ("gpt2_small", 32, {"attention_impl": "xla"}),
        ("gpt2_small", 32, {"attention_impl": "cudnn", "scan_layers": False}),
        ("gpt2_medium", 16, {"attention_impl": "cudnn"}),
        ("gpt2_medium", 16, {"attention_impl": "xla"}),
        ("gpt2_medium", 32, {"attention_impl": "cudnn", "remat": True}),
    ],
    # Tiny shapes to check the runner itself on a CPU (cudnn fails there, and is recorded).
    "smoke": [
        ("gpt2_small", 2, {"attention_impl": "xla", "num_layers": 2, "dtype": "float32"}),
        ("gpt2_small", 2, {"attention_impl": "cudnn", "num_layers": 2}),
        ("gpt2_small", 2, {"attention_impl": "xla", "num_layers": 2, "dtype": "float32",
                           "scan_layers": False, "remat": True}),
    ],
}
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs" / "gpt"


def measure_peak(n: int) -> dict:
    """Dense bf16 matmul rate of the first device: median of 10 products of random n x n."""
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    mats = [jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys]  # rotate: no cache reuse
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(mats[0], mats[1]))
    times = []
    for i in range(10):
        a, b = mats[i % 4], mats[(i + 1) % 4]
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    return {"peak_flops": 2 * n ** 3 / statistics.median(times), "n": n,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def measure_step(spec: dict) -> dict:
    """One configuration: compile, warm up, time; `spec` as a line of MATRICES, with seq."""
    import jax

    import common  # benchmarks/common.py
    from jaxlm import sharding
    from jaxlm.config import apply_override, load_config, validate
    from jaxlm.plan import model_flops
    from jaxlm.train.build import build_train

    cfg = load_config(str(CONFIGS / f"{spec['config']}.py"))
    cfg.train.batch_size = spec["batch"]
    cfg.data.update(seq_len=spec["seq"], packing=False)
    cfg.evaluate.update(tasks=(), num_samples=0)  # a training step only
    for field, value in spec["overrides"].items():
        apply_override(cfg, f"model.{field}", str(value))
    cfg.model.max_len = max(cfg.model.max_len, spec["seq"])
    validate(cfg)
    run = build_train(cfg)
    state = run.place_state(run.init_state())
    batch = common.random_batch(run, spec["batch"], cfg.model.vocab_size)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    with sharding.activate(run.setup.mesh, cfg.mesh):  # as the step's own calls lower it
        compiled = run.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, metrics = compiled(state, run.frozen, run.aux, batch, key)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, run.frozen, run.aux, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    if spec.get("profile"):
        with jax.profiler.trace(spec["profile"]):
            for _ in range(3):
                state, metrics = compiled(state, run.frozen, run.aux, batch, key)
            jax.block_until_ready(metrics)
    stats = jax.devices()[0].memory_stats() or {}
    flops = model_flops(cfg, jax.device_count())
    return {"step_s": step_s, "compile_s": compile_s, "loss": float(metrics["loss"]),
            "tokens_per_s": spec["batch"] * spec["seq"] / step_s, "flops_per_device": flops,
            "peak_bytes": stats.get("peak_bytes_in_use"),
            "bytes_limit": stats.get("bytes_limit"), "devices": jax.device_count(),
            "attention_impl": run.setup.cfg.model.attention_impl}


def worker(args) -> None:
    """The child process: one measurement, printed as one line `RESULT {json}`."""
    spec = json.loads(args.one)
    result = measure_peak(spec["n"]) if spec.get("peak") else measure_step(spec)
    print("RESULT " + json.dumps(result), flush=True)


def child(spec: dict, timeout: float) -> dict:
    """Runs one measurement in a fresh process: its result, or {"error": its last line}."""
    cmd = [sys.executable, __file__, "--one=" + json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    lines = [x for x in (done.stderr + done.stdout).splitlines() if x.strip()]
    return {"error": (lines[-1] if lines else f"exit code {done.returncode}")[:300]}


def out_of_memory(error: str) -> bool:
    return any(s in error for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def describe(spec: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in spec["overrides"].items())
    return f"{spec['config']} b{spec['batch']}x{spec['seq']} {extra}"


def top_device_ops(trace_dir: str, n: int = 20) -> list[tuple[str, float, int]]:
    """(name, ms per step, count per step) of the longest operations in a jax.profiler trace,
    from the accelerator's timelines where the trace has them, else from every thread."""
    files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    if not files:
        return []
    with gzip.open(files[0]) as f:
        events = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {p for p, name in names.items() if "/device:" in name and "CPU" not in name}
    total, count = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and (not device or e["pid"] in device):
            total[e["name"]] += e["dur"] / 1e3 / 3  # 3 profiled steps
            count[e["name"]] += 1
    return [(k, v, count[k] // 3) for k, v in sorted(total.items(), key=lambda x: -x[1])[:n]]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child process's measurement
    p.add_argument("--matrix", default="gpu", choices=sorted(MATRICES))
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--peak-n", type=int, default=8192, help="matmul size for the bf16 peak")
    p.add_argument("--deadline", type=float, default=480,
                   help="seconds: no configuration starts after this")
    p.add_argument("--timeout", type=float, default=240, help="seconds per configuration")
    p.add_argument("--out", required=False, default="mfu_results")
    args = p.parse_args()
    if args.one:
        return worker(args)
    for flag in ("seq", "steps", "peak_n", "deadline", "timeout"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be positive")
    start, out = time.monotonic(), pathlib.Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").touch()
    except OSError as e:
        p.error(f"--out={args.out}: cannot write there ({e.strerror})")

    def record(entry: dict) -> dict:
        with open(out / "results.jsonl", "a") as log:
            log.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)
        return entry

    peak = record({"peak": True, **child({"peak": True, "n": args.peak_n}, args.timeout)})
    rows = []
    for config, batch, overrides in MATRICES[args.matrix]:
        spec = {"config": config, "batch": batch, "seq": args.seq, "steps": args.steps,
                "overrides": overrides}
        while time.monotonic() - start < args.deadline:
            result = record({**spec, **child(spec, args.timeout)})
            if "error" in result and out_of_memory(result["error"]) and spec["batch"] > 1:
                spec = {**spec, "batch": spec["batch"] // 2}
                continue
            rows.append(result)
            break
    done = [r for r in rows if "error" not in r]
    for r in done:
        r["mfu"] = (r["flops_per_device"] / r["step_s"] / peak["peak_flops"]
                    if "peak_flops" in peak else None)
    profile = []
    if done and time.monotonic() - start < args.deadline:
        best = max(done, key=lambda r: r["mfu"] or r["tokens_per_s"])
        spec = {k: best[k] for k in ("config", "batch", "seq", "overrides")}
        result = child({**spec, "steps": 2, "profile": str(out / "profile")}, args.timeout)
        profile = top_device_ops(str(out / "profile")) if "error" not in result else []
        record({"profile_of": describe(spec), **result})

    rate = (f"{peak['peak_flops'] / 1e12:.1f} TFLOP/s" if "peak_flops" in peak
            else f"failed ({peak.get('error')})")
    lines = [f"# {peak.get('device', '?')}, jax {peak.get('jax', '?')}, "
             f"{time.strftime('%Y-%m-%d')}; bf16 matmul {args.peak_n}^3: {rate}",
             f"{'configuration':58s} {'tokens/s':>10s} {'step s':>7s} {'MFU':>6s} "
             f"{'peak GB':>8s} {'compile s':>9s}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{describe(r):58s} failed: {r['error'][:120]}")
            continue
        mem = f"{r['peak_bytes'] / 1e9:8.2f}" if r["peak_bytes"] else f"{'-':>8s}"
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else f"{'-':>6s}"
        lines.append(f"{describe(r):58s} {r['tokens_per_s']:10,.0f} {r['step_s']:7.3f} "
                     f"{mfu} {mem} {r['compile_s']:9.1f}")
    if profile:
        lines.append(f"longest operations of {describe(best)} (ms per step, count):")
        lines += [f"  {ms:8.2f}  {n:4d}  {name[:100]}" for name, ms, n in profile]
    lines.append(f"# {time.monotonic() - start:.0f} s in all")
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the running child got the same Ctrl-C and has ended
        print("interrupted (Ctrl-C); the attempts finished so far are in the --out folder's "
              "results.jsonl", file=sys.stderr)
        sys.exit(130)
