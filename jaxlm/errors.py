"""The errors a user can act on, as opposed to bugs.

Every `python -m jaxlm.*` command (jaxlm.cli) prints a `JaxlmError` as one line,
`error: <message>`, and exits with its `exit_code`; anything else is a bug and keeps its
traceback. A message names what to fix: the config field, the file (and line), or the
checkpoint, and the value found there.

This module imports nothing from jaxlm, so every module may import it.
"""

from __future__ import annotations

import errno
import inspect
import os
import re


class JaxlmError(Exception):
    """Base of the user errors; printed as one line, exit code 2."""
    exit_code = 2


class ConfigError(JaxlmError, ValueError):
    """A config field, command-line flag or name that cannot work; names the field."""


class CheckpointError(JaxlmError):
    """A checkpoint or export that is missing, damaged or does not match the config."""


class DataError(JaxlmError):
    """Input data that cannot be used as it is: names the file and line, or the dataset."""


class Diverged(JaxlmError):
    """The loss or gradient norm became NaN/inf (config.train.nonfinite); exit code 1."""
    exit_code = 1


class Interrupted(JaxlmError):
    """Ctrl-C: the run saved a checkpoint at the next step boundary and stopped; exit 130."""
    exit_code = 130


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type's name if it has none), for a one-line
    error that quotes a library's exception."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def abandoned_coroutine(u) -> bool:
    """A coroutine destroyed unfinished that raised as it was closed. Orbax runs each
    restore in an event loop of its own and closes it as soon as one array fails to read,
    with the reads of the others still pending there; nothing can resume or cancel those
    after, and Python collects them whenever its garbage collector runs (mid-command or at
    exit), each printing "Exception ignored in: <coroutine ...>" with the failure (its
    TensorStore spec, 60 lines) that jaxlm has already reported in one line."""
    if not inspect.iscoroutine(u.object):
        return False
    seen, error = set(), u.exc_value
    while error is not None and id(error) not in seen:  # the close: a GeneratorExit
        seen.add(id(error))
        if isinstance(error, GeneratorExit):
            return True
        error = error.__cause__ or error.__context__
    return False


# Operating-system errors a writer meets on a bad disk, by the text C++ libraries put in
# their messages (array_record: "write() failed: File too large").
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)


def disk_error(error: BaseException) -> OSError | None:
    """The operating-system error (disk full, permission, ...) behind a library's failure
    to write, if there is one: an OSError in the chain, TensorStore's
    "[os_error_code='28']", Rust's "(os error 28)", or a disk error's text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        code = re.search(r"os_error_code='(\d+)'|\(os error (\d+)\)", str(error))
        if code:
            number = int(code.group(1) or code.group(2))
            return OSError(number, os.strerror(number))
        for number in _DISK_ERRNOS:
            if os.strerror(number) in str(error):
                return OSError(number, os.strerror(number))
        error = error.__cause__ or error.__context__
    return None
