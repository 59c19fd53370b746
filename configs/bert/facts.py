"""Fine-tune the debug BERT to tell true from false facts of the synthetic world, from 64
labelled sentences: the offline check that pretraining transfers (README, "BERT").

    python -m jaxlm.train --config=configs/bert/debug.py --workdir=runs/bert_debug
    python -m jaxlm.finetune --config=configs/bert/facts.py --workdir=runs/bert_facts \
        --config.finetune.init=runs/bert_debug

Without --config.finetune.init the same run starts from random weights: the baseline.
"""

from debug import get_config as debug_config


def get_config():
    c = debug_config()
    c.model.update(num_classes=2, dropout=0.1)
    c.finetune.update(train_data="synthetic:facts:train", validation_data="synthetic:facts:validation",
                      train_examples=64, epochs=40, learning_rate=3e-4, batch_size=16,
                      warmup_ratio=0.1, best_metric="accuracy", class_names=("false", "true"))
    c.data.seq_len = 64
    c.evaluate.batch_size = 64
    return c
