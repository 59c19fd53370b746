"""Fit table against MaxText: per-chip memory of a train step compiled ahead of time for a
TPU topology (no TPU needed: libtpu's topology descriptions), jaxlm and MaxText side by side.

    python benchmarks/fit_table.py --topology=v5e:4x4 --rows=gpt3-125m,gpt3-350m \
        --batches=1,2 --sides=jaxlm,maxtext --maxtext-python=/tmp/fit/mt/bin/python \
        --out=/tmp/fit/fit.jsonl
    python benchmarks/fit_table.py --table --out=/tmp/fit/fit.jsonl   # the markdown table

Each (row, topology, per-chip batch, side) compiles in a fresh process, so that its wall
time and maximum resident set are its own and one that fails or runs out of time is
recorded and the next one still runs. jaxlm's side goes through jaxlm.plan (its
make_plan: build_train, compile_train_step, memory_analysis; peak = arguments + outputs -
aliased + temporaries); MaxText's through `python -m maxtext.trainers.pre_train.train_compile`
in its own environment (--maxtext-python), whose printed memory_analysis() is parsed. One
JSON line per compile is appended to --out.

Settings on both sides: fp32 weights and Adam(W) moments, bf16 compute, full remat, scanned
layers, FSDP over all chips, the given per-chip batch, no dropout for the GPT rows, full
(unchunked) logits, rounded to bf16 for the GPT rows (MaxText's default; jaxlm's own default
keeps them in fp32: add --config.model.wide_logits=true for that). jaxlm keeps GPT-2's
50257-token vocabulary unpadded; MaxText's is padded to 50304 (--maxtext-vocab). BERT-large runs on jaxlm's side only (MaxText has no
BERT); it keeps configs/bert/bert_large.py's vocabulary (30522) and dropout (0.1).

`--table` estimates the largest per-chip batch within HBM (jaxlm.plan's figure for the
device kind, the HBM that XLA lets a program use: 15.75 GiB on a v5e, 95.73 GiB on a v5p)
from the growth of the temporaries between batch 1 and 2 (linear in the batch: an estimate,
marked as such; it misses both ways, since XLA schedules larger batches differently), and
shows the largest batch compiled within that budget with the next batch's verdict, where
such compiles are in --out (`--batches=N,N+1`). Above the budget XLA refuses to compile
("does not fit" in --out).

`--search` (instead of --batches) finds that largest batch by compiling: batch 1 and 2, the
estimate, then steps away from it until one batch fits and the next does not (`boundary`);
6 to 9 compiles a row and side in the runs BENCHMARKS.md reports.

    python benchmarks/fit_table.py --search --topology=v5p:4x4x4 --rows=gpt3-13b \
        --maxtext-python=/tmp/fit/mt/bin/python --out=/tmp/fit/search.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import common  # benchmarks/common.py

REPO = pathlib.Path(__file__).resolve().parent.parent

# name: (family, layers, d_model, heads, seq_len). GPT-3 shapes (Brown et al. 2020, Table
# 2.1) with GPT-2's vocabulary; BERT-large (Devlin et al. 2019) at its longest sequence.
ROWS = {
    "gpt3-125m": ("gpt", 12, 768, 12, 2048),
    "gpt3-350m": ("gpt", 24, 1024, 16, 2048),
    "gpt3-1.3b": ("gpt", 24, 2048, 16, 2048),
    "gpt3-2.7b": ("gpt", 32, 2560, 32, 2048),
    "gpt3-6.7b": ("gpt", 32, 4096, 32, 2048),
    "gpt3-13b": ("gpt", 40, 5120, 40, 2048),
    "bert-large": ("bert", 24, 1024, 16, 512),
}
BASE_CONFIG = {"gpt": "configs/gpt/gpt2_small.py", "bert": "configs/bert/bert_large.py"}


def chips(topology: str) -> int:
    """v5e:4x4 -> 16: the product of the topology's dimensions."""
    return math.prod(int(d) for d in topology.split(":")[-1].split("x"))


