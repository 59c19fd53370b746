"""The files of a run, on a local disk or in a Google Cloud Storage bucket: one layer for both.

A path is a `pathlib.Path` on a local disk and an `etils.epath.Path` for a `gs://bucket/path`
URL (`path`); both have the same methods (`/`, `exists`, `read_text`, `iterdir`, ...), so the
code that reads and writes a run's files does not ask which it has, except where the two
differ, here:

- writes whole or not at all (`write_text`): on a disk a temporary file renamed into place;
  in a bucket one object upload, which GCS makes visible only once it is complete. A
  folder of params (an export) is renamed into place on a disk, and in a bucket complete
  once its last object, COMPLETE, is there (jaxlm.checkpoint.writing).
- free space: a bucket has no free-space figure, so the checks before a checkpoint save
  or an export are skipped there (jaxlm.checkpoint).
- datasets: TFDS's array_record files are read from a local mirror of a bucket's
  (jaxlm.data.tfds_split).
- appends: objects cannot be appended to; the metrics log is rewritten whole instead
  (jaxlm.train.metrics).
- the one-writer lock: jaxlm.workdir (flock on a disk, a lease object in a bucket).

gs:// goes through gcsfs (file-like access, via epath) and google-cloud-storage (the lock's
conditional writes), both in the optional extra `jaxlm[gcs]`; Orbax writes the arrays with
TensorStore's own GCS driver. epath would use tf.io.gfile when TensorFlow is installed, whose
GCS client always talks to storage.googleapis.com; jaxlm sets EPATH_USE_TF=false (unless
set) so that every client honours STORAGE_EMULATOR_HOST, the one variable that points them
all at an emulator: jaxlm passes it on to TensorStore (TENSORSTORE_GCS_HTTP_URL, and an
emulator's dummy token) and to gcsfs (no zonal-bucket lookups, which an emulator cannot
answer).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil

from jaxlm.errors import ConfigError, first_line

EXTRA = "gcs"  # pip install 'jaxlm[gcs]'


def is_remote(path) -> bool:
    """Whether `path` (text or a path) is a URL (gs://...), not a local path."""
    return "://" in os.fspath(path)


def path(value, flag: str = "--workdir"):
    """`value` (text or a path) as a path: epath.Path for a gs:// URL, else pathlib.Path
    (`~` expanded). Other URL schemes are refused with a line naming `flag`."""
    if isinstance(value, pathlib.PurePath) and not isinstance(value, pathlib.Path):
        return value  # already an epath.Path
    text = os.fspath(value)
    if not is_remote(text):
        return pathlib.Path(text).expanduser()
    scheme = text.split("://", 1)[0]
    if scheme != "gs":
        raise ConfigError(f"{flag}={text}: {scheme}:// is not supported; jaxlm writes to local "
                          "paths and gs:// buckets")
    bucket = text[len("gs://"):].split("/", 1)[0]
    if not bucket:
        raise ConfigError(f"{flag}={text}: no bucket name; expected {flag}=gs://BUCKET/PATH")
    _configure_clients()
    from etils import epath
    return epath.Path(text.rstrip("/"))


def absolute(p):
    """`p` made absolute (a URL already is)."""
    return p if is_remote(p) else pathlib.Path(p).absolute()


def require_gcs(text: str, flag: str = "--workdir") -> None:
    """ConfigError naming `flag` and the extra if the gs:// clients are not installed."""
    missing = [package for package, module in (("gcsfs", "gcsfs"),
                                               ("google-cloud-storage", "google.cloud.storage"))
               if _missing(module)]
    if missing:
        raise ConfigError(f"{flag}={text}: gs:// paths need {' and '.join(missing)}: "
                          f"pip install 'jaxlm[{EXTRA}]'")


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ModuleNotFoundError, ValueError):  # no parent package; or blocked in sys.modules
        return True


def bucket_and_key(p) -> tuple[str, str]:
    """("bucket", "path/inside") of a gs:// path."""
    bucket, _, key = os.fspath(p)[len("gs://"):].partition("/")
    return bucket, key


def write_text(p, text: str) -> None:
    """Writes a file of the run whole or not at all; an OSError names the file."""
    if is_remote(p):
        try:
            p.write_text(text)  # one upload: the object appears only complete
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.fspath(p)) from None
        return
    path = pathlib.Path(p)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None


