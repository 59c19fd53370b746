"""The run folder (`--workdir`): checked before use, and one writer at a time.

`check(workdir, must_exist)` refuses, with one line naming the path, a workdir that is
empty, a remote URL, a file, missing (for commands that only read), or not writable.

`claim(workdir)` is how a training run (`jaxlm.train`, `jaxlm.main`) takes the workdir:
an advisory lock (flock) on WORKDIR/.lock, held for the life of the process. The kernel
drops it when the process ends, however it ends (SIGKILL included), so a lock is never
stale and there is nothing to clean up. A second run on the same workdir stops at once with
a message naming the holder (host, pid, start time: the lock file's contents). Commands that
only read checkpoints (evaluate, export, plan) take no lock and may run beside training.

Until the run calls `Claim.accept()` (after every check that can refuse it), nothing else is
written; `Claim.release()` of a run refused before that puts the workdir back as it found
it: the lock file's old contents, or no lock file and no folder if the claim created them.

Network filesystems: on NFS, Linux implements flock with NFS byte-range locks, which hold
across hosts when the server runs a lock manager (NFSv4, or lockd for NFSv3). On FUSE
mounts such as gcsfuse a lock holds only on the host that took it. Object-store URLs
(gs://) are not accepted as workdirs: metrics, results and locks need a filesystem; mount
the bucket (gcsfuse) or use a shared filesystem.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import time

from jaxlm.errors import ConfigError

LOCK_NAME = ".lock"


def check(workdir: str | os.PathLike, *, must_exist: bool) -> pathlib.Path:
    """`workdir` as a Path, after checking it can serve as one (see the module docstring)."""
    text = os.fspath(workdir)
    if not text.strip():
        raise ConfigError("--workdir= is empty; expected --workdir=DIR")
    if "://" in text:
        raise ConfigError(f"--workdir={text}: a URL; jaxlm needs a filesystem path (mount the "
                          "bucket, e.g. with gcsfuse, or use a shared filesystem)")
    path = pathlib.Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir={text} is a file, not a folder")
    if not path.exists():
        if must_exist:
            raise ConfigError(f"--workdir={text}: no such folder")
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir():
            raise ConfigError(f"--workdir={text}: {parent} is a file, not a folder")
        path = parent
    if not must_exist and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={text}: {path} is not writable (permission denied)")
    return pathlib.Path(text).expanduser()


class Claim:
    """A held lock on a workdir (see `claim`)."""

    def __init__(self, workdir: pathlib.Path, created: list[pathlib.Path], fd: int,
                 previous: bytes | None):
        self.workdir, self._created, self._fd, self._previous = workdir, created, fd, previous
        self.accepted = False

    def accept(self) -> None:
        """The run passed its checks: what the claim wrote stays."""
        self.accepted = True

    def release(self) -> None:
        """Drops the lock; before `accept`, also undoes what the claim wrote."""
        if self._fd < 0:
            return
        lock = self.workdir / LOCK_NAME
        if not self.accepted:
            if self._previous is None:
                lock.unlink(missing_ok=True)
            else:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, self._previous, 0)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = -1
        if not self.accepted:
            for folder in self._created:  # deepest first; only while empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def check_output(output, flag: str = "--output") -> pathlib.Path:
    """The path an export will be written to, refused now (before a possibly long restore)
    if it exists or its folder is not writable."""
    output = pathlib.Path(output)
    if output.exists():
        raise ConfigError(f"{flag}={output} already exists; not overwriting it")
    parent = output.absolute().parent
    if not parent.exists():
        raise ConfigError(f"{flag}={output}: the folder {parent} does not exist (create it "
                          "first)")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}={output}: {parent} is not a writable folder")
    return output


def claim(workdir: pathlib.Path) -> Claim:
    """Locks `workdir` for this process (creating it if needed); ConfigError naming the
    holder if another process has it."""
    workdir = pathlib.Path(workdir)
    absolute = workdir.absolute()
    created = [p for p in [absolute, *absolute.parents] if not p.exists()]  # deepest first
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir / LOCK_NAME
    existed = lock.exists()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        holder = _read(fd)
        for _ in range(20):  # the holder writes its name right after locking: give it 1 s
            if holder:
                break
            time.sleep(0.05)
            holder = _read(fd)
        os.close(fd)
        who = (f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since "
               f"{holder.get('started', '?')}" if holder else "another process (starting up)")
        raise ConfigError(f"--workdir={workdir} is in use by {who}: one run per workdir; wait "
                          "for it to finish, or use another --workdir") from None
    previous = _read_bytes(fd) if existed else None
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return Claim(workdir, created, fd, previous)


def write_text(path: pathlib.Path, text: str) -> None:
    """Writes a file of the run whole or not at all (a temporary file renamed into place);
    an OSError names the file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None


def _read_bytes(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _read(fd: int) -> dict:
    try:
        return json.loads(_read_bytes(fd) or b"{}")
    except ValueError:
        return {}


class _NoClaim:
    """What the processes other than 0 hold: process 0 has the lock for the whole job."""

    def accept(self) -> None:
        pass

    def release(self) -> None:
        pass


NO_CLAIM = _NoClaim()
