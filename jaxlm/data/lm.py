"""Language-model batches: documents -> fixed-length token sequences -> sharded global batches.

A source gives random access to training sequences by a global index, so the data position
of a run is one integer (`next_sample`): batch `s` is sequences [s*B, (s+1)*B). Resuming a
run, or changing the number of hosts, continues with exactly the sequences the
uninterrupted run would have seen next.

Each sequence holds seq_len + 1 tokens: `EOS doc EOS doc ...`, the last document cut where
the sequence ends (the corpus is unbounded, so a cut tail is not lost data: the next
sequence simply starts with fresh documents). inputs = tokens[:-1], targets = tokens[1:].
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import jax
import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import synthetic
from jaxlm.data.tokenizer import Tokenizer

# Document slots reserved per sequence: sequence i uses documents i*DOCS_PER_SEQUENCE + j.
DOCS_PER_SEQUENCE = 1 << 16


class SyntheticSource:
    """Training sequences of the built-in synthetic corpus (see data/synthetic.py)."""

    def __init__(self, corpus: synthetic.SyntheticCorpus, tokenizer: Tokenizer, seq_len: int):
        self.corpus, self.tokenizer, self.seq_len = corpus, tokenizer, seq_len

    def sequence(self, index: int) -> np.ndarray:
        tokens: list[int] = []
        j = 0
        while len(tokens) < self.seq_len + 1:
            if j == DOCS_PER_SEQUENCE:
                raise RuntimeError("synthetic documents are unexpectedly empty")
            doc = self.corpus.document(index * DOCS_PER_SEQUENCE + j)
            tokens += [self.tokenizer.eos_id] + self.tokenizer.encode(doc)
            j += 1
        return np.asarray(tokens[:self.seq_len + 1], np.int32)


def make_source(cfg_data, tokenizer: Tokenizer):
    if cfg_data.name == "synthetic":
        return SyntheticSource(synthetic.SyntheticCorpus(synthetic.World(cfg_data.seed)),
                               tokenizer, cfg_data.seq_len)
    raise ConfigError(f"config.data.name={cfg_data.name!r}: unknown dataset (known: synthetic)")


def local_batch(source, step: int, global_batch: int, vocab_size: int,
                process_index: int = 0, process_count: int = 1) -> dict:
    """This process's rows of global batch `step`, as numpy arrays.

    Process p reads rows [p*B/P, (p+1)*B/P) of the global batch, so together the
    processes read each sequence exactly once.
    """
    per_process = global_batch // process_count
    first = step * global_batch + process_index * per_process
    tokens = np.stack([source.sequence(first + r) for r in range(per_process)])
    if tokens.max() >= vocab_size:
        raise ConfigError(f"token id {int(tokens.max())} in batch {step} is beyond "
                          f"config.model.vocab_size={vocab_size}")
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones(tokens[:, 1:].shape, np.float32)}


class Batches:
    """Iterator of device batches from `start_step` on, prepared ahead on a background
    thread (`prefetch` batches) so that the Python data work overlaps the step.

    `place` turns this process's numpy rows into device arrays (a global sharded
    jax.Array for jit, per-device shards for pmap).
    """

    def __init__(self, source, start_step: int, global_batch: int, vocab_size: int,
                 place: Callable[[dict], dict], prefetch: int = 2):
        self.step = start_step
        self._args = (source, global_batch, vocab_size)
        self._place = place
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(start_step,), daemon=True)
        self._thread.start()

    def _fill(self, step: int):
        source, global_batch, vocab_size = self._args
        while not self._stop.is_set():
            try:
                item = local_batch(source, step, global_batch, vocab_size,
                                   jax.process_index(), jax.process_count())
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
