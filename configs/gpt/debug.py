"""Tiny GPT (0.84M parameters) on the built-in synthetic corpus: pretrain + few-shot eval
in under 10 minutes on a 2-core CPU.

    python -m jaxlm.main --config=configs/gpt/debug.py --workdir=runs/debug

Tuned so the in-context rule task rises clearly with k: at ~500 steps the model copies
the easy rules only; by 1000 steps (4M tokens) it infers all six from one demonstration.
"""

from jaxlm.config import base_config


def get_config():
    c = base_config()
    c.model.update(num_layers=4, d_model=128, num_heads=4, mlp_dim=512)
    # max_len = seq_len: positions beyond the training length would be untrained, so longer
    # few-shot prompts are cut on the left instead (counted in results.json).
    c.model.max_len = 128
    c.data.seq_len = 128
    c.train.update(steps=1000, batch_size=32, log_every=20)
    c.checkpoint.every = 250
    c.optimizer.update(learning_rate=3e-3, warmup_steps=100, min_lr_ratio=0.1)
    c.evaluate.sample_len = 64
    return c
