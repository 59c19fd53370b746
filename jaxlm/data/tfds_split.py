"""Opening a prepared TFDS text split, offline: the dataset must be on disk (prepared by
jaxlm.data.prepare, or prepared here from config.data.manual_dir the first time); nothing is
downloaded. Each problem is a ConfigError naming the config field (data_dir, name, split,
text_key), or a DataError naming the example that cannot be read.

jaxlm reads array_record files with `tfds.data_source` (random access, no TensorFlow);
datasets prepared as tfrecord are read through tf.data, which needs TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pathlib
import re
import shutil
from collections.abc import Iterator

from jaxlm.errors import ConfigError, DataError, disk_error


def default_data_dir() -> str:
    """TFDS's own default: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or str(pathlib.Path("~/tensorflow_datasets").expanduser())


def is_remote(path: str) -> bool:
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
        raise DataError(f"{where}: example {index} is not UTF-8 ({e.reason} at byte "
                          f"{e.start})") from None


def open_split(name: str, split: str, data_dir: str, text_key: str = "",
              manual_dir: str = "") -> TfdsSplit:
    """Opens a prepared TFDS split (preparing it from manual_dir first if given and the
    dataset is not there yet). Each problem is a ConfigError naming the config field."""
    import tensorflow_datasets as tfds  # imported only for real data
    from etils import epath

    tfds.disable_progress_bar()
    data_dir = data_dir or default_data_dir()
    if not is_remote(data_dir):
        data_dir = str(pathlib.Path(data_dir).expanduser())
        if not pathlib.Path(data_dir).is_dir() and not manual_dir:
            raise ConfigError(f"config.data.data_dir={data_dir!r} does not exist")
    builder = _builder(name, f"config.data.name={name!r}", data_dir=data_dir, missing=(
        f"config.data.name={name!r}: no TFDS dataset of that name, neither in the catalog nor "
        f"prepared under {data_dir} (make one from local files with python -m "
        "jaxlm.data.prepare text)"))
    if not builder.is_prepared():
        if not manual_dir:
            raise ConfigError(
                f"config.data.name={name!r} is not prepared under config.data.data_dir="
                f"{data_dir!r} and nothing is downloaded: set config.data.manual_dir to a folder "
                f"with its source files, or run python -m jaxlm.data.prepare")
        # Processes on one machine (launch/local.py) take turns; the first one prepares.
        safe_name = re.sub(r"[^\w.-]", "_", name)
        lock = (_file_lock(pathlib.Path(data_dir) / f".{safe_name}.prepare.lock")
                if not is_remote(data_dir) else contextlib.nullcontext())
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


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_catalog(name: str, data_dir: str, manual_dir: str) -> str:
    """Prepares TFDS catalog dataset `name` from the source files in `manual_dir` (no
    download) as array_record under data_dir; returns the prepared directory."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    manual = pathlib.Path(manual_dir).expanduser()
    if not manual.is_dir() or not any(manual.iterdir()):
        raise ConfigError(f"config.data.manual_dir={manual_dir!r}: no such directory, or it is "
                          f"empty (it must hold the source files of {name!r})")
    builder = _builder(name, f"config.data.name={name!r}", data_dir=data_dir,
                       file_format="array_record")
    nbytes = sum(f.stat().st_size for f in manual.rglob("*") if f.is_file())
    write_prepared(builder, name, nbytes, tfds.download.DownloadConfig(
        manual_dir=str(manual), try_download_gcs=False))
    return str(builder.data_dir)


def write_prepared(builder, name: str, nbytes: int, download_config) -> None:
    """builder.download_and_prepare(download_config) as one write, like every writer of
    jaxlm: refused before writing if the disk has fewer than `nbytes` free (the source
    bytes; array_record stores text about as large); on failure the folders it made (the
    dataset's, TFDS's downloads/) are removed and a disk error is one line naming them.
    TFDS itself writes into an incomplete.* folder and renames it when complete."""
    root = pathlib.Path(str(builder.data_dir_root))
    local = not is_remote(str(root))
    made = []
    if local:
        top = pathlib.Path(str(builder.data_dir)).relative_to(root).parts[0]
        made = [p for p in (root, root / top, root / "downloads") if not p.exists()]
        existing = next(p for p in (root, *root.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        if free < nbytes:
            raise DataError(f"preparing {name} under {root} needs about {nbytes / 1e6:.1f} MB, "
                            f"and that disk has {free / 1e6:.1f} MB free")
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as e:
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
        cause = disk_error(e)
        if cause is None:
            raise
        raise DataError(f"preparing {name} under {root} failed: {cause.strerror}; nothing of "
                        "it was kept (free space, or choose another data_dir)") from None


def builder_for(name: str, data_dir: str, what: str):
    """The builder of TFDS dataset `name`, prepared under data_dir ("" = the default);
    ConfigError naming `what` (the config field) if it is unknown or not prepared."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    data_dir = data_dir or default_data_dir()
    builder = _builder(name, what, data_dir=data_dir)
    if not builder.is_prepared():
        raise ConfigError(f"{what}: {name!r} is not prepared under {data_dir} and nothing is "
                          "downloaded; prepare it there first (TFDS manual_dir)")
    return builder


def _builder(name: str, what: str, missing: str = "", **kwargs):
    """tfds.builder(name, **kwargs); ConfigError naming `what` for a name TFDS cannot parse
    or an unknown dataset (`missing`: the message for that)."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(missing or f"{what}: no TFDS dataset {name!r}") from None
    except ValueError as e:
        if "Parsing builder name" not in str(e):
            raise
        raise ConfigError(f"{what}: {name!r} is not a TFDS dataset name (NAME, NAME/CONFIG or "
                          "NAME:VERSION; lower case, no spaces)") from None
