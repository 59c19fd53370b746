"""Stopping cleanly: SIGTERM (preemption) and Ctrl-C mean "save at the next step boundary,
then stop".

Cloud schedulers (TPU VM maintenance, SLURM `--signal`, Kubernetes) send SIGTERM some
time before they kill a job; a person presses Ctrl-C. The loop asks `reached(step)` after
every step; when it names a reason, the loop saves a checkpoint of that step and stops:
exit 0 after SIGTERM, exit 130 after Ctrl-C. A second Ctrl-C does not wait: it raises
KeyboardInterrupt at once (exit 130, no save; the previous checkpoints are intact).

Several processes must stop at the same step, or the ones still stepping would wait
forever in a collective. With more than one process, JAX's preemption service (started
by `jax.distributed.initialize`) catches SIGTERM on any host, agrees on a step through
the coordination service, and `multihost_utils.reached_preemption_sync_point` turns True
on every host at that same step. Ctrl-C then keeps Python's default (KeyboardInterrupt).
A signal the process was started with ignored stays ignored.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    def __init__(self):
        self._reason: str | None = None
        self._previous: dict = {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig, handler in ((signal.SIGTERM, self._on_term), (signal.SIGINT, self._on_interrupt)):
                # ignored at start (SIGINT in a shell script's background job): kept so
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, handler)

    def _on_term(self, *_):
        self._reason = self._reason or "SIGTERM"

    def _on_interrupt(self, *_):
        self._reason = "Ctrl-C"
        before = self._previous[signal.SIGINT]  # a command's (jaxlm.interrupt) or Python's
        # The next one stops at once.
        signal.signal(signal.SIGINT, before if callable(before) else signal.default_int_handler)

    def reached(self, step: int) -> str | None:
        """Why this process (all processes) should save and stop at `step`, or None.
        Called by every process at every step."""
        if jax.process_count() > 1:
            return "SIGTERM" if multihost_utils.reached_preemption_sync_point(step) else None
        return self._reason

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
