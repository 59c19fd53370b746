"""Fine-tune the debug BERT to name the rule a line applies ("kaz -> kAz": upper_vowels;
6 classes) from 64 labelled lines, on words the pretraining corpus never used: the offline
check that pretraining transfers (README, "BERT").

    python -m jaxlm.train --config=configs/bert/debug.py --workdir=runs/bert_debug
    python -m jaxlm.finetune --config=configs/bert/rules.py --workdir=runs/bert_rules \
        --config.finetune.init=runs/bert_debug

Without --config.finetune.init the same run starts from random weights: the baseline.
"""

from debug import get_config as debug_config

from jaxlm.data.synthetic import DEFAULT_RULES


def get_config():
    c = debug_config()
    c.model.update(num_classes=len(DEFAULT_RULES), dropout=0.1)
    c.finetune.update(train_data="synthetic:rules:train", validation_data="synthetic:rules:validation",
                      train_examples=64, epochs=40, learning_rate=3e-4, batch_size=16,
                      warmup_ratio=0.1, best_metric="accuracy", class_names=DEFAULT_RULES)
    c.data.seq_len = 32
    c.evaluate.batch_size = 100
    return c
