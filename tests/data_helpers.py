"""Helpers shared by the tests/test_data_*.py files: in-memory token caches and a small
local corpus prepared as a TFDS dataset."""

import pathlib

import numpy as np
import pytest
from conftest import SHARED_DATA

from jaxlm.data import token_cache
from jaxlm.data.tokenizer import Tokenizer

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
