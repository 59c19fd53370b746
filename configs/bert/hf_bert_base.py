"""BERT-base (uncased) as published, for fine-tuning its Hugging Face weights on SST-2 (the
shared development slice, as configs/bert/sst2.py):

    python -m jaxlm.interop import --src=hf/bert-base-uncased --out=runs/bert_import
    python -m jaxlm.finetune --config=configs/bert/hf_bert_base.py --workdir=runs/bert_sst2 \
        --config.finetune.init=runs/bert_import

hf/bert-base-uncased is the downloaded model folder (model.safetensors, config.json,
vocab.txt); --config.data.tokenizer=wordpiece:DIR names another.
"""

import pathlib

from _bert import bert_config

SST2 = pathlib.Path(__file__).resolve().parents[3] / "shared/data/fewshot/sst2/validation.jsonl"


def get_config():
    c = bert_config("base")
    c.data.tokenizer = "wordpiece:hf/bert-base-uncased"
    c.model.update(num_classes=2)
    c.finetune.update(train_data=f"{SST2}[:400]", validation_data=f"{SST2}[400:]",
                      text_field="sentence", label_field="label", epochs=3,
                      learning_rate=2e-5, batch_size=16, warmup_ratio=0.1,
                      best_metric="accuracy", class_names=("negative", "positive"))
    c.evaluate.batch_size = 32
    return c
