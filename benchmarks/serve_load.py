"""Load on jaxlm's server (jaxlm.serve) over loopback: generated tokens/s, request latency and
time to first token at several numbers of concurrent clients, and the gain of continuous
batching over one request at a time; beside it, transformers' FlaxGPT2LMHeadModel.generate
on the same weights, one request at a time.

    pip install -e ".[test]"    # transformers 4.x, for --hf
    python benchmarks/serve_load.py --config=configs/gpt/debug.py --clients=1,4,16,64 --hf
    python benchmarks/serve_load.py --config=configs/gpt/gpt2_small.py --clients=1,4,16 \
        --prompt-tokens=32 --max-tokens=32 --slots=16

The model has random weights (speed does not depend on them); every request streams
(time to first token: its first token), asks for --max-tokens greedy tokens and counts what
it got (a random model may end early at EOS). Each client sends requests one after
another; a level runs max(2 x clients, --min-requests) requests. The server is
`python -m jaxlm.serve` on the params exported, in its own process, with
config.serve.slots = --slots; the clients run in this one.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import subprocess
import tempfile
import time

import jax
import numpy as np

import common  # benchmarks/common.py
from jaxlm.config import load_config, validate


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = {k.strip(): v.strip() for k, _, v in (l.partition(":") for l in lscpu.splitlines())}
        flags = [f for f in info.get("Flags", "").split() if f.startswith(("avx", "amx", "fma"))]
        cpu = f"{info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs, flags {' '.join(flags)}"
    except OSError:
        cpu = platform.processor()
    return f"{jax.devices()[0].device_kind} ({cpu}); jax {jax.__version__}"


def start_server(args, cfg, params, setup, folder: str):
    """`python -m jaxlm.serve` on these params (exported to `folder`), in its own process."""
    import socket
    import sys
    import urllib.request

    from jaxlm import checkpoint
    checkpoint.export_params(folder, params, checkpoint.make_export_meta(cfg, setup.tokenizer, 0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "jaxlm.serve", f"--config={args.config}", *args.overrides,
               f"--config.evaluate.params={folder}", f"--config.serve.slots={args.slots}",
               "--config.serve.max_queue=1024", f"--port={port}", "--name=bench"]
    t0 = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the server did not start:\n{server.stderr.read()}")
            time.sleep(0.5)
    print(f"server up (load + compiles) in {time.perf_counter() - t0:.1f} s", flush=True)
    return url, server


async def one_request(client, url, prompt, max_tokens):
    t0 = time.perf_counter()
    first, text_tokens = None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logprobs": 0}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            n = len((chunk["choices"][0].get("logprobs") or {}).get("tokens") or [])
            if n and first is None:
                first = time.perf_counter() - t0
            text_tokens += n
    return time.perf_counter() - t0, first, text_tokens


async def level(url, clients: int, requests: int, prompts: list, max_tokens: int):
    import httpx
    queue = list(range(requests))
    results = []

    async def client_loop(client):
        while queue:
            i = queue.pop()
            results.append(await one_request(client, url, prompts[i % len(prompts)], max_tokens))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latency = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results if r[1] is not None)
    tokens = sum(r[2] for r in results)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]
    return {"clients": clients, "requests": requests, "tokens": tokens, "tok_s": tokens / wall,
            "p50": q(latency, 0.5), "p99": q(latency, 0.99), "ttft50": q(ttft, 0.5), "ttft99": q(ttft, 0.99)}


def hf_generate(cfg, params, prompts_ids, max_tokens: int, runs: int) -> float:
    """Tokens/s of FlaxGPT2LMHeadModel.generate on the same weights, one prompt at a time."""
    import transformers

    from jaxlm.interop import hf
    with tempfile.TemporaryDirectory() as tmp:
        hf.export_folder(cfg, params, cfg.data.tokenizer, f"{tmp}/hf")
        model = transformers.FlaxGPT2LMHeadModel.from_pretrained(f"{tmp}/hf", from_pt=True)
    # Compiled once (every prompt has the same length), as transformers' docs advise.
    gen = jax.jit(lambda ids: model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                             pad_token_id=0, eos_token_id=None).sequences)
    gen = (lambda f: lambda ids: f(np.asarray([ids])))(gen)
    jax.block_until_ready(gen(prompts_ids[0]))   # compile
    t0 = time.perf_counter()
    for i in range(runs):
        jax.block_until_ready(gen(prompts_ids[i % len(prompts_ids)]))
    return runs * max_tokens / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--hf", action="store_true", help="also FlaxGPT2LMHeadModel.generate")
    args = common.parse(parser)
    cfg = load_config(args.config)
    common.apply(cfg, args.overrides)
    validate(cfg)
    from jaxlm.setup import build
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(0))
    # Prompts of --prompt-tokens tokens of plain text (any tokenizer).
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(16):
        ids = setup.tokenizer.encode(" ".join(rng.choice(words, 4 * args.prompt_tokens)))
        prompts.append(setup.tokenizer.decode(ids[:args.prompt_tokens - 1]))
    tmp = tempfile.TemporaryDirectory()
    url, server = start_server(args, cfg, params, setup, f"{tmp.name}/export")
    print(f"# {datetime.date.today()}  {machine()}")
    print(f"# python benchmarks/serve_load.py {' '.join(__import__('sys').argv[1:])}")
    print(f"# model: {args.config} ({sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M params), "
          f"slots {args.slots}, prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens")
    rows = []
    for clients in map(int, args.clients.split(",")):
        requests = max(2 * clients, args.min_requests)
        rows.append(asyncio.run(level(url, clients, requests, prompts, args.max_tokens)))
        r = rows[-1]
        print(f"clients {clients:>3}: {r['tok_s']:8.1f} tok/s  latency p50 {r['p50']:.2f} s p99 "
              f"{r['p99']:.2f} s  ttft p50 {r['ttft50']:.3f} s p99 {r['ttft99']:.3f} s  "
              f"({r['requests']} requests, {r['tokens']} tokens)", flush=True)
    one = rows[0]["tok_s"] if rows[0]["clients"] == 1 else None
    if one:
        for r in rows[1:]:
            print(f"continuous batching gain at {r['clients']} clients: {r['tok_s'] / one:.1f}x")
    server.terminate()
    server.wait(60)
    if args.hf:
        ids = [[setup.tokenizer.eos_id] + setup.tokenizer.encode(p) for p in prompts]
        hf = hf_generate(cfg, params, ids, args.max_tokens, runs=8)
        print(f"transformers FlaxGPT2LMHeadModel.generate, one request at a time: {hf:.1f} tok/s"
              + (f" (jaxlm server, 1 client: {one / hf:.2f}x of it)" if one else ""))


if __name__ == "__main__":
    main()
