"""Fine-tune a BERT for sentiment on SST-2 (GLUE): by default the 500 labelled sentences of
the development slice in shared/data, 400 for training and 100 for validation.

    python -m jaxlm.finetune --config=configs/bert/sst2.py --workdir=runs/sst2 \
        --config.finetune.init=runs/bert_debug

The model is the debug BERT's shape (the size of a checkpoint to start from); with
prepared TFDS data use --config.finetune.train_data=tfds:glue/sst2:train and
--config.finetune.validation_data=tfds:glue/sst2:validation.
"""

import pathlib

from debug import get_config as debug_config

# <repo>/../shared/data/fewshot/sst2/validation.jsonl (fields: sentence, label)
SST2 = pathlib.Path(__file__).resolve().parents[3] / "shared/data/fewshot/sst2/validation.jsonl"


def sst2_data(c) -> None:
    """Fine-tuning data: the slice's first 400 sentences for training, the last 100 for
    validation; two classes."""
    c.model.num_classes = 2
    c.finetune.update(train_data=f"{SST2}[:400]", validation_data=f"{SST2}[400:]",
                      text_field="sentence", label_field="label", best_metric="accuracy",
                      class_names=("negative", "positive"))


def get_config():
    c = debug_config()
    sst2_data(c)
    c.model.dropout = 0.1
    c.finetune.update(epochs=5, learning_rate=1e-4, batch_size=16, warmup_ratio=0.1)
    c.evaluate.batch_size = 50
    return c
