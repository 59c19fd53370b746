"""Reading and writing Hugging Face weight folders: safetensors files, one tensor at a time.

A folder holds `model.safetensors`, or shards `model-0000X-of-0000Y.safetensors` listed by
`model.safetensors.index.json`, plus `config.json`. Tensors are read memory-mapped
(`safe_open`, numpy), so converting a model never holds more than one tensor in host
memory. Pickled weights (`pytorch_model.bin`, `.pt`) are refused: loading them runs
arbitrary code; convert them to safetensors first.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable

import numpy as np

from jaxlm.errors import CheckpointError

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth",
           "tf_model.h5", "flax_model.msgpack")


class TensorFolder:
    """The tensors of a Hugging Face checkpoint folder, by name."""

    def __init__(self, folder):
        from safetensors import safe_open
        self.folder = pathlib.Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder")
        if (self.folder / INDEX).is_file():
            try:
                weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{self.folder / INDEX}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            found = [p for p in PICKLES if (self.folder / p).exists()]
            hint = (f" ({', '.join(found)} is a pickle/other-framework file, which jaxlm does not "
                    "load: it can run code. Convert it to safetensors first, e.g. with "
                    "transformers: AutoModel.from_pretrained(DIR).save_pretrained(OUT, "
                    "safe_serialization=True))") if found else ""
            raise CheckpointError(f"{self.folder}: no {SINGLE} or {INDEX}{hint}")
        self._where: dict[str, object] = {}
        self._files = []
        for name in files:
            path = self.folder / name
            try:
                handle = safe_open(str(path), framework="numpy")
            except Exception as e:  # truncated or not safetensors at all
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
            self._files.append(handle)
            for key in handle.keys():
                self._where[key] = handle

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{self.folder}: no config.json")
        return json.loads(path.read_text())

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        try:
            return self._where[key].get_tensor(key)
        except Exception as e:  # e.g. a file cut short after its header
            raise CheckpointError(f"{self.folder}: tensor {key} cannot be read ({e})") from None


def write_folder(folder: pathlib.Path, tensors: Iterable[tuple[str, np.ndarray]],
                 shard_bytes: int = 2 << 30) -> None:
    """Writes (name, array) pairs, taken one at a time, as `model.safetensors`, or as
    shards of at most `shard_bytes` with an index when they do not fit one; at most one
    shard is held in memory. Files get the mode the user's umask gives (safetensors itself
    makes them 0600)."""
    from safetensors.numpy import save_file
    folder = pathlib.Path(folder)
    files: list[tuple[str, list[str]]] = []  # (file name, its tensor names)
    mode = _umask_mode(folder)

    def flush(shard: dict):
        name = f"part-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        os.chmod(folder / name, mode)
        files.append((name, list(shard)))

    shard, size = {}, 0
    for key, array in tensors:
        array = np.ascontiguousarray(array)
        if shard and size + array.nbytes > shard_bytes:
            flush(shard)
            shard, size = {}, 0
        shard[key], size = array, size + array.nbytes
    flush(shard)
    if len(files) == 1:
        (folder / files[0][0]).rename(folder / SINGLE)
        return
    weight_map = {}
    for i, (name, keys) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        (folder / name).rename(folder / final)
        weight_map.update({k: final for k in keys})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def _umask_mode(folder: pathlib.Path) -> int:
    """The mode a new file in `folder` gets from the umask (read from a file made there:
    changing the umask to read it would race with other threads creating files)."""
    probe = folder / ".umask-probe"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()