# A folder of params written to a bucket (an export, a frozen base, best params) is
# complete once this object is in it, the last one written: objects cannot be renamed into
# place at once, so readers of a bucket look for it instead (a local folder is renamed).
COMPLETE = "jaxlm_complete"


def complete(folder) -> bool:
    """Whether `folder` (of params) is there and whole: see COMPLETE."""
    if is_remote(folder):
        return (folder / COMPLETE).exists()
    return pathlib.Path(folder).is_dir()


def remove_tree(folder) -> None:
    """Removes `folder` and everything in it, if it is there."""
    if not is_remote(folder):
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.exists():
        folder.rmtree()


def gcs():
    """gcsfs's file system, for what epath's paths do not offer (listings with checksums,
    server-side copies, uploads of local files)."""
    import gcsfs
    return gcsfs.GCSFileSystem()


def check_bucket(text: str, must_exist: bool, flag: str = "--workdir"):
    """A gs:// path (`flag`'s value), after checking that the clients are installed and
    the bucket exists (and, with `must_exist`, holds the path). Whether it is writable shows
    at the first write (for a workdir the lock object, `claim`), refused whole by the
    bucket."""
    require_gcs(text, flag)
    p = path(text, flag)
    bucket, _ = bucket_and_key(p)
    from google.api_core import exceptions
    from google.auth.exceptions import GoogleAuthError
    try:
        if storage_client().lookup_bucket(bucket) is None:
            raise ConfigError(f"{flag}={text}: the bucket gs://{bucket} does not exist "
                              "(create it first, or check the name)")
        if must_exist and not p.exists():
            raise ConfigError(f"{flag}={text}: no such folder in gs://{bucket}")
    except GoogleAuthError as e:
        raise ConfigError(f"{flag}={text}: no Google Cloud credentials to reach gs://{bucket} "
                          "(gcloud auth application-default login, or a service account on "
                          f"GKE/GCE): {first_line(e)}") from None
    except exceptions.GoogleAPIError as e:
        raise ConfigError(f"{flag}={text}: cannot read the bucket gs://{bucket}: "
                          f"{first_line(e)}") from None
    except OSError as e:  # gcsfs's, or no route to the storage endpoint
        raise ConfigError(f"{flag}={text}: cannot reach gs://{bucket}: {first_line(e)}") from None
    return p


_STORAGE_CLIENT = None


def storage_client():
    """The google-cloud-storage client of this process (STORAGE_EMULATOR_HOST: the
    emulator's, without credentials)."""
    global _STORAGE_CLIENT
    if _STORAGE_CLIENT is None:
        from google.cloud import storage
        _STORAGE_CLIENT = storage.Client()
    return _STORAGE_CLIENT


def copy_tree(src, dst) -> None:
    """Copies the bucket folder `src` to `dst` (object by object, on the server), its
    COMPLETE object last so that `dst` is complete only once everything is there."""
    fs = gcs()
    src_key, dst_key = os.fspath(src).rstrip("/"), os.fspath(dst).rstrip("/")
    names = sorted(fs.find(src_key), key=lambda name: name.endswith("/" + COMPLETE))
    for name in names:
        fs.copy(name, dst_key + name[len(src_key.removeprefix("gs://")):])


def _configure_clients() -> None:
    """Points epath, gcsfs and TensorStore at the same storage (see the module docstring).
    Runs before any of them opens a gs:// path; variables already set are kept."""
    os.environ.setdefault("EPATH_USE_TF", "false")
    try:  # epath caches its TensorFlow check at the first path it opens (Orbax opens local
        from etils.epath import gpath  # ones early): read the variable again
        gpath._is_tf_installed.cache_clear()
    except (ImportError, AttributeError):  # an epath without that cache reads it each time
        pass
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        url = emulator if "://" in emulator else f"http://{emulator}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # none is checked
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        # gcsfs looks for credentials before it goes anonymous: not on a metadata server
        os.environ.setdefault("NO_GCE_CHECK", "true")
    try:
        import fsspec.config
    except ImportError:  # no gcsfs either: require_gcs names the extra
        return
    for protocol in ("gs", "gcs"):
        conf = fsspec.config.conf.setdefault(protocol, {})
        # Other processes write the same bucket (TensorStore in this one, an evaluation
        # beside training): a cached listing would hide their objects.
        conf.setdefault("use_listings_cache", False)
