"""BERT-base (uncased) as published, for fine-tuning its Hugging Face weights on SST-2 (the
shared development slice, as configs/bert/sst2.py):

    python -m jaxlm.interop import --src=hf/bert-base-uncased --out=runs/bert_import
    python -m jaxlm.finetune --config=configs/bert/hf_bert_base.py --workdir=runs/bert_sst2 \
        --config.finetune.init=runs/bert_import

hf/bert-base-uncased is the downloaded model folder (model.safetensors, config.json,
vocab.txt); --config.data.tokenizer=wordpiece:DIR names another.
"""

from _bert import bert_config
from sst2 import sst2_data


def get_config():
    c = bert_config("base")
    c.data.tokenizer = "wordpiece:hf/bert-base-uncased"
    sst2_data(c)
    c.finetune.update(epochs=3, learning_rate=2e-5, batch_size=16, warmup_ratio=0.1)
    c.evaluate.batch_size = 32
    return c
