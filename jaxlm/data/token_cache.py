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

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data.tokenizer import Tokenizer

FORMAT = 1  # bump when the on-disk layout changes


def default_data_dir() -> str:
    """TFDS's own default: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or str(pathlib.Path("~/tensorflow_datasets").expanduser())


def _is_remote(path: str) -> bool:
    return "://" in path


@dataclasses.dataclass
class TfdsSplit:
    """An opened (prepared) TFDS split and what identifies its contents."""
    name: str
    split: str
    text_key: str
    builder: object
    fingerprint: str   # sha256 of the prepared dataset's dataset_info.json

    def documents(self) -> Iterator[str]:
        """The split's texts in the prepared order (UTF-8 checked)."""
        info = self.builder.info
        where = f"config.data.name={self.name!r} split {self.split!r}"
        if info.file_format is not None and info.file_format.value == "array_record":
            source = self.builder.as_data_source(split=self.split)
            for start in range(0, len(source), 256):
                keys = list(range(start, min(start + 256, len(source))))
                for i, ex in zip(keys, source.__getitems__(keys)):
                    yield _text(ex[self.text_key], where, i)
        else:
            try:
                import tensorflow  # noqa: F401  (tfrecord files are read through tf.data)
            except ImportError:
                raise ConfigError(f"{where} was prepared as {info.file_format}; reading it needs "
                                  "tensorflow (or prepare it with file_format=array_record)") from None
            import tensorflow_datasets as tfds
            ds = self.builder.as_dataset(split=self.split, shuffle_files=False)
            for i, ex in enumerate(tfds.as_numpy(ds)):
                yield _text(ex[self.text_key], where, i)


def _text(value, where: str, index: int) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: example {index} is not UTF-8 ({e.reason} at byte "
                          f"{e.start})") from None


def open_tfds(name: str, split: str, data_dir: str, text_key: str = "",
              manual_dir: str = "") -> TfdsSplit:
    """Opens a prepared TFDS split (preparing it from manual_dir first if given and the
    dataset is not there yet). Each problem is a ConfigError naming the config field."""
    import tensorflow_datasets as tfds  # imported only for real data
    from etils import epath

    tfds.disable_progress_bar()
    data_dir = data_dir or default_data_dir()
    if not _is_remote(data_dir):
        data_dir = str(pathlib.Path(data_dir).expanduser())
        if not pathlib.Path(data_dir).is_dir() and not manual_dir:
            raise ConfigError(f"config.data.data_dir={data_dir!r} does not exist")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(f"config.data.name={name!r}: no TFDS dataset of that name, neither in "
                          f"the catalog nor prepared under {data_dir} (make one from local "
                          "files with python -m jaxlm.data.prepare text)") from None
    if not builder.is_prepared():
        if not manual_dir:
            raise ConfigError(
                f"config.data.name={name!r} is not prepared under config.data.data_dir="
                f"{data_dir!r} and nothing is downloaded: set config.data.manual_dir to a folder "
                f"with its source files, or run python -m jaxlm.data.prepare")
        from jaxlm.data.prepare import prepare_catalog
        # Processes on one machine (launch/local.py) take turns; the first one prepares.
        lock = (_file_lock(pathlib.Path(data_dir) / f".{_safe(name)}.prepare.lock")
                if not _is_remote(data_dir) else contextlib.nullcontext())
        with lock:
            if not tfds.builder(name, data_dir=data_dir).is_prepared():
                prepare_catalog(name, data_dir, manual_dir)
        builder = tfds.builder(name, data_dir=data_dir)
    splits = list(builder.info.splits)
    if split.split("[")[0] not in splits:
        raise ConfigError(f"config.data.split={split!r}: {name} has splits {sorted(splits)}")
    features = builder.info.features
    texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
    if not text_key:
        if len(texts) != 1:
            raise ConfigError(f"config.data.text_key is empty and {name} has "
                              f"{len(texts)} text features {texts}; name one")
        text_key = texts[0]
    elif text_key not in features:
        raise ConfigError(f"config.data.text_key={text_key!r}: {name} has features "
                          f"{sorted(features)}")
    info = epath.Path(builder.data_dir) / "dataset_info.json"
    return TfdsSplit(name, split, text_key, builder, hashlib.sha256(info.read_bytes()).hexdigest())


@dataclasses.dataclass
class TokenCache:
    """The token stream of one split: `tokens` (memory-mapped) and `doc_starts`."""
    path: pathlib.Path
    tokens: np.ndarray       # [N] uint16/uint32, the stream
    doc_starts: np.ndarray   # [documents + 1] int64, leading-EOS positions + the final EOS
    meta: dict

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1


def cache_root(cache_dir: str, data_dir: str) -> pathlib.Path:
    if cache_dir:
        return pathlib.Path(cache_dir).expanduser()
    data_dir = data_dir or default_data_dir()
    if _is_remote(data_dir):
        return pathlib.Path("~/.cache/jaxlm/tokens").expanduser()
    return pathlib.Path(data_dir).expanduser() / "jaxlm_tokens"


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
            raise ConfigError(f"config.data.name={split.name!r} split {split.split!r} holds no "
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
