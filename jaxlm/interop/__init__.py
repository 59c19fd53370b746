"""Hugging Face interop: GPT-2 and BERT weights and tokenizers in and out of jaxlm.

    python -m jaxlm.interop import --src=HF_DIR --out=DIR      # -> a jaxlm params export
    python -m jaxlm.interop export --config=FILE --workdir=DIR --out=HF_DIR

`hf.py` drives a conversion; `gpt2.py` and `bert.py` hold each family's tensor table and
config mapping; `convert.py` moves tensors one at a time between safetensors files
(`safetensors_io.py`) and sharded jax arrays.
"""
