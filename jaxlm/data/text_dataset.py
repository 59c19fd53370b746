"""Local text files as a TFDS dataset (array_record), offline: `prepare_text` writes .txt /
.jsonl files (read by jaxlm.data.text_files) as dataset NAME under a TFDS data_dir, which
training then reads like any prepared dataset (`--config.data.name=NAME`). Preparing needs
TensorFlow; reading does not. The command is `python -m jaxlm.data.prepare text`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import types
from typing import ClassVar

from jaxlm import files as files_lib
from jaxlm.data.text_files import UNITS, read_text_file
from jaxlm.data.tfds_split import staging, upload, write_prepared
from jaxlm.errors import ConfigError


def _tfds():
    import tensorflow_datasets as tfds  # heavy: imported on first use
    tfds.disable_progress_bar()
    return tfds


def _builder_class(name: str):
    """A TFDS builder class named `name` for local text (not added to TFDS's registry:
    the dataset is read back from its files, like any prepared dataset)."""
    tfds = _tfds()

    class LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        splits: ClassVar[dict[str, list[str]]] = {}  # split -> documents, set by prepare_text
        fingerprint: ClassVar[str] = ""              # sha256 of the inputs and options

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                description=f"Local text prepared by jaxlm; inputs sha256 "
                            f"{self.fingerprint}")

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(docs) for split, docs in self.splits.items()}

        def _generate_examples(self, docs):
            for i, doc in enumerate(docs):
                yield i, {"text": doc}

    return types.new_class(name, (LocalText,), {"skip_registration": True},
                           lambda ns: ns.update(name=name))


def prepare_text(name: str, splits: dict[str, list[str]], data_dir: str, *, unit: str = "file",
                 text_key: str = "text", overwrite: bool = False) -> dict[str, int]:
    """Writes local files as TFDS dataset `name` (array_record) under data_dir.

    splits: split name -> files. Returns documents per split. An existing dataset of the
    same name made from other files is refused unless `overwrite`.
    """
    tfds = _tfds()
    if unit not in UNITS:
        raise ConfigError(f"--unit={unit!r}: expected one of {UNITS}")
    if not splits:
        raise ConfigError("no --split=NAME:FILES given")
    docs, h = {}, hashlib.sha256(json.dumps([unit, text_key]).encode())
    for split, files in splits.items():
        docs[split] = []
        for f in files:
            path = pathlib.Path(f).expanduser()
            docs[split] += read_text_file(path, unit, text_key)
            h.update(f"{split}\0{path.name}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    cls = _builder_class(name)
    cls.splits, cls.fingerprint = docs, h.hexdigest()
    data_dir = os.fspath(files_lib.path(data_dir, "--data_dir"))
    remote = files_lib.is_remote(data_dir)
    nbytes = sum(pathlib.Path(f).expanduser().stat().st_size for fs in splits.values() for f in fs)
    with staging(data_dir) as local:  # gs://: prepared here, then uploaded
        builder = cls(data_dir=local, file_format="array_record")
        version = pathlib.Path(builder.data_dir).relative_to(builder.data_dir_root)
        target = files_lib.path(data_dir) / version.as_posix()
        info = target / "dataset_info.json"
        mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        if info.is_file() and cls.fingerprint not in info.read_text():
            if not overwrite:
                raise ConfigError(f"{target} already holds a dataset {name!r} made from "
                                  "other files; pass --overwrite or choose another --name")
            mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
        elif info.is_file() and remote:
            return {split: len(d) for split, d in docs.items()}  # there already
        write_prepared(builder, name, nbytes, tfds.download.DownloadConfig(
            download_mode=mode, compute_stats=tfds.download.ComputeStatsMode.SKIP))
        if remote:
            upload(builder, data_dir)
    return {split: len(d) for split, d in docs.items()}
