"""Data sources: random access to training examples by one global index.

The data position of a run is one integer (`next_sample`): batch `s` is examples
[s*B, (s+1)*B). Resuming a run, or changing the number of hosts or devices, continues with
exactly the examples the uninterrupted run would have seen next; nothing else is saved.

An example is a window of token ids, `tokens` of length L + `extra_tokens` (the objective
decides: next-token prediction needs one token more than it has inputs, see
jaxlm.train.objectives), plus, for packed data, `segments` (document ids from 1, 0 =
padding) and `positions` of the first L tokens. Every source has `example(i)`, `stats()`
(what the data holds, for the run log) and `fingerprint()` (a short hash of everything
that decides example i: dataset contents, tokenizer, seq_len, packing, seed, mixture),
which a checkpoint stores to refuse resuming on other data.

Sources (config.data.name):
  "synthetic"   the built-in corpus (jaxlm.data.synthetic): `EOS doc EOS doc ...` cut
                after L + extra tokens (the corpus is unbounded, so a cut tail is not lost).
  a TFDS name   a prepared TFDS text split, tokenized once into a token cache
                (jaxlm.data.token_cache): the stream `EOS doc_0 EOS doc_1 ... EOS`.
                packing=False: window j starts at token j*L (documents run across window
                  edges and attention sees the previous documents, GPT-2 style); the last
                  tokens of the stream that do not fill a window are not used (counted:
                  `unused_tokens_per_epoch`).
                packing=True: each window holds whole documents (jaxlm.data.packing), each
                  a segment with positions from 0, so the model sees each document exactly
                  as if it were alone; padding is pad_id with segment 0. With extra_tokens=1
                  the token after the window (the next document's leading EOS) is the last
                  document's final target.
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
import threading
from collections.abc import Callable

import numpy as np

from jaxlm.data import packing, synthetic, tfds_split, token_cache
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import ConfigError

# Document slots reserved per sequence: sequence i uses documents i*DOCS_PER_SEQUENCE + j.
DOCS_PER_SEQUENCE = 1 << 16

# Seed-sequence tags: window permutations and mixture blocks draw independent streams.
_EPOCH_STREAM, _MIXTURE_STREAM = 1, 2


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class SyntheticSource:
    """Training windows of the built-in synthetic corpus (see data/synthetic.py)."""

    def __init__(self, corpus: synthetic.SyntheticCorpus, tokenizer: Tokenizer, seq_len: int,
                 extra_tokens: int = 1):
        self.corpus, self.tokenizer, self.seq_len = corpus, tokenizer, seq_len
        self.extra_tokens = extra_tokens

    def example(self, index: int) -> dict:
        size = self.seq_len + self.extra_tokens
        tokens: list[int] = []
        j = 0
        while len(tokens) < size:
            if j == DOCS_PER_SEQUENCE:
                raise RuntimeError("synthetic documents are unexpectedly empty")
            doc = self.corpus.document(index * DOCS_PER_SEQUENCE + j)
            tokens += [self.tokenizer.eos_id] + self.tokenizer.encode(doc)
            j += 1
        return {"tokens": np.asarray(tokens[:size], np.int32)}

    def stats(self) -> dict:
        return {"name": "synthetic", "documents": "unbounded", "sequences_per_epoch": None}

    def fingerprint(self) -> str:
        parts = ["synthetic", self.corpus.world.seed, self.seq_len, self.tokenizer.to_dict()]
        return _digest(*parts, *_layout(self.extra_tokens))


def _layout(extra_tokens: int) -> list:
    """Fingerprint part for the window layout; empty for next-token windows (extra = 1),
    so that fingerprints stored before the layout was a parameter stay valid."""
    return [] if extra_tokens == 1 else [f"extra_tokens={extra_tokens}"]


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


class TokenSource:
    """Windows of one tokenized split (see the module docstring for both layouts)."""

    def __init__(self, cache: token_cache.TokenCache, tokenizer: Tokenizer, seq_len: int,
                 packed: bool, seed: int, name: str = "", extra_tokens: int = 1):
        self.cache, self.seq_len, self.packing, self.seed = cache, seq_len, packed, seed
        self.extra_tokens = extra_tokens
        self.name = name or cache.meta["dataset"]
        self.pad_id = tokenizer.pad_id
        usable = len(cache.tokens) - extra_tokens  # window starts must leave room for the extra
        if packed:
            self.bounds, self.long_documents = packing.pack_windows(cache.doc_starts, seq_len)
        else:
            self.bounds = np.arange(usable // seq_len + 1, dtype=np.int64) * seq_len
            self.long_documents = int(np.sum(np.diff(cache.doc_starts) > seq_len))
        self.unused_tokens = usable - int(self.bounds[-1])
        self.num_windows = len(self.bounds) - 1
        if self.num_windows == 0:
            raise ConfigError(f"config.data.name={self.name!r}: its {usable} tokens do not fill "
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
        tokens = np.asarray(self.cache.tokens[a:b + self.extra_tokens], np.int32)
        if not self.packing:
            return {"tokens": tokens}
        L, n = self.seq_len, b - a
        out = {"tokens": np.full(L + self.extra_tokens, self.pad_id, np.int32),
               "segments": np.zeros(L, np.int32), "positions": np.zeros(L, np.int32)}
        out["tokens"][:len(tokens)] = tokens
        out["segments"][:n], out["positions"][:n] = packing.segments_and_positions(
            a, b, self.cache.doc_starts, L)
        return out

    def stats(self) -> dict:
        m = self.cache.meta
        return {"name": self.name, "split": m["split"], "documents": m["documents"],
                "empty_documents": m["empty_documents"], "tokens": m["tokens"],
                "packing": self.packing, "sequences_per_epoch": self.num_windows,
                "long_documents": self.long_documents,
                "unused_tokens_per_epoch": self.unused_tokens,
                "padding_fraction": round(1 - int(self.bounds[-1]) / (self.num_windows * self.seq_len), 4),
                "cache": str(self.cache.path)}

    def fingerprint(self) -> str:
        return _digest(self.cache.path.name, self.seq_len, self.packing, self.seed,
                       *_layout(self.extra_tokens))


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

    def __init__(self, sources: list, weights: list[float], block: int, seed: int):
        self.sources, self.block, self.seed = sources, block, seed
        self.seq_len = sources[0].seq_len
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
        return self.sources[d].example(n)

    def fingerprint(self) -> str:
        return _digest([s.fingerprint() for s in self.sources], self.counts.tolist(), self.seed)

    def stats(self) -> dict:
        return {"name": "mixture", "block": self.block,
                "components": [{**s.stats(), "per_block": int(c)}
                               for s, c in zip(self.sources, self.counts)]}


def _single_source(name: str, cfg_data, tokenizer: Tokenizer, extra_tokens: int):
    if name == "synthetic":
        return SyntheticSource(synthetic.SyntheticCorpus(synthetic.World(cfg_data.seed)),
                               tokenizer, cfg_data.seq_len, extra_tokens)
    split = tfds_split.open_split(name, cfg_data.split, cfg_data.data_dir, cfg_data.text_key,
                                  cfg_data.manual_dir)
    cache = token_cache.load_or_build(
        split, tokenizer, token_cache.cache_root(cfg_data.cache_dir, cfg_data.data_dir))
    return TokenSource(cache, tokenizer, cfg_data.seq_len, cfg_data.packing, cfg_data.seed,
                       name, extra_tokens)


def make_source(cfg_data, tokenizer: Tokenizer, extra_tokens: int = 1):
    """The example source config.data describes (see the module docstring); windows hold
    seq_len + extra_tokens tokens (the objective's `extra_tokens`)."""
    if cfg_data.name == "mixture":
        parts = parse_mixture(cfg_data.mixture)
        return MixtureSource([_single_source(n, cfg_data, tokenizer, extra_tokens) for n, _ in parts],
                             [w for _, w in parts], cfg_data.mixture_block, cfg_data.seed)
    return _single_source(cfg_data.name, cfg_data, tokenizer, extra_tokens)


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
                         f"{s['unused_tokens_per_epoch']} tokens unused per epoch); this run: "
                         f"{epochs:.2f} epochs")
        else:
            lines.append(f"{s['name']}: {s['documents']} documents")
    head = f"samples {first_sample:,}..{end_sample:,}"
    if "components" in stats:
        head += f", mixture of {len(parts)} in blocks of {stats['block']}"
    return head + ": " + "; ".join(lines)
