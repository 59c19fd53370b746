"""A TFDS text split, tokenized once into a flat on-disk token stream.

    stream = EOS doc_0 EOS doc_1 ... EOS doc_{n-1} EOS

`tokens.bin` holds the stream (uint16, or uint32 for vocabularies over 65,536 ids) and is
memory-mapped, so every host reads any window of it in O(1) without loading the dataset;
`doc_starts.npy` holds the position of each document's leading EOS, plus that of the final
EOS. Training sequences (jaxlm.data.lm) are windows of this stream.

Where: config.data.cache_dir, or by default <data_dir>/jaxlm_tokens when data_dir is a local
path (~/.cache/jaxlm/tokens when it is remote, e.g. gs://). Each cache lives in a folder
named after dataset, split and a hash of everything that decides its contents (dataset
name, split, text key, the prepared dataset's dataset_info.json, tokenizer.to_dict()), so a
change in any of them builds a new cache instead of reusing a stale one.

Built once: the first process that needs a cache tokenizes the split (one pass, one
process) into a temporary folder and renames it into place. Every host that finds no
cache builds it the same way; on a shared file system the first rename wins and the
others discard their identical copy, so no coordination is needed.

Documents that tokenize to nothing are skipped and counted (`empty_documents`); a split
with no tokens at all is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import uuid

import numpy as np

from jaxlm.data.tfds_split import TfdsSplit, default_data_dir, is_remote
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import ConfigError, DataError

FORMAT = 1  # bump when the on-disk layout changes


@dataclasses.dataclass
class TokenCache:
    """The token stream of one split: `tokens` (memory-mapped) and `doc_starts`."""
    path: pathlib.Path
    tokens: np.ndarray       # [N] uint16/uint32, the stream
    doc_starts: np.ndarray   # [documents + 1] int64, leading-EOS positions + the final EOS
    meta: dict


def cache_root(cache_dir: str, data_dir: str) -> pathlib.Path:
    if is_remote(cache_dir):
        raise ConfigError(f"config.data.cache_dir={cache_dir}: token caches are memory-mapped "
                          "and must be on a local disk (each host builds its own); leave it "
                          "empty or give a local folder")
    if cache_dir:
        return pathlib.Path(cache_dir).expanduser()
    data_dir = data_dir or default_data_dir()
    if is_remote(data_dir):
        return pathlib.Path("~/.cache/jaxlm/tokens").expanduser()
    return pathlib.Path(data_dir).expanduser() / "jaxlm_tokens"


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def load_or_build(split: TfdsSplit, tokenizer: Tokenizer, root: pathlib.Path) -> TokenCache:
    """The split's token cache under `root`, tokenizing the split first if needed."""
    key = {"format": FORMAT, "dataset": split.name, "split": split.split,
           "text_key": split.text_key, "dataset_info_sha256": split.fingerprint,
           "tokenizer": tokenizer.to_dict()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = root / f"{_safe(split.name)}-{_safe(split.split)}-{digest}"
    if not (path / "meta.json").is_file():
        _build(split, tokenizer, key, path)
    meta = json.loads((path / "meta.json").read_text())
    tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r")
    return TokenCache(path, tokens, np.load(path / "doc_starts.npy"), meta)


def _build(split: TfdsSplit, tokenizer: Tokenizer, key: dict, path: pathlib.Path) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        starts, position, empty = [], 0, 0
        eos = np.asarray([tokenizer.eos_id], dtype).tobytes()
        with open(tmp / "tokens.bin", "wb") as f:
            for text in split.documents():
                ids = tokenizer.encode(text)
                if not ids:
                    empty += 1
                    continue
                starts.append(position)
                f.write(eos + np.asarray(ids, dtype).tobytes())
                position += 1 + len(ids)
            f.write(eos)  # the last document's closing EOS
        if not starts:
            raise DataError(f"config.data.name={split.name!r} split {split.split!r} holds no "
                              f"text ({empty} empty documents)")
        starts.append(position)
        np.save(tmp / "doc_starts.npy", np.asarray(starts, np.int64))
        meta = {**key, "dtype": np.dtype(dtype).name, "documents": len(starts) - 1,
                "empty_documents": empty, "tokens": position - (len(starts) - 1)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same cache first: keep theirs
            if not (path / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
