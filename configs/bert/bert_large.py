"""BERT-large (340M parameters): masked-LM pretraining with sequences of 128 tokens.
Shapes and optimizer: _bert.py.

    python -m jaxlm.train --config=configs/bert/bert_large.py --workdir=runs/bert_large
"""

from _bert import bert_config


def get_config():
    return bert_config("large")
