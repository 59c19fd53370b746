"""One training step of jaxlm's GPT and of Hugging Face's FlaxGPT2LMHeadModel, side by side
in one process: same shapes, batch, fp32, optimizer (jaxlm's AdamW + clipping for both) and
loss (mean next-token cross-entropy), no dropout. Passes interleave the two (A B A B ...)
so that machine noise hits both; medians (and the median of the per-pass ratios, in which
slow drifts of the machine's speed cancel, with their spread: on a shared 2-core VM a
ratio moves by ~0.05 from run to run) are reported, with the FLOPs XLA counts for each
compiled step and the fraction of this machine's measured fp32 matmul peak they reach.

    pip install -e ".[test]"     # transformers 4.x (Flax classes); not in requirements.txt
    python benchmarks/vs_hf.py --layers=6 --d-model=384 --seq=256 --batch=8 --passes=3

Extra `--config.FIELD=VALUE` arguments go to jaxlm's side only (e.g. attention_impl).

`--variants=one_key_block,plain_kernel_dot` also times jaxlm's step with its CPU-specific
choices undone, one at a time, in the same passes: the full square of attention logits
instead of causal key blocks (attention.causal_blocks), and XLA's own kernel gradient
instead of layers.cpu_kernel_dot. On a CPU where jaxlm trails HF this names the choice
that costs (BENCHMARKS.md, "By CPU kind").
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.config import base_config, validate
from jaxlm.models import attention, layers
from jaxlm.train.build import build_train
from jaxlm.train.optimizer import adamw

import common  # benchmarks/common.py


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 FLOP/s of an n x n matmul on the first device (median of `repeats`)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def jaxlm_step(args):
    cfg = base_config()
    cfg.model.update(num_layers=args.layers, d_model=args.d_model, num_heads=args.heads,
                     mlp_dim=4 * args.d_model, max_len=args.seq, vocab_size=args.vocab)
    cfg.data.update(seq_len=args.seq, packing=False)
    cfg.train.update(batch_size=args.batch, steps=1000)
    cfg.evaluate.update(tasks=(), num_samples=0)  # a training step only (any --seq then fits)
    common.apply(cfg, args.overrides)
    validate(cfg)
    run = build_train(cfg)
    state = run.place_state(run.init_state())
    batch = common.random_batch(run, args.batch, args.vocab)
    key = jax.random.PRNGKey(0)
    compiled = run.lower(state, batch, key).compile()

    def step(state):
        state, metrics = run(state, batch, key)
        return state, metrics["loss"]
    state, _ = step(state)  # traced now (under any `undone` variant), cached for the passes
    return step, state, compiled, cfg


# What each --variants name undoes while its step is traced: (module, attribute, stand-in).
VARIANTS = {
    "one_key_block": (attention, "causal_blocks", lambda L: 1),
    "plain_kernel_dot": (layers, "kernel_dot", lambda cfg: jax.lax.dot_general),
}


@contextlib.contextmanager
def undone(name: str | None):
    """jaxlm as it is (None), or with the CPU choice `name` undone (VARIANTS)."""
    if name is None:
        yield
        return
    module, attribute, stand_in = VARIANTS[name]
    original = getattr(module, attribute)
    setattr(module, attribute, stand_in)
    try:
        yield
    finally:
        setattr(module, attribute, original)


def hf_step(args, cfg):
    from transformers import GPT2Config, FlaxGPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.d_model,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = FlaxGPT2LMHeadModel(hf_cfg, seed=0, dtype=jnp.float32)
    params = model.params
    # jaxlm's AdamW, clipped by optax as a plain loop would (jaxlm's step clips itself)
    tx = optax.chain(optax.clip_by_global_norm(cfg.optimizer.grad_clip_norm),
                     adamw(cfg.optimizer, cfg.train.steps))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    positions = jnp.broadcast_to(jnp.arange(args.seq), inputs.shape)
    mask = jnp.ones_like(inputs)

    def loss_fn(p):
        logits = model.module.apply({"params": p}, inputs, mask, positions,
                                    deterministic=True).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def train(state):
        p, o = state
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), loss

    jitted = jax.jit(train, donate_argnums=(0,))
    state = (params, tx.init(params))
    return jitted, state, jitted.lower(state).compile()


def dispatch(compiled) -> str:
    """How XLA:CPU runs a compiled step's matmuls, read from its HLO: GFLOP in library
    (YNNPACK) fusions, GFLOP and count of the other dots, and the MB that every instruction
    of the entry computation outside those fusions writes. A loop body (scanned layers)
    counts once in the GFLOP, and as its loop's output in the MB."""
    text = compiled.as_text()
    computations = dict(re.findall(r"^(?:ENTRY )?%?([\w.\-]+) .*?\{\n(.*?)^\}", text, re.M | re.S))
    library = set(re.findall(r"kind=kCustom, calls=%?([\w.\-]+)", text))
    flops, dots, written = {True: 0, False: 0}, 0, 0
    for name, body in computations.items():
        shapes = dict(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]", body, re.M))
        dot = r"= \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+).*?lhs_contracting_dims=\{([\d,]*)\}"
        for out, lhs, contracted in re.findall(dot, body):
            dims = [int(d) for d in shapes[lhs].split(",") if d]
            depth = math.prod(dims[int(i)] for i in contracted.split(","))
            flops[name in library] += 2 * depth * math.prod(int(d) for d in out.split(",") if d)
            dots += name not in library
    entry = re.search(r"^ENTRY .*?\{\n(.*?)^\}", text, re.M | re.S).group(1)
    for shape, op, rest in re.findall(r" = (.*?) ([\w\-]+)\((.*)", entry):  # shape: maybe a tuple
        if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast") or \
                "kind=kCustom" in rest:
            continue
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
            written += math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(dtype, 4)
    return (f"library matmuls {flops[True] / 1e9:.1f} GFLOP, other dots {flops[False] / 1e9:.1f} "
            f"GFLOP ({dots}), written outside the library {written / 1e6:,.0f} MB")


