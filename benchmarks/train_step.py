"""Train-step throughput of any config on this machine's devices: tokens/s, step time and
compile time, with random token windows through the config's objective.

    python benchmarks/train_step.py --config=configs/bert/bert_base.py --batch=8 --steps=5
    python benchmarks/train_step.py --config=configs/gpt/gpt2_small.py --batch=2 -- \
        --config.model.dtype=bfloat16

The batch is random tokens (bytes), so the figure is the step's, whatever the data; the
objective still builds what a real batch holds (masked positions for masked_lm).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax

from jaxlm.config import load_config, validate
from jaxlm.train.build import build_train

import common  # benchmarks/common.py


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    args = common.parse(p)  # + --config.FIELD=VALUE arguments
    cfg = load_config(args.config)
    common.apply(cfg, args.overrides)
    cfg.train.update(batch_size=args.batch, steps=max(cfg.train.steps, args.steps + 1))
    cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, cfg.train.steps)
    validate(cfg)

    run = build_train(cfg)
    state = run.place_state(run.init_state())
    batch = common.random_batch(run, args.batch, vocab=256)
    t0 = time.perf_counter()
    state, m = run(state, batch, jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = run(state, batch, jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * cfg.data.seq_len
    print(f"{args.config}: {cfg.model.arch}, {cfg.train.objective}, batch {args.batch} x "
          f"{cfg.data.seq_len}, {jax.device_count()} x {jax.devices()[0].device_kind}: "
          f"{tokens / step_s:,.0f} tokens/s, {step_s:.2f} s/step, first step (compile) "
          f"{compile_s:.1f} s, loss {float(m['loss']):.3f}")
    print(f"# {time.strftime('%Y-%m-%d')}  python {platform.python_version()}, jax {jax.__version__}")


if __name__ == "__main__":
    main()
