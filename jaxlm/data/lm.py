"""Language-model batches: documents -> fixed-length examples -> sharded global batches.

A source gives random access to training examples by a global index, so the data position
of a run is one integer (`next_sample`): batch `s` is examples [s*B, (s+1)*B). Resuming a
run, or changing the number of hosts or devices, continues with exactly the examples the
uninterrupted run would have seen next; nothing else needs saving.

An example is a dict of [L] arrays: inputs, targets (inputs shifted by one), weights (1 for
a trained target, 0 for padding) and, with packing, positions and segments. Every source
has `example(i)`, `stats()` (what the data holds, for the run log) and `fingerprint()`
(a short hash of everything that decides example i: dataset contents, tokenizer, seq_len,
packing, seed, mixture), which a checkpoint can store to refuse resuming on other data.

Sources (config.data.name):
  "synthetic"   the built-in corpus: `EOS doc EOS doc ...` cut after L + 1 tokens (the
                corpus is unbounded, so a cut tail is not lost data).
  a TFDS name   a prepared TFDS text split, tokenized once into a token cache
                (jaxlm.data.token_cache): the stream `EOS doc_0 EOS doc_1 ... EOS`.
                Token pair i is (stream[i] -> stream[i+1]); examples are windows of pairs:
                packing=False: window j = pairs [j*L, (j+1)*L); documents run across window
                  edges and attention sees the previous documents (GPT-2 style). Within a
                  document the last token predicts EOS and EOS predicts the next
                  document's first token; all weights are 1. The last (pairs mod L) pairs
                  of the stream are not used (counted: `unused_pairs_per_epoch`).
                packing=True: each window holds whole documents (a document's pairs run
                  from its leading EOS to its last token, whose target is the closing EOS),
                  filled greedily in stream order and padded to L. Each document is one
                  segment with positions from 0, so attention never crosses a document: the
                  model sees each document exactly as if it were alone. A document longer
                  than L is cut into pieces of L pairs, each its own segment from position
                  0 (counted: `long_documents`). Padding: pad_id, weight 0, segment 0.
                Window order: epoch e = a permutation of all windows seeded by
                (config.data.seed, e), so example i is window perm_e[i mod W], e = i // W.
  "mixture"     config.data.mixture, e.g. ("tiny_shakespeare=0.2", "my_corpus=0.8"):
                each block of config.data.mixture_block examples holds exactly
                round(weight * block) examples of each dataset (largest remainders), in an
                order permuted by (seed, block); example i -> (dataset d, d's example n) in
                O(1). Datasets share split, text_key, data_dir, packing.
"""

from __future__ import annotations

import collections
import hashlib
import json
import queue
import threading
from collections.abc import Callable

import jax
import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import synthetic, token_cache
from jaxlm.data.tokenizer import Tokenizer

# Document slots reserved per sequence: sequence i uses documents i*DOCS_PER_SEQUENCE + j.
DOCS_PER_SEQUENCE = 1 << 16

# Seed-sequence tags: window permutations and mixture blocks draw independent streams.
_EPOCH_STREAM, _MIXTURE_STREAM = 1, 2


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


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

    def example(self, index: int) -> dict:
        tokens = self.sequence(index)
        return {"inputs": tokens[:-1], "targets": tokens[1:],
                "weights": np.ones(self.seq_len, np.float32)}

    def stats(self) -> dict:
        return {"name": "synthetic", "documents": "unbounded", "sequences_per_epoch": None}

    def fingerprint(self) -> str:
        return _digest("synthetic", self.corpus.world.seed, self.seq_len, self.tokenizer.to_dict())


class _LastUsed:
    """A tiny cache of the most recent `size` values of an expensive function of an int."""

    def __init__(self, fn: Callable[[int], object], size: int = 2):
        self.fn, self.size = fn, size
        self.items: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, key: int):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = self.fn(key)
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


