"""Opening a prepared TFDS text split, offline: the dataset must be on disk (prepared by
jaxlm.data.prepare, or prepared here from config.data.manual_dir the first time); nothing is
downloaded. Each problem is a ConfigError naming the config field (data_dir, name, split,
text_key), or a DataError naming the example that cannot be read.

jaxlm reads array_record files with `tfds.data_source` (random access, no TensorFlow);
datasets prepared as tfrecord are read through tf.data, which needs TensorFlow.

A data_dir in a bucket (gs://): array_record's reader and writer open local files only, so
a dataset there is read from a local mirror (`mirror`: ~/.cache/jaxlm/tfds/BUCKET/PATH,
refreshed when the bucket's objects change; each host keeps its own), and one prepared
there is written to a local temporary data_dir first, then uploaded (`upload`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator

from jaxlm import files
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
    data_dir = os.fspath(files.path(data_dir or default_data_dir(), "config.data.data_dir"))
    if not is_remote(data_dir):
        if not pathlib.Path(data_dir).is_dir() and not manual_dir:
            raise ConfigError(f"config.data.data_dir={data_dir!r} does not exist")
    local = mirror(data_dir, name)  # data_dir itself, unless it is a bucket
    builder = _builder(name, f"config.data.name={name!r}", data_dir=local, missing=(
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
            if not tfds.builder(name, data_dir=local).is_prepared():
                prepare_catalog(name, data_dir, manual_dir)
                local = mirror(data_dir, name)
        builder = tfds.builder(name, data_dir=local)
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
    with staging(data_dir) as local:
        builder = _builder(name, f"config.data.name={name!r}", data_dir=local,
                           file_format="array_record")
        nbytes = sum(f.stat().st_size for f in manual.rglob("*") if f.is_file())
        write_prepared(builder, name, nbytes, tfds.download.DownloadConfig(
            manual_dir=str(manual), try_download_gcs=False))
        return upload(builder, data_dir) if is_remote(data_dir) else str(builder.data_dir)


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
    data_dir = os.fspath(files.path(data_dir or default_data_dir(), "config.data.data_dir"))
    builder = _builder(name, what, data_dir=mirror(data_dir, name))
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


# ----------------------------------------------------------------------------- gs:// data_dir

MIRROR_ROOT = "~/.cache/jaxlm/tfds"
_MANIFEST = ".jaxlm_mirror.json"


def mirror(data_dir: str, name: str) -> str:
    """The data_dir to open dataset `name` from: `data_dir` itself if local; for a gs://
    one, a local copy of its folder NAME (every version and config), downloaded again
    whenever the bucket's objects differ from those the copy was made from."""
    if not is_remote(data_dir):
        return data_dir
    files.check_bucket(data_dir, must_exist=False, flag="config.data.data_dir")
    bucket, key = files.bucket_and_key(data_dir)
    root = pathlib.Path(MIRROR_ROOT).expanduser() / bucket / key
    base = name.split("/")[0].split(":")[0]
    fs = files.gcs()
    prefix = f"{bucket}/{key}/{base}" if key else f"{bucket}/{base}"
    remote = {path[len(prefix) + 1:]: info.get("md5Hash") or str(info["size"])
              for path, info in fs.find(prefix, detail=True).items()}
    local = root / base
    if not remote:
        return str(root)  # nothing there: TFDS reports it as not prepared
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{base}.mirror.lock"):
        manifest = local / _MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()) == remote:
            return str(root)
        partial = root / f".{base}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            for rel in remote:
                (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            names = sorted(remote)
            fs.get([f"{prefix}/{rel}" for rel in names], [str(partial / rel) for rel in names])
            (partial / _MANIFEST).write_text(json.dumps(remote))
            shutil.rmtree(local, ignore_errors=True)
            os.rename(partial, local)
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise DataError(f"config.data.data_dir={data_dir}: copying {base} to {root} failed: "
                            f"{e.strerror or e}") from None
    return str(root)


@contextlib.contextmanager
def staging(data_dir: str):
    """The data_dir TFDS prepares into: `data_dir` itself if local, else a temporary local
    folder (removed afterwards) whose dataset `upload` then puts into the bucket."""
    if not is_remote(data_dir):
        yield data_dir
        return
    files.check_bucket(data_dir, must_exist=False, flag="--data_dir")
    with tempfile.TemporaryDirectory(prefix="jaxlm-prepare-") as local:
        yield local


def upload(builder, data_dir: str) -> str:
    """Copies the dataset version `builder` prepared (in a `staging` folder) to the same
    place under the gs:// `data_dir`, replacing what is there, its dataset_info.json last
    (TFDS takes a version folder holding it as prepared); returns the bucket folder. On
    failure what was uploaded is removed."""
    local = pathlib.Path(str(builder.data_dir))
    rel = local.relative_to(pathlib.Path(str(builder.data_dir_root))).as_posix()
    target = f"{data_dir.rstrip('/')}/{rel}"
    fs = files.gcs()
    if fs.exists(target):
        fs.rm(target, recursive=True)
    names = sorted((p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()),
                   key=lambda n: n == "dataset_info.json")
    try:
        for name in names:
            fs.put_file(str(local / name), f"{target}/{name}")
    except Exception as e:
        if fs.exists(target):
            fs.rm(target, recursive=True)
        raise DataError(f"uploading {builder.name} to {target} failed: {e}; nothing of it was "
                        "kept") from None
    return target