def maxtext_topology(topology: str) -> tuple[str, str]:
    """jaxlm's topology name -> (MaxText's compile_topology, TPU_ACCELERATOR_TYPE). v5e and
    v6e names count chips (v5e-16); v4 and v5p names count TensorCores, two per chip."""
    kind, n = topology.split(":")[0], chips(topology)
    if kind in ("v5e", "v6e"):
        return f"{kind}-{n}", f"{'v5litepod' if kind == 'v5e' else 'v6e'}-{n}"
    if kind in ("v4", "v5p"):
        return f"{kind}-{2 * n}", f"{kind}-{2 * n}"
    raise SystemExit(f"--topology={topology}: no MaxText topology name known for {kind}")


def jaxlm_overrides(row: str, batch: int, n_chips: int) -> list[str]:
    """The --config.FIELD=VALUE settings of a row on top of its base config."""
    family, layers, d, heads, seq = ROWS[row]
    out = [f"model.num_layers={layers}", f"model.d_model={d}", f"model.num_heads={heads}",
           f"model.mlp_dim={4 * d}", f"model.max_len={seq}", f"data.seq_len={seq}",
           "model.dtype=bfloat16", "model.param_dtype=float32", "model.scan_layers=true",
           "model.remat=true", "model.remat_policy=full", "mesh.strategy=fsdp",
           "mesh.data=1", "mesh.fsdp=-1", f"train.batch_size={batch * n_chips}",
           "train.microbatches=1"]
    if family == "gpt":
        # bf16 logits, as MaxText's default (logits_dot_in_fp32: false); jaxlm's own default
        # is fp32 logits (--config.model.wide_logits=true brings it back here).
        out += ["model.vocab_size=50257", "model.dropout=0.0", "model.attention_dropout=0.0",
                "model.wide_logits=false"]
    return out


def maxtext_flags(row: str, batch: int, topology: str, vocab: int) -> list[str]:
    """train_compile's config overrides for a GPT row (MaxText's gpt3 decoder block)."""
    _, layers, d, heads, seq = ROWS[row]
    return [f"compile_topology={maxtext_topology(topology)[0]}", "compile_topology_num_slices=1",
            "decoder_block=gpt3", f"base_emb_dim={d}", f"base_num_query_heads={heads}",
            f"base_num_kv_heads={heads}", f"head_dim={d // heads}", f"base_mlp_dim={4 * d}",
            f"base_num_decoder_layers={layers}", f"vocab_size={vocab}",
            f"max_target_length={seq}", f"trainable_position_size={seq}",
            'mlp_activations=["gelu"]', "logits_via_embedding=true", "fused_qkv=true",
            "enable_dropout=false", "use_iota_embed=true", f"per_device_batch_size={batch}",
            "remat_policy=full", "scan_layers=true", "ici_fsdp_parallelism=-1",
            "dataset_type=synthetic", "enable_checkpointing=false", "weight_dtype=float32",
            "dtype=bfloat16", "opt_type=adamw"]


# ----------------------------------------------------------------------------- children


def jaxlm_worker(spec: dict) -> None:
    """The child process of a jaxlm compile: prints one line `RESULT {json}`."""
    import jax

    from jaxlm import plan
    from jaxlm.config import load_config, validate

    # As `python -m jaxlm.plan` does: an executable from the persistent cache is not compiled.
    jax.config.update("jax_enable_compilation_cache", False)
    cfg = load_config(REPO / BASE_CONFIG[ROWS[spec["row"]][0]])
    common.apply(cfg, [f"--config.{o}" for o in spec["overrides"]])
    validate(cfg)
    devices = plan.topology_devices("tpu:" + spec["topology"])
    t0 = time.perf_counter()
    p = plan.make_plan(cfg, devices, spec["top"])
    result = {"compile_s": time.perf_counter() - t0, "device_kind": p.device_kind,
              "argument_bytes": p.argument_bytes, "output_bytes": p.output_bytes,
              "alias_bytes": p.alias_bytes, "temp_bytes": p.temp_bytes,
              "peak_bytes": p.peak_bytes, "hbm_bytes": plan.device_memory(p.device_kind),
              "mesh": p.mesh, "vocab_size": cfg.model.vocab_size,
              "jax": jax.__version__, "attention_impl": cfg.model.attention_impl}
    if spec["top"]:
        result["temp_regions"] = p.temp_regions
    print("RESULT " + json.dumps(result), flush=True)


