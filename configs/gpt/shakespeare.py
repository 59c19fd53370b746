"""A character-level (byte) GPT on tiny Shakespeare, read through TFDS, fully offline.

    python -m jaxlm.main --config=configs/gpt/shakespeare.py --workdir=runs/shakespeare

The first run prepares the TFDS catalog dataset `tiny_shakespeare` from the copy of its
source file in shared/data (config.data.manual_dir; nothing is downloaded) under
config.data.data_dir ("" = ~/tensorflow_datasets), then tokenizes its train split once into
a token cache next to it. Point manual_dir at another folder holding `input.txt` with
--config.data.manual_dir=DIR. No few-shot tasks exist for Shakespeare: the job trains,
prints samples and writes results.json.
"""

import pathlib

from jaxlm.config import base_config

# <repo>/../shared/data/tinyshakespeare
SHAKESPEARE = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare"


def get_config():
    c = base_config()
    c.model.update(num_layers=4, d_model=128, num_heads=4, mlp_dim=512, max_len=256)
    c.data.update(name="tiny_shakespeare", split="train", manual_dir=str(SHAKESPEARE),
                  seq_len=256, packing=False)
    c.train.update(steps=800, batch_size=16, log_every=50)
    c.optimizer.update(learning_rate=2e-3, warmup_steps=50, min_lr_ratio=0.1)
    c.evaluate.update(tasks=(), num_samples=2, sample_len=200, temperature=0.8)
    return c
