"""Batches: this process's rows of each global batch, made ahead on a background thread.

Process p of P reads rows [p*B/P, (p+1)*B/P) of global batch s, i.e. examples
s*B + p*B/P + r of the source, so together the processes read each example exactly once.
Each example window goes through `make_example(window, global index, read)` (the
objective: inputs, targets, weights; `read` is the source's `example`, for objectives that
combine two examples, such as next-sentence prediction) and the rows are stacked into numpy arrays [B/P, L], which `place` turns into device arrays
(a global sharded jax.Array for jit, per-device slices for pmap).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import jax
import numpy as np

from jaxlm.errors import ConfigError


def local_batch(source, step: int, global_batch: int, vocab_size: int,
                make_example: Callable[..., dict], process_index: int = 0,
                process_count: int = 1, spec: dict | None = None) -> dict:
    """This process's rows of global batch `step`, as numpy arrays [B/P, ...]; checked
    against `spec` (the objective's batch_spec of the global batch) when given."""
    per_process = global_batch // process_count
    first = step * global_batch + process_index * per_process
    windows = [source.example(first + r) for r in range(per_process)]
    top = max(int(w["tokens"].max()) for w in windows)
    if top >= vocab_size:
        raise ConfigError(f"token id {top} in batch {step} is beyond "
                          f"config.model.vocab_size={vocab_size}")
    rows = [make_example(w, first + r, source.example) for r, w in enumerate(windows)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if spec is not None:
        got = {k: ((v.shape[0] * process_count,) + v.shape[1:], v.dtype) for k, v in batch.items()}
        want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in spec.items()}
        if got != want:
            raise RuntimeError(f"batch {step} does not match the objective's batch spec: "
                               f"{got} != {want}")
    return batch


class Batches:
    """Iterator of device batches from `start_step` on, prepared ahead on a background
    thread (`prefetch` batches) so that the Python data work overlaps the step."""

    def __init__(self, source, start_step: int, global_batch: int, vocab_size: int,
                 make_example: Callable[..., dict], place: Callable[[dict], dict],
                 prefetch: int = 2, spec: dict | None = None):
        self.step = start_step
        self._args = (source, global_batch, vocab_size, make_example, spec)
        self._place = place
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(start_step,), daemon=True)
        self._thread.start()

    def _fill(self, step: int):
        source, global_batch, vocab_size, make_example, spec = self._args
        while not self._stop.is_set():
            try:
                item = local_batch(source, step, global_batch, vocab_size, make_example,
                                   jax.process_index(), jax.process_count(), spec)
            except Exception as e:  # hand the error to the consumer instead of hanging it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            step += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        self.step += 1
        return self._place(item)

    def close(self):
        self._stop.set()
