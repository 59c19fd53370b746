"""Continued pretraining: the debug GPT (README command 1) goes on to tiny Shakespeare,
with a quarter of every batch replayed from its old corpus.

    python -m jaxlm.main --config=configs/gpt/continual.py --workdir=runs/continual \
        --config.train.init=runs/debug

The run starts from the params of config.train.init (a workdir, a checkpoint folder or an
export) with a fresh AdamW state and the learning rate re-warmed from 0 (warmup, then
cosine), as a new run would; re-running resumes from its own checkpoints. Replay is a
mixture (jaxlm.data.sources): every block of 1,000 sequences holds exactly 750 windows of
tiny Shakespeare and 250 of the synthetic corpus. Without replay:
--config.data.name=tiny_shakespeare. The main job ends with the few-shot table of the old
tasks, to compare with the base run's (forgetting); benchmarks/continual.py measures both
arms side by side, with perplexities on the old and the new data.
"""

import pathlib

from jaxlm.config import base_config

# <repo>/../shared/data/tinyshakespeare
SHAKESPEARE = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare"


def get_config():
    c = base_config()
    c.model.update(num_layers=4, d_model=128, num_heads=4, mlp_dim=512, max_len=128)  # = debug
    c.data.update(name="mixture", mixture=("tiny_shakespeare=0.75", "synthetic=0.25"),
                  split="train", manual_dir=str(SHAKESPEARE), seq_len=128, packing=False)
    c.train.update(init="runs/debug", steps=500, batch_size=32, log_every=20)
    c.checkpoint.every = 250
    # Re-warmed to a third of the debug run's peak: continued runs forget less with a lower
    # peak (Ibrahim et al. 2024) and the model is already trained.
    c.optimizer.update(learning_rate=1e-3, warmup_steps=50, min_lr_ratio=0.1)
    c.evaluate.sample_len = 64
    return c
