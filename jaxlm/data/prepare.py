"""Make TFDS datasets on disk, offline: from your own text files, or a catalog dataset from
files you already have. Preparing needs TensorFlow; reading (jaxlm.data.token_cache) does
not, since everything is written as array_record.

Your own corpus (.txt files, one document per file / paragraph / line; or .jsonl, one
document per line from the field --text_key) becomes the TFDS dataset NAME:

    python -m jaxlm.data.prepare text --name=my_corpus --data_dir=~/tensorflow_datasets \
        --split=train:a.txt,b.txt --split=validation:c.txt [--unit=paragraph]

A catalog dataset whose source files are already on disk (TFDS "manual_dir": nothing is
downloaded), e.g. tiny Shakespeare from shared/data:

    python -m jaxlm.data.prepare tfds --name=tiny_shakespeare --data_dir=~/tensorflow_datasets \
        --manual_dir=../shared/data/tinyshakespeare

Either way train with `--config.data.name=NAME --config.data.data_dir=DIR`. Setting
config.data.manual_dir instead makes the training job prepare a catalog dataset itself the
first time (run that once on one host before a multi-host job).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import types
from typing import ClassVar

from jaxlm.config import ConfigError
from jaxlm.data.tokenizer import _jsonl_text, _utf8

UNITS = ("file", "paragraph", "line")


def _tfds():
    import tensorflow_datasets as tfds  # heavy: imported on first use
    tfds.disable_progress_bar()
    return tfds


def read_text_file(path: pathlib.Path, unit: str, text_key: str = "text") -> list[str]:
    """The documents of one local file; ConfigError (naming file and line) for a missing
    or empty file, bytes that are not UTF-8, and bad JSONL lines."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    data = path.read_bytes()
    if not data.strip():
        raise ConfigError(f"{path}: the file is empty")
    if path.suffix == ".jsonl":
        return [_jsonl_text(line, text_key, path, n)
                for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    text = _utf8(data, path)
    if unit == "file":
        return [text]
    if unit == "line":
        return [ln for ln in text.split("\n") if ln.strip()]
    paragraphs, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current) + "\n")
            current = []
    if current:
        paragraphs.append("\n".join(current) + "\n")
    return paragraphs


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
                description=f"Local text prepared by jaxlm.data.prepare; inputs sha256 "
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
    from etils import epath  # a TFDS dependency; handles local and gs:// paths

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
    if "://" not in data_dir:  # gs:// and other remote paths go to TFDS unchanged
        data_dir = str(pathlib.Path(data_dir).expanduser())
    builder = cls(data_dir=data_dir, file_format="array_record")
    info = epath.Path(builder.data_dir) / "dataset_info.json"
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if info.is_file() and cls.fingerprint not in info.read_text():
        if not overwrite:
            raise ConfigError(f"{builder.data_dir} already holds a dataset {name!r} made from "
                              "other files; pass --overwrite or choose another --name")
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=mode, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return {split: len(d) for split, d in docs.items()}


def prepare_catalog(name: str, data_dir: str, manual_dir: str) -> str:
    """Prepares TFDS catalog dataset `name` from the source files in `manual_dir` (no
    download) as array_record under data_dir; returns the prepared directory."""
    tfds = _tfds()
    manual = pathlib.Path(manual_dir).expanduser()
    if not manual.is_dir() or not any(manual.iterdir()):
        raise ConfigError(f"config.data.manual_dir={manual_dir!r}: no such directory, or it is "
                          f"empty (it must hold the source files of {name!r})")
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(f"config.data.name={name!r}: no such TFDS catalog dataset") from None
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual), try_download_gcs=False))
    return str(builder.data_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.data.prepare")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("text", help="local .txt / .jsonl files -> a TFDS dataset")
    t.add_argument("--name", required=True)
    t.add_argument("--data_dir", required=True)
    t.add_argument("--split", action="append", required=True, metavar="SPLIT:FILE[,FILE...]")
    t.add_argument("--unit", default="file", choices=UNITS, help="document unit of .txt files")
    t.add_argument("--text_key", default="text", help="field of each JSONL line")
    t.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("tfds", help="a TFDS catalog dataset from files on disk (manual_dir)")
    c.add_argument("--name", required=True)
    c.add_argument("--data_dir", required=True)
    c.add_argument("--manual_dir", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "text":
            splits = {}
            for s in args.split:
                split, _, files = s.partition(":")
                if not files:
                    raise ConfigError(f"--split={s!r}: expected SPLIT:FILE[,FILE...]")
                splits[split] = files.split(",")
            counts = prepare_text(args.name, splits, args.data_dir, unit=args.unit,
                                  text_key=args.text_key, overwrite=args.overwrite)
            print(f"prepared {args.name} under {args.data_dir}: documents per split {counts}")
        else:
            print(f"prepared {prepare_catalog(args.name, args.data_dir, args.manual_dir)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
