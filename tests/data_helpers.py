"""Helpers shared by the tests/test_data_*.py files: in-memory token caches and a small
local corpus prepared as a TFDS dataset."""

import pathlib

import numpy as np
import pytest
from conftest import SHARED_DATA

from jaxlm.data import batches, token_cache
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.train.objectives import CausalLM

SHAKESPEARE = SHARED_DATA / "tinyshakespeare"


def memory_cache(docs: list[str], tokenizer: Tokenizer, name: str = "mem") -> token_cache.TokenCache:
    """The token cache `load_or_build` would write for `docs`, built in memory."""
    stream, starts = [], []
    for doc in docs:
        ids = tokenizer.encode(doc)
        if ids:
            starts.append(len(stream))
            stream += [tokenizer.eos_id] + ids
    starts.append(len(stream))
    stream.append(tokenizer.eos_id)
    meta = {"dataset": name, "split": "train", "documents": len(starts) - 1,
            "empty_documents": sum(not tokenizer.encode(d) for d in docs),
            "tokens": len(stream) - len(starts)}
    return token_cache.TokenCache(pathlib.Path("/memory"), np.asarray(stream, np.uint16),
                                  np.asarray(starts, np.int64), meta)


def require_tensorflow():
    """Preparing TFDS datasets needs TensorFlow (a requirement, so CI has it)."""
    return pytest.importorskip("tensorflow", reason="preparing TFDS datasets needs tensorflow "
                               "(pip install -r requirements.txt)")


def require_shakespeare():
    if not (SHAKESPEARE / "input.txt").is_file():
        pytest.skip(f"shared data absent: {SHAKESPEARE / 'input.txt'} not found")
    return SHAKESPEARE


def next_token(source, packed: bool | None = None) -> CausalLM:
    """The next-token objective for `source`'s windows (packed: the source's own setting)."""
    return CausalLM(source.seq_len, getattr(source, "packing", False) if packed is None else packed)


def lm_example(source, index: int) -> dict:
    """Example `index` of `source` as the model sees it: inputs, targets, weights (...)."""
    return next_token(source).example(source.example(index))


def lm_batch(source, step: int, global_batch: int, vocab_size: int, process: int = 0,
             processes: int = 1, packed: bool | None = None) -> dict:
    return batches.local_batch(source, step, global_batch, vocab_size,
                               next_token(source, packed).example, process, processes)
