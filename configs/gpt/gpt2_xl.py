"""GPT-2 xl (1.5B parameters), sequence length 1024. Sizes and learning rates: _gpt2.py.

    python -m jaxlm.main --config=configs/gpt/gpt2_xl.py --workdir=runs/gpt2_xl
"""

from _gpt2 import gpt2_config


def get_config():
    return gpt2_config("xl")