def pack_windows(doc_starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Window boundaries (pair indices, [W + 1]) of greedy next-fit packing in stream order,
    and the number of documents longer than seq_len (cut into pieces of seq_len pairs).

    Every window ends where a document (or a piece) ends, so the windows partition the pairs
    and window w is the contiguous pair range [bounds[w], bounds[w+1]).
    """
    lengths = np.diff(doc_starts)  # pairs per document (tokens + 1)
    bounds, fill, start = [0], 0, 0
    for n in lengths.tolist():
        while n > 0:
            piece = min(n, seq_len)
            if fill + piece > seq_len:  # close the current window
                bounds.append(start)
                fill = 0
            fill += piece
            start += piece
            n -= piece
    bounds.append(start)
    return np.asarray(bounds, np.int64), int(np.sum(lengths > seq_len))


class TokenSource:
    """Examples of one tokenized split (see the module docstring for both layouts)."""

    def __init__(self, cache: token_cache.TokenCache, tokenizer: Tokenizer, seq_len: int,
                 packing: bool, seed: int, name: str = ""):
        self.cache, self.seq_len, self.packing, self.seed = cache, seq_len, packing, seed
        self.name = name or cache.meta["dataset"]
        self.pad_id = tokenizer.pad_id
        pairs = len(cache.tokens) - 1
        if packing:
            self.bounds, self.long_documents = pack_windows(cache.doc_starts, seq_len)
        else:
            self.bounds = np.arange(pairs // seq_len + 1, dtype=np.int64) * seq_len
            self.long_documents = int(np.sum(np.diff(cache.doc_starts) > seq_len))
        self.num_windows = len(self.bounds) - 1
        if self.num_windows == 0:
            raise ConfigError(f"config.data.name={self.name!r}: its {pairs} tokens do not fill "
                              f"one sequence of config.data.seq_len={seq_len}")
        # The current epoch's order is held in memory: 4 bytes per window (0.4 GB for
        # 100M windows, i.e. 100B tokens at L = 1024).
        index_dtype = np.int32 if self.num_windows < 2**31 else np.int64
        self._perm = _LastUsed(lambda e: np.random.default_rng(
            [seed, _EPOCH_STREAM, e]).permutation(self.num_windows).astype(index_dtype))

    def window(self, index: int) -> int:
        epoch, j = divmod(index, self.num_windows)
        return int(self._perm(epoch)[j])

    def example(self, index: int) -> dict:
        w = self.window(index)
        a, b = int(self.bounds[w]), int(self.bounds[w + 1])
        tokens = np.asarray(self.cache.tokens[a:b + 1], np.int32)
        if not self.packing:
            return {"inputs": tokens[:-1], "targets": tokens[1:],
                    "weights": np.ones(self.seq_len, np.float32)}
        L, n = self.seq_len, b - a
        pairs = np.arange(a, b)
        doc = np.searchsorted(self.cache.doc_starts, pairs, side="right") - 1
        pos = (pairs - self.cache.doc_starts[doc]) % L  # 0 where a document or piece starts
        out = {"inputs": np.full(L, self.pad_id, np.int32),
               "targets": np.full(L, self.pad_id, np.int32),
               "weights": np.zeros(L, np.float32),
               "positions": np.zeros(L, np.int32), "segments": np.zeros(L, np.int32)}
        out["inputs"][:n], out["targets"][:n] = tokens[:-1], tokens[1:]
        out["weights"][:n] = 1.0
        out["positions"][:n] = pos
        out["segments"][:n] = np.cumsum(pos == 0)
        return out

    def stats(self) -> dict:
        m, pairs = self.cache.meta, len(self.cache.tokens) - 1
        used = int(self.bounds[-1])
        return {"name": self.name, "split": m["split"], "documents": m["documents"],
                "empty_documents": m["empty_documents"], "tokens": m["tokens"],
                "packing": self.packing, "sequences_per_epoch": self.num_windows,
                "long_documents": self.long_documents,
                "unused_pairs_per_epoch": pairs - used,
                "padding_fraction": round(1 - used / (self.num_windows * self.seq_len), 4),
                "cache": str(self.cache.path)}

    def fingerprint(self) -> str:
        return _digest(self.cache.path.name, self.seq_len, self.packing, self.seed)


def parse_mixture(entries) -> list[tuple[str, float]]:
    """("name=weight", ...) -> [(name, weight)], checked."""
    out = []
    for entry in entries:
        name, _, weight = entry.rpartition("=")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not name or not w > 0:
            raise ConfigError(f"config.data.mixture entry {entry!r}: expected NAME=WEIGHT "
                              "with a positive weight")
        out.append((name, w))
    if not out:
        raise ConfigError("config.data.name='mixture' needs config.data.mixture entries")
    return out


class MixtureSource:
    """Weighted mixture of sources, random access by global index (module docstring)."""

    def __init__(self, sources: list, weights: list[float], block: int, seed: int,
                 seq_len: int):
        self.sources, self.block, self.seed, self.seq_len = sources, block, seed, seq_len
        w = np.asarray(weights, np.float64) / np.sum(weights)
        exact = w * block
        counts = np.floor(exact).astype(np.int64)
        extra = np.argsort(-(exact - counts), kind="stable")[:block - counts.sum()]
        counts[extra] += 1
        if np.any(counts == 0):
            raise ConfigError(f"config.data.mixture weights {weights} give some dataset no "
                              f"example in a block of config.data.mixture_block={block}; "
                              "raise the block or the weight")
        self.counts = counts
        self.keys = set().union(*(s.example(0).keys() for s in sources))
        self._block = _LastUsed(self._make_block)

    def _make_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each slot, rank of the slot among that dataset's slots)."""
        order = np.random.default_rng([self.seed, _MIXTURE_STREAM, b]).permutation(self.block)
        dataset = np.repeat(np.arange(len(self.counts)), self.counts)[order]
        rank = np.empty(self.block, np.int64)
        for d in range(len(self.counts)):
            slots = np.flatnonzero(dataset == d)
            rank[slots] = np.arange(len(slots))
        return dataset, rank

    def locate(self, index: int) -> tuple[int, int]:
        """Global example index -> (dataset, that dataset's own example index)."""
        b, slot = divmod(index, self.block)
        dataset, rank = self._block(b)
        d = int(dataset[slot])
        return d, b * int(self.counts[d]) + int(rank[slot])

    def example(self, index: int) -> dict:
        d, n = self.locate(index)
        ex = self.sources[d].example(n)
        if "segments" in self.keys and "segments" not in ex:  # an unpacked source in a packed mix
            ex = {**ex, "positions": np.arange(self.seq_len, dtype=np.int32),
                  "segments": np.ones(self.seq_len, np.int32)}
        return ex

    def fingerprint(self) -> str:
        return _digest([s.fingerprint() for s in self.sources], self.counts.tolist(), self.seed)

    def stats(self) -> dict:
        return {"name": "mixture", "block": self.block,
                "components": [{**s.stats(), "per_block": int(c)}
                               for s, c in zip(self.sources, self.counts)]}


def _single_source(name: str, cfg_data, tokenizer: Tokenizer):
    if name == "synthetic":
        return SyntheticSource(synthetic.SyntheticCorpus(synthetic.World(cfg_data.seed)),
                               tokenizer, cfg_data.seq_len)
    split = token_cache.open_tfds(name, cfg_data.split, cfg_data.data_dir, cfg_data.text_key,
                                  cfg_data.manual_dir)
    cache = token_cache.load_or_build(
        split, tokenizer, token_cache.cache_root(cfg_data.cache_dir, cfg_data.data_dir))
    return TokenSource(cache, tokenizer, cfg_data.seq_len, cfg_data.packing, cfg_data.seed, name)


def make_source(cfg_data, tokenizer: Tokenizer):
    """The example source config.data describes (see the module docstring)."""
    if cfg_data.name == "mixture":
        parts = parse_mixture(cfg_data.mixture)
        return MixtureSource([_single_source(n, cfg_data, tokenizer) for n, _ in parts],
                             [w for _, w in parts], cfg_data.mixture_block, cfg_data.seed,
                             cfg_data.seq_len)
    return _single_source(cfg_data.name, cfg_data, tokenizer)


def describe(source, first_sample: int, end_sample: int) -> str:
    """One log line: what the dataset holds and how much of it samples [first, end) read."""
    stats = source.stats()
    parts = stats.get("components", [stats])
    lines = []
    for s in parts:
        per_epoch = s["sequences_per_epoch"]
        share = s.get("per_block", 1) / stats.get("block", 1)
        if per_epoch:
            epochs = (end_sample - first_sample) * share / per_epoch
            lines.append(f"{s['name']}/{s['split']}: {s['documents']:,} documents "
                         f"({s['empty_documents']} empty, skipped; {s['long_documents']} longer "
                         f"than a sequence), {s['tokens']:,} tokens, {per_epoch:,} sequences per "
                         f"epoch (packing={s['packing']}, padding {s['padding_fraction']:.1%}, "
                         f"{s['unused_pairs_per_epoch']} tokens unused per epoch); this run: "
                         f"{epochs:.2f} epochs")
        else:
            lines.append(f"{s['name']}: {s['documents']} documents")
    head = f"samples {first_sample:,}..{end_sample:,}"
    if "components" in stats:
        head += f", mixture of {len(parts)} in blocks of {stats['block']}"
    return head + ": " + "; ".join(lines)


def local_batch(source, step: int, global_batch: int, vocab_size: int,
                process_index: int = 0, process_count: int = 1) -> dict:
    """This process's rows of global batch `step`, as numpy arrays [B/P, L].

    Process p reads rows [p*B/P, (p+1)*B/P) of the global batch, so together the
    processes read each example exactly once.
    """
    per_process = global_batch // process_count
    first = step * global_batch + process_index * per_process
    rows = [source.example(first + r) for r in range(per_process)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    top = max(int(batch["inputs"].max()), int(batch["targets"].max()))
    if top >= vocab_size:
        raise ConfigError(f"token id {top} in batch {step} is beyond "
                          f"config.model.vocab_size={vocab_size}")
    return batch


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
