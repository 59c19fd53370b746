"""Telling a hung multi-host job apart from a slow one.

A collective or a checkpoint barrier waits for every process; when one host dies or
stalls, the others wait forever without a word. `Watchdog.watch(what)` wraps such an
operation: while it runs, one background thread logs a heartbeat line every
`heartbeat_seconds` ("still <what> after 120 s"), and if it runs past `timeout_seconds`
the thread prints every Python thread's stack and ends the process with exit code 3
(HUNG_EXIT_CODE), so the scheduler sees a failure instead of an idle pod.

Ending the process is safe for checkpoints: Orbax writes into a temporary directory and
renames it only when complete, so a save cut short leaves the previous ones intact.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time

import jax

log = logging.getLogger("jaxlm")

HUNG_EXIT_CODE = 3


class Watchdog:
    def __init__(self, heartbeat_seconds: float, timeout_seconds: float):
        self.heartbeat_seconds = heartbeat_seconds
        self.timeout_seconds = timeout_seconds
        self._lock = threading.Condition()
        self._current: tuple[str, float] | None = None  # (what, start time)
        self._thread = threading.Thread(target=self._monitor, daemon=True, name="watchdog")
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, what: str):
        """Heartbeats and a deadline for the enclosed block (not re-entrant)."""
        with self._lock:
            self._current = (what, time.monotonic())
            self._lock.notify()
        try:
            yield
        finally:
            with self._lock:
                self._current = None
                self._lock.notify()

    def _monitor(self):
        with self._lock:
            while True:
                if self._current is None:
                    self._lock.wait()
                    continue
                what, start = self._current
                next_beat = start + self.heartbeat_seconds
                while self._current is not None and self._current[1] == start:
                    now = time.monotonic()
                    deadline = start + self.timeout_seconds
                    if now >= deadline:
                        self._hung(what, now - start)
                    if now >= next_beat:
                        log.info("still %s after %.0f s (process %d of %d)", what, now - start,
                                 jax.process_index(), jax.process_count())
                        next_beat += self.heartbeat_seconds
                    self._lock.wait(timeout=min(next_beat, deadline) - now)

    def _hung(self, what: str, elapsed: float):
        log.error("%s did not finish in %.0f s (config.checkpoint.timeout_seconds): treating "
                  "the job as hung (process %d of %d). A process that died or stalled makes "
                  "the others wait at the next collective or barrier. Python stacks follow.",
                  what, elapsed, jax.process_index(), jax.process_count())
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(HUNG_EXIT_CODE)
