"""Preemption: SIGTERM means "save at the next step boundary, then exit 0".

Cloud schedulers (TPU VM maintenance, SLURM `--signal`, Kubernetes) send SIGTERM some
time before they kill a job. The loop asks `reached(step)` after every step; when it
says True, the loop saves a checkpoint of that step and stops.

Several processes must stop at the same step, or the ones still stepping would wait
forever in a collective. With more than one process, JAX's preemption service (started
by `jax.distributed.initialize`) catches SIGTERM on any host, agrees on a step through
the coordination service, and `multihost_utils.reached_preemption_sync_point` turns True
on every host at that same step. A single process just catches the signal itself.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    def __init__(self):
        self._requested = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._requested.set())

    def reached(self, step: int) -> bool:
        """True at the step where this process (all processes) should save and stop.
        Called by every process at every step."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
