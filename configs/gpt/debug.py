"""Tiny GPT on the built-in synthetic corpus: pretrain + few-shot eval in minutes on a CPU.

    python -m jaxlm.main --config=configs/gpt/debug.py --workdir=runs/debug
"""

from jaxlm.config import base_config


def get_config():
    c = base_config()
    c.model.num_layers = 4
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.mlp_dim = 512
    c.model.max_len = 256
    c.data.seq_len = 128
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.log_every = 25
    c.train.checkpoint_every = 200
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 50
    return c