def parse_maxtext(text: str) -> dict:
    """train_compile's last line `Memory analysis: CompiledMemoryStats(..._size_in_bytes=N,
    ...)` (exact bytes, as jaxlm's) -> the entry's *_bytes and the peak, computed as
    jaxlm.plan's Plan.peak_bytes."""
    stats = text[text.rfind("Memory analysis:"):] if "Memory analysis:" in text else ""
    sizes = dict(re.findall(r"(\w+)_size_in_bytes=(\d+)", stats))
    out = {f"{k}_bytes": int(sizes[k]) for k in ("argument", "output", "alias", "temp",
                                                  "host_temp") if k in sizes}
    if {"argument_bytes", "output_bytes", "temp_bytes"} <= out.keys():
        out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                             - out.get("alias_bytes", 0) + out["temp_bytes"])
    return out


def failure(status, text: str) -> str:
    """Why a compile gave no figures: XLA's compile-time out-of-HBM verdict (the step does
    not fit), the limit that stopped it, or its exit status."""
    from jaxlm.plan import hbm_refusal
    if refusal := hbm_refusal(text):
        return f"does not fit: XLA {refusal}"
    return status if isinstance(status, str) else f"failed (exit {status})"


def run_child(cmd: list[str], env: dict, timeout: float, max_rss_gb: float, log: pathlib.Path):
    """Runs cmd in a process group of its own, killing it past `timeout` seconds or when its
    resident set passes `max_rss_gb`: (exit status or reason, output, wall s, max RSS bytes)."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        status = None
        while True:
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(code)
                break
            if time.monotonic() - t0 > timeout:
                reason = f"killed: over the {timeout:.0f} s limit"
            elif rss_of_group(proc.pid) > max_rss_gb * 1e9:
                reason = f"killed: host memory over {max_rss_gb:g} GB"
            else:
                time.sleep(2)
                continue
            os.killpg(proc.pid, signal.SIGKILL)
            _, _, usage = os.wait4(proc.pid, 0)
            status = reason
            break
    wall = time.monotonic() - t0
    return status, log.read_text(), wall, usage.ru_maxrss * 1024  # ru_maxrss: KiB on Linux


def rss_of_group(pgid: int) -> int:
    """Resident bytes of every process in the process group (a child and its children)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            if int(stat[2]) == pgid:  # field 5, pgrp
                total += int(stat[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24, rss pages
        except (OSError, IndexError, ValueError):
            continue
    return total


def measure(side: str, row: str, topology: str, batch: int, args, log_dir) -> dict:
    entry = {"side": side, "row": row, "topology": topology, "per_chip_batch": batch,
             "chips": chips(topology), "seq_len": ROWS[row][4],
             "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())}
    log = log_dir / f"{side}_{row}_{topology.replace(':', '-')}_b{batch}.log"
    env = dict(os.environ)
    mt_topology, accelerator = maxtext_topology(topology)
    # libtpu asks for these when no TPU is attached (see the notes on AOT compiles).
    env.update(TPU_ACCELERATOR_TYPE=accelerator, TPU_WORKER_HOSTNAMES="localhost")
    if side == "jaxlm":
        overrides = jaxlm_overrides(row, batch, chips(topology)) + [
            o.removeprefix("--config.") for o in args.overrides]
        spec = {"row": row, "topology": topology, "overrides": overrides, "top": args.top}
        entry.update(config=BASE_CONFIG[ROWS[row][0]], overrides=overrides, top=args.top)
        cmd = [sys.executable, __file__, "--one=" + json.dumps(spec)]
    else:
        if ROWS[row][0] != "gpt":
            return {**entry, "status": "not run: MaxText has no BERT model"}
        base = subprocess.run([args.maxtext_python, "-c", "import maxtext, os; print("
                               "os.path.join(os.path.dirname(maxtext.__file__), 'configs', "
                               "'base.yml'))"], capture_output=True, text=True)
        if base.returncode:
            raise SystemExit(f"--maxtext-python={args.maxtext_python}: cannot import maxtext "
                             "there (give the Python of a venv with maxtext[tpu])")
        flags = [f"run_name=fit_{row}_b{batch}", f"base_output_directory={args.maxtext_out}",
                 *maxtext_flags(row, batch, topology, args.maxtext_vocab)]
        entry.update(maxtext_flags=flags, vocab_size=args.maxtext_vocab,
                     compile_topology=mt_topology)
        env["JAX_PLATFORMS"] = "cpu"
        cmd = [args.maxtext_python, "-m", "maxtext.trainers.pre_train.train_compile",
               base.stdout.strip(), *flags]
        if args.top:  # the same listing as jaxlm's, from XLA's dumps of MaxText's step
            dumps = tempfile.mkdtemp(prefix="fit_table_dump_")
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dumps}".strip()
    status, text, wall, rss = run_child(cmd, env, args.timeout, args.max_rss_gb, log)
    if side == "maxtext" and args.top:
        from jaxlm.plan import temp_regions
        if status == 0:
            entry["temp_regions"] = temp_regions(dumps)[:args.top]
        shutil.rmtree(dumps, ignore_errors=True)
    entry.update(process_wall_s=round(wall, 1), max_rss_bytes=rss, log=str(log))
    if side == "jaxlm":
        lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
        if lines:
            entry.update(json.loads(lines[-1][len("RESULT "):]))
    else:
        entry.update(parse_maxtext(text))
    if "peak_bytes" in entry and status == 0:
        entry["status"] = "ok"
    else:
        tail = [x for x in text.splitlines() if x.strip()]
        entry["status"] = failure(status, text)
        entry["error"] = (tail[-1] if tail else "")[:400]
    return entry


def boundary(fits, start: int, lo: int = 1) -> tuple[int, int]:
    """(b, b + 1) with fits(b) and not fits(b + 1), for a `fits` that holds up to some batch
    and not beyond and holds at `lo`: from `start` (an estimate) in steps of 1, 2, 4, ...
    until the boundary is crossed, then halving the gap. Each new fits() is a compile."""
    b, hi, step = max(start, lo + 1), None, 1
    if fits(b):
        lo = b
        while hi is None:
            b, step = lo + step, step * 2
            lo, hi = (b, None) if fits(b) else (lo, b)
    else:
        hi = b
        while hi - step > lo:
            b, step = hi - step, step * 2
            if fits(b):
                lo = b
                break
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi


def search(side: str, row: str, topology: str, args, log_dir, record) -> None:
    """Compiles `side`'s step for `row` at per-chip batches 1, 2, the linear estimate
    (largest_batch) and then as `boundary` asks, until the largest batch within the HBM
    budget and the next one are both known; every compile goes through `record`."""
    seen = {}

    def fits(batch):
        if batch not in seen:
            seen[batch] = record(measure(side, row, topology, batch, args, log_dir))
        e = seen[batch]
        if e["status"] != "ok" and "does not fit" not in e["status"]:
            raise RuntimeError(f"{side} {row} b{batch}: {e['status']}")
        return e["status"] == "ok" and e["peak_bytes"] <= budget(topology, args)

    try:
        if not fits(1):
            return
        if fits(2):
            boundary(fits, largest_batch(seen[1], seen[2], budget(topology, args)) or 3, 2)
    except RuntimeError as e:  # a compile that failed for another reason: say so, go on
        print(f"search stopped: {e}", flush=True)


def budget(topology: str, args) -> float:
    """HBM bytes per chip for --search: --hbm-gb when given, else jaxlm.plan's figure for
    the topology's chip (from a jaxlm compile recorded this run)."""
    if args.hbm_gb:
        return args.hbm_gb * 1e9
    if topology not in HBM_SEEN:
        raise SystemExit(f"--search: no jaxlm compile for {topology} yet to take the chip's "
                         "HBM from; give --hbm-gb or put jaxlm first in --sides")
    return HBM_SEEN[topology]


HBM_SEEN: dict[str, float] = {}  # topology -> hbm_bytes of a jaxlm compile this run


# ----------------------------------------------------------------------------- the table


def largest_batch(b1: dict, b2: dict, hbm: float) -> int | None:
    """An estimate: the largest per-chip batch whose peak stays within `hbm`, with the
    temporaries growing linearly by (b2's - b1's) per sequence and the rest as at batch 1."""
    grow = b2["temp_bytes"] - b1["temp_bytes"]
    return 1 + math.floor((hbm - b1["peak_bytes"]) / grow) if grow > 0 else None


def table(path: str, hbm: float) -> str:
    """Markdown table from --out: one line per (row, topology), the last result of each
    (side, batch) kept."""
    runs = {}
    for line in open(path):
        e = json.loads(line)
        runs[e["row"], e["topology"], e["side"], e["per_chip_batch"], bool(e.get("top"))] = e
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731

    def side(row, topo, name):
        """(b1 memory, b2 peak, batch estimate, batch compiled, wall s b1/b2, max RSS)."""
        done = {b: e for (r, t, s, b, top), e in runs.items()
                if (r, t, s) == (row, topo, name) and not top}
        ok = {b: e for b, e in done.items() if e["status"] == "ok"}
        if 1 not in done:
            return ("not run",) + ("",) * 5
        e1 = done[1]
        if e1["status"] != "ok":
            return (e1["status"],) + ("",) * 5
        budget = e1.get("hbm_bytes") or hbm
        mem = f"{gb(e1['argument_bytes'])} / {gb(e1['temp_bytes'])} / {gb(e1['peak_bytes'])}"
        b2 = gb(ok[2]["peak_bytes"]) if 2 in ok else "not run" if 2 not in done else \
            "XLA out of HBM" if "does not fit" in done[2]["status"] else done[2]["status"]
        est = largest_batch(e1, ok[2], budget) if 2 in ok else None
        estimate = f"~{est} (estimate)" if est else "-"
        # Compiled: the largest batch compiled within the budget, and the next one's verdict.
        fits = [b for b, e in ok.items() if e["peak_bytes"] <= budget]
        if not fits:
            compiled = f"none within {budget / 1e9:g} GB (b1 peak {gb(e1['peak_bytes'])})"
        else:
            m = max(fits)
            compiled = f"{m} (peak {gb(ok[m]['peak_bytes'])})"
            if m + 1 in ok:
                compiled += f"; {m + 1}: peak {gb(ok[m + 1]['peak_bytes'])}"
            elif m + 1 in done:
                compiled += f"; {m + 1}: XLA out of HBM" if "does not fit" in \
                    done[m + 1]["status"] else f"; {m + 1}: {done[m + 1]['status']}"
            else:
                compiled = ">= " + compiled
        times = "/".join(f"{done[b]['process_wall_s']:.0f}" for b in (1, 2) if b in done)
        rss = max(e["max_rss_bytes"] for e in done.values()) / 1e9
        return mem, b2, estimate, compiled, times, f"{rss:.1f}"

    out = ["| shape | topology | jaxlm args / temps / peak GB, b1 | jaxlm peak GB, b2 | "
           "MaxText args / temps / peak GB, b1 | MaxText peak GB, b2 | jaxlm batch/chip: "
           "estimate | jaxlm batch/chip: compiled | MaxText batch/chip: estimate | MaxText "
           "batch/chip: compiled | process wall s b1/b2, jaxlm; MaxText | host max RSS GB, "
           "jaxlm; MaxText |", "|" + "---|" * 12]
    seen = []
    for (r, t, *_rest) in runs:
        if (r, t) not in seen:
            seen.append((r, t))
    for r, t in sorted(seen, key=lambda x: (list(ROWS).index(x[0]), x[1])):
        j, m = side(r, t, "jaxlm"), side(r, t, "maxtext")
        if ROWS[r][0] != "gpt":
            m = ("not run: MaxText has no BERT",) + ("",) * 5
        out.append(f"| {r} | {t} | {j[0]} | {j[1]} | {m[0]} | {m[1]} | {j[2]} | {j[3]} | "
                   f"{m[2]} | {m[3]} | {j[4]}; {m[4]} | {j[5]}; {m[5]} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child process's compile
    p.add_argument("--rows", default=",".join(r for r in ROWS if r.startswith("gpt")),
                   help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--topology", default="v5e:4x4",
                   help="comma-separated TPU topologies, jaxlm.plan's names without tpu:")
    p.add_argument("--batches", default="1,2", help="per-chip batches, comma-separated")
    p.add_argument("--sides", default="jaxlm,maxtext")
    p.add_argument("--maxtext-python", default="python",
                   help="the Python of an environment with maxtext[tpu] installed")
    p.add_argument("--maxtext-vocab", type=int, default=50304,
                   help="MaxText's padded vocabulary for GPT-2's 50257 tokens")
    p.add_argument("--maxtext-out", default="/tmp/fit/maxtext_out")
    p.add_argument("--top", type=int, default=0,
                   help="also the N largest regions of each step's temporaries (jaxlm.plan's "
                        "--top; MaxText's from XLA's dumps of its step)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per compile")
    p.add_argument("--max-rss-gb", type=float, default=14.0,
                   help="kill a compile whose host resident set passes this")
    p.add_argument("--out", default="fit_table.jsonl")
    p.add_argument("--table", action="store_true", help="print the table of --out and stop")
    p.add_argument("--hbm-gb", type=float, default=None,
                   help="HBM per chip (GB) for --search and --table; default: jaxlm.plan's "
                        "figure for the chip, 16 for --table when a result does not carry it")
    p.add_argument("--search", action="store_true",
                   help="instead of --batches: compile each row and side at the batches "
                        "that find its largest per-chip batch within HBM (`search`)")
    args = common.parse(p)  # + --config.FIELD=VALUE arguments for jaxlm's side
    if args.one:
        return jaxlm_worker(json.loads(args.one))
    if args.table:
        return print(table(args.out, (args.hbm_gb or 16.0) * 1e9))
    if args.top < 0:
        raise SystemExit(f"--top={args.top}: expected a number of regions (0 = none)")
    log_dir = pathlib.Path(args.out).resolve().parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    def record(e: dict) -> dict:
        with open(args.out, "a") as f:
            f.write(json.dumps(e) + "\n")
        if e.get("hbm_bytes"):
            HBM_SEEN[e["topology"]] = e["hbm_bytes"]
        brief = {k: e.get(k) for k in ("side", "row", "topology", "per_chip_batch", "status",
                                       "argument_bytes", "temp_bytes", "peak_bytes",
                                       "process_wall_s", "max_rss_bytes", "error")}
        print(json.dumps(brief), flush=True)
        return e

    for topology in args.topology.split(","):
        if args.search:
            for row in args.rows.split(","):
                for side in args.sides.split(","):
                    search(side, row, topology, args, log_dir, record)
            continue
        for batch in (int(b) for b in args.batches.split(",")):
            for row in args.rows.split(","):
                for side in args.sides.split(","):
                    record(measure(side, row, topology, batch, args, log_dir))


if __name__ == "__main__":
    main()
