"""Ctrl-C in a `python -m jaxlm.*` command ends it at any moment, its first second included:
cli.run turns the KeyboardInterrupt into one line and exit 130.

Python's own handling raises KeyboardInterrupt in whatever the main thread runs when the
signal comes. Early in a command, that is an import, and it went wrong three ways (Ctrl-C
0.1-0.5 s after starting `python -m jaxlm.train` on the debug config, before this module):
- a traceback, when it came before cli.run;
- "ImportError: Encountered an error while initializing the extension": raised inside a C
  extension's initialisation (jaxlib's, numpy's), it is reported as a failed import;
- nothing at all, and the run trained to its last step: raised inside JAX's
  garbage-collector callback, Python prints "Exception ignored" and drops it.

`install` (from jaxlm/__init__.py, in a process started as `python -m jaxlm...` only: in a
notebook or a test suite, Ctrl-C stays the user's) replaces that handling:
- a Ctrl-C that comes during an import is held and raised once the import has finished;
- a KeyboardInterrupt that Python drops (a gc callback, a __del__) is raised again.
The command's restart (cli.py: huge-page malloc) blocks SIGINT across its exec, so a Ctrl-C
while the new interpreter starts waits for cli.run. Only the first interpreter's start,
before jaxlm is imported (tens of milliseconds), is left to Python. The training loop
installs its own handler while it steps (train/preemption.py: save at the next step, then
stop) and gives this one back after.
"""

from __future__ import annotations

import signal
import sys
import threading

_RETRY_S = 0.05  # how soon a held or dropped Ctrl-C is raised again
_held = False


def started_as_command() -> bool:
    """True in a process started as `python [options] -m jaxlm[.module] ...`."""
    argv = sys.orig_argv
    if "-m" not in argv[1:-1]:
        return False
    return argv[argv.index("-m", 1) + 1].split(".")[0] == "jaxlm"


def install() -> None:
    """Ctrl-C as described above, for this process. A process started with SIGINT ignored
    (a background job of a shell without job control) stays deaf to it."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    signal.signal(signal.SIGINT, _on_interrupt)
    dropped_before = sys.unraisablehook

    def dropped(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _again_soon()  # not from here: it would be raised in this hook, and dropped
        else:
            dropped_before(unraisable)
    sys.unraisablehook = dropped


def held() -> bool:
    """Whether a Ctrl-C has come and waits for an import to finish."""
    return _held


def _on_interrupt(signum, frame):
    global _held
    if _importing(frame):
        _held = True
        _again_soon()
        return
    _held = False
    raise KeyboardInterrupt


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _again_soon() -> None:
    """SIGINT again, to the main thread, in _RETRY_S (a real signal, not
    `_thread.interrupt_main`: that one does not wake a main thread that sleeps or waits).
    Its handler then is this one, or the training loop's if it has taken over meanwhile."""
    main = threading.main_thread().ident
    timer = threading.Timer(_RETRY_S, signal.pthread_kill, (main, signal.SIGINT))
    timer.daemon = True
    timer.start()
