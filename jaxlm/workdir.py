"""The run folder (`--workdir`): checked before use, and one writer at a time.

`check(workdir, must_exist)` refuses, with one line naming the path, a workdir that is
empty, a file, missing (for commands that only read), or not writable; for a gs:// URL, a
bucket that does not exist or cannot be reached, and missing clients (jaxlm[gcs]).

`claim(workdir)` is how a training run (`jaxlm.train`, `jaxlm.main`) takes the workdir. A
second run on the same workdir stops at once with a message naming the holder (host, pid,
start time). Commands that only read checkpoints (evaluate, export, plan) take no lock and
may run beside training. One interface, two implementations:

- a local path: an advisory lock (flock) on WORKDIR/.lock, held for the life of the
  process. The kernel drops it when the process ends, however it ends (SIGKILL included),
  so a lock is never stale and there is nothing to clean up.
- a gs:// workdir: the object WORKDIR/.lock, a lease (`ObjectClaim`). It is created with the
  precondition if-generation-match=0 (only one of several creators succeeds) and holds
  host, pid, start time and the lease length; a heartbeat thread rewrites it every quarter
  lease (if-generation-match=<its generation>, so a writer that lost it notices). Another
  run takes it over only when it is stale: its holder's process has ended (same host), or
  no heartbeat renewed it for a lease (LEASE_SECONDS, 60 s; JAXLM_LOCK_LEASE_SECONDS
  overrides), judged by the object's update time on the server against this host's clock;
  the takeover is one conditional rewrite, so of several contenders one wins. A run whose
  lease was taken over (it stalled, or could not reach the bucket, for a whole lease)
  stops at once, with exit code 2, before writing anything more.

Until the run calls `Claim.accept()` (after every check that can refuse it), nothing else is
written; `Claim.release()` of a run refused before that puts the workdir back as it found
it: the lock's old contents, or no lock and (local disk) no folder if the claim created them.

Network filesystems: on NFS, Linux implements flock with NFS byte-range locks, which hold
across hosts when the server runs a lock manager (NFSv4, or lockd for NFSv3). On FUSE
mounts such as gcsfuse a lock holds only on the host that took it: use the gs:// URL
itself as the workdir instead.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import threading
import time

from jaxlm import files
from jaxlm.errors import ConfigError, first_line

log = logging.getLogger("jaxlm")

LOCK_NAME = ".lock"
LEASE_SECONDS = float(os.environ.get("JAXLM_LOCK_LEASE_SECONDS", "60"))


def check(workdir: str | os.PathLike, *, must_exist: bool):
    """`workdir` as a path (jaxlm.files.path), after checking it can serve as one (see the
    module docstring)."""
    text = os.fspath(workdir)
    if not text.strip():
        raise ConfigError("--workdir= is empty; expected --workdir=DIR")
    if files.is_remote(text):
        return files.check_bucket(text, must_exist)
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


class ObjectClaim:
    """A held lease on a gs:// workdir: the object WORKDIR/.lock (see the module
    docstring); the same interface as `Claim`."""

    def __init__(self, workdir, blob, holder: dict, previous: bytes | None):
        self.workdir, self._blob, self._holder, self._previous = workdir, blob, holder, previous
        self.accepted = False
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="jaxlm-lock-heartbeat",
                                      daemon=True)
        self._beat.start()

    @classmethod
    def take(cls, workdir) -> ObjectClaim:
        from google.api_core import exceptions
        bucket_name, key = files.bucket_and_key(workdir)
        blob = files.storage_client().bucket(bucket_name).blob(
            f"{key}/{LOCK_NAME}" if key else LOCK_NAME)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "lease_seconds": LEASE_SECONDS, "token": os.urandom(8).hex()}
        body = json.dumps(holder) + "\n"
        previous = b""
        try:
            for _ in range(3):  # a lock deleted or rewritten between our tries: again
                try:
                    blob.upload_from_string(body, if_generation_match=0)
                    return cls(workdir, blob, holder, None)
                except exceptions.PreconditionFailed:
                    pass
                current = blob.bucket.get_blob(blob.name)
                try:
                    previous = current.download_as_bytes(if_generation_match=current.generation)
                except (AttributeError, exceptions.PreconditionFailed, exceptions.NotFound):
                    continue  # gone (None) or rewritten since: look again
                found = _parse(previous)
                if found.get("token") == holder["token"]:  # our create, retried by the client
                    blob.reload()
                    return cls(workdir, blob, holder, None)
                if not _stale(current, found):
                    raise _in_use(workdir, found)
                try:  # take it over: of several contenders one rewrite succeeds
                    blob.upload_from_string(body, if_generation_match=current.generation)
                except exceptions.PreconditionFailed:
                    continue
                log.warning("--workdir=%s: took over the lock of %s (%s)", workdir,
                            _who(found), _stale(current, found))
                return cls(workdir, blob, holder, previous)
            raise _in_use(workdir, _parse(previous))  # rewritten each time: someone holds it
        except exceptions.NotFound:
            raise ConfigError(f"--workdir={workdir}: the bucket gs://{bucket_name} does not "
                              "exist (create it first, or check the name)") from None
        except (exceptions.Forbidden, exceptions.Unauthorized) as e:
            raise ConfigError(f"--workdir={workdir}: cannot write to gs://{bucket_name} "
                              f"({first_line(e)}); nothing was written") from None

    def accept(self) -> None:
        """The run passed its checks: what the claim wrote stays."""
        self.accepted = True

    def release(self) -> None:
        """Stops the heartbeat and gives the lease up (deletes the lock object, if it is
        still this run's); before `accept`, puts back the stale lock it took over."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._beat.join()
        from google.api_core import exceptions
        try:
            current = self._blob.bucket.get_blob(self._blob.name)
            if current is None or current.generation != self._blob.generation:
                return  # taken over meanwhile: not ours to remove (the precondition below
                # says the same, but not every emulator checks it on a delete)
            if self._previous is not None and not self.accepted:
                self._blob.upload_from_string(self._previous,
                                              if_generation_match=self._blob.generation)
            else:
                self._blob.delete(if_generation_match=self._blob.generation)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            pass  # taken over meanwhile: not ours to remove

    def _heartbeat(self) -> None:
        from google.api_core import exceptions
        period = self._holder["lease_seconds"] / 4
        last = time.monotonic()
        while not self._stop.wait(period):
            body = json.dumps({**self._holder, "renewed": datetime.datetime.now().isoformat(
                timespec="seconds")}) + "\n"
            try:
                # one attempt, answered within a beat (the client's retries could outlast
                # the lease); the next beat tries again
                self._blob.upload_from_string(body, if_generation_match=self._blob.generation,
                                              timeout=period, retry=None)
                last = time.monotonic()
            except exceptions.PreconditionFailed:
                current = self._blob.bucket.get_blob(self._blob.name)
                found = _parse(current.download_as_bytes()) if current else {}
                if found.get("token") == self._holder["token"]:  # our write, retried
                    self._blob, last = current, time.monotonic()
                    continue
                return _lost(f"--workdir={self.workdir}: this run's lock was taken over by "
                             f"{_who(found)} (no heartbeat for a lease of "
                             f"{self._holder['lease_seconds']:g} s); stopping at once")
            except Exception as e:  # noqa: BLE001 (unreachable for now: retried next beat)
                if time.monotonic() - last > self._holder["lease_seconds"]:
                    return _lost(f"--workdir={self.workdir}: could not renew this run's lock "
                                 f"for a whole lease ({first_line(e)}); stopping at once")
                log.warning("--workdir=%s: renewing the lock failed (%s); retrying",
                            self.workdir, first_line(e))


def _lost(message: str) -> None:
    """A run that lost its lease stops before it writes anything more: another run may own
    the workdir now. Nothing can unwind the training loop from this thread, so it exits."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def _parse(body: bytes) -> dict:
    try:
        return json.loads(body or b"{}")
    except ValueError:
        return {}


def _stale(blob, holder: dict) -> str:
    """Why the lock `blob` (contents `holder`) may be taken over; "" while it is held."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return f"its process {holder['pid']} on this host has ended"
        except PermissionError:
            pass  # alive, another user's
    lease = float(holder.get("lease_seconds", LEASE_SECONDS))
    age = time.time() - blob.updated.timestamp()
    return f"not renewed for {age:.0f} s, longer than its lease of {lease:g} s" if age > lease else ""


def _who(holder: dict) -> str:
    return (f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since "
            f"{holder.get('started', '?')}" if holder else "another process (starting up)")


def _in_use(workdir, holder: dict) -> ConfigError:
    return ConfigError(f"--workdir={workdir} is in use by {_who(holder)}: one run per workdir; "
                       "wait for it to finish, or use another --workdir")


def check_output(output, flag: str = "--output", bucket: bool = False) -> pathlib.Path:
    """The path an export will be written to, refused now (before a possibly long restore)
    if it exists or its folder is not writable. `bucket`: a gs:// path is allowed (written
    by jaxlm.checkpoint.writing), else refused naming `flag`."""
    if files.is_remote(output):
        if not bucket:
            raise ConfigError(f"{flag}={os.fspath(output)}: written to local paths only; "
                              "write it here and copy it, e.g. with gcloud storage cp -r")
        path = files.check_bucket(os.fspath(output), False, flag)
        if path.exists():
            raise ConfigError(f"{flag}={os.fspath(output)} already exists; not overwriting it")
        return path
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
    if files.is_remote(workdir):
        return ObjectClaim.take(files.path(workdir))
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
        raise _in_use(workdir, holder) from None
    previous = _read_bytes(fd) if existed else None
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return Claim(workdir, created, fd, previous)


def write_text(path, text: str) -> None:
    """Writes a file of the run whole or not at all (jaxlm.files.write_text); an OSError
    names the file."""
    files.write_text(path, text)


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