_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1,
          "f64": 8, "s64": 8, "u64": 8}


def time_steps(step, state, n):
    state, loss = step(state)          # settle (and compile on the first pass)
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(n):
        state, loss = step(state)
    jax.block_until_ready(loss)
    return state, (time.perf_counter() - t0) / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps per pass and model")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--variants", default="",
                   help=f"comma-separated jaxlm variants to time too: {', '.join(VARIANTS)}")
    args = common.parse(p)  # + --config.FIELD=VALUE arguments
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")

    steps = {}  # name -> [step, state, compiled]; jaxlm's sides first, HF's last
    for v in [None, *variants]:
        with undone(v):
            step, state, compiled, cfg = jaxlm_step(args)
        steps["jaxlm" if v is None else f"jaxlm-{v}"] = [step, state, compiled]
    steps["hf"] = list(hf_step(args, cfg))
    peak = matmul_peak()
    times = {name: [] for name in steps}
    for i in range(args.passes):
        for name, entry in steps.items():
            entry[1], t = time_steps(entry[0], entry[1], args.steps)
            times[name].append(t)
        print(f"pass {i}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()) + " s/step",
              flush=True)
    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{platform.processor() or platform.machine()}, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.layers} layers, "
          f"d={args.d_model}, {args.heads} heads, vocab {args.vocab}, seq {args.seq}, "
          f"batch {args.batch}, fp32; {args.passes} passes x {args.steps} steps, medians")
    print(f"matmul peak (fp32 1024^3): {peak / 1e9:.1f} GFLOP/s")
    width = max(map(len, steps))
    for name, (_, _, compiled) in steps.items():
        flops = compiled.cost_analysis()["flops"]
        print(f"{name:{width}s} {tokens / med[name]:8,.0f} tokens/s  {med[name]:.3f} s/step  "
              f"XLA flops {flops / 1e9:.2f} G  {flops / med[name] / peak:.2f} of peak; "
              f"{dispatch(compiled)}")
    for name in steps:
        if name != "hf":
            print(f"{name} / hf: {ratio_line(times['hf'], times[name], med['hf'] / med[name])}")


def ratio_line(theirs: list[float], ours: list[float], of_medians: float) -> str:
    """The speed ratio of two steps' per-pass times: of their medians, and the median and
    spread of the per-pass ratios (each pass's steps timed back to back)."""
    ratios = sorted(t / o for t, o in zip(theirs, ours))
    spread = (f"; quartiles {ratios[len(ratios) // 4]:.2f}-{ratios[(3 * len(ratios)) // 4]:.2f}"
              if len(ratios) >= 4 else "")
    return (f"{of_medians:.2f}x (medians); {statistics.median(ratios):.2f}x (median of the "
            f"per-pass ratios{spread}; min {ratios[0]:.2f}, max {ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
