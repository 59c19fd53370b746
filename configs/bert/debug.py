"""A tiny BERT (0.9M parameters) on the built-in synthetic corpus: masked-LM pretraining in
minutes on a 2-core CPU.

    python -m jaxlm.train --config=configs/bert/debug.py --workdir=runs/bert_debug
"""

from _bert import bert_model

from jaxlm.config import base_config


def get_config():
    c = base_config()
    bert_model(c, layers=4, d_model=128, heads=4)
    c.model.update(vocab_size=261, max_len=128, dropout=0.0, attention_dropout=0.0)
    c.data.seq_len = 128
    c.train.update(steps=1000, batch_size=32, log_every=20)
    c.checkpoint.every = 250
    c.optimizer.update(learning_rate=2e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.01)
    return c
