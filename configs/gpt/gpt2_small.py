"""GPT-2 small (124M parameters), sequence length 1024. Sizes and learning rates: _gpt2.py.

    python -m jaxlm.main --config=configs/gpt/gpt2_small.py --workdir=runs/gpt2_small
"""

from _gpt2 import gpt2_config


def get_config():
    return gpt2_config("small")
