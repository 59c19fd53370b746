"""Augmentation of small labelled sets (config.finetune.augment): word-level noise on the
token ids of each training text, nothing downloaded (EDA, Wei & Zou 2019, without its
synonym lists; span masking as SpanBERT, Joshi et al. 2020, chooses spans).

A text's words are read from its token ids (the tokenizer's `piece_texts`, the word view
whole-word masking uses): a word starts at a token whose text starts with whitespace,
unless the token before is whitespace only, so a word is its leading whitespace and a body
(" lives" in bytes is " " + "lives"; GPT-2's "Ġlives" and WordPiece's "lives" are bodies).

  delete  each word is deleted with probability p (one always stays; a new first word
          loses its leading whitespace);
  swap    each word, with probability p, trades its body with another word of the text
          (whitespace stays in place);
  insert  after each word, with probability p, a word of the training texts' own
          vocabulary (their words after the first, with their whitespace) is inserted;
  mask    a share p of the words, in spans of 1-10 words (geometric lengths, mean ~3.8,
          as SpanBERT), has every body token replaced by [MASK] (BERT's tokenizers only).

They run in that order on each text of an example, and on the second text of a pair
separately; the caller (jaxlm.data.labelled) then lays the parts out again, so [CLS],
[SEP], EOS, padding, token types and segments are placed as for any example, and cut,
longest part first, if insertions overflow config.data.seq_len. Every draw comes from
(seed, epoch, example, part, operation): example k of epoch e is augmented the same way
wherever and whenever it is read (resume is exact), differently in each epoch, and one
operation's draws do not depend on which other operations are on. Validation and
evaluation examples are never augmented.
"""

from __future__ import annotations

import json

import numpy as np

from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import ConfigError

_AUGMENT_STREAM = 5  # seed-sequence tag (labelled.py's epoch order is 4, LM sources 1 and 2)
OPERATIONS = ("delete", "swap", "insert", "mask")
_CHOOSE = len(OPERATIONS)  # the sub-stream that picks which examples are augmented
MAX_SPAN, SPAN_P = 10, 0.2  # SpanBERT: span lengths ~ Geometric(0.2) clipped to 10 words


def settings(cfg_augment) -> dict:
    """The augmentation config as plain values."""
    return {k: float(cfg_augment[k]) for k in (*OPERATIONS, "examples")}


def active(cfg_augment) -> bool:
    """Whether config.finetune.augment changes anything."""
    return cfg_augment.examples > 0 and any(cfg_augment[k] > 0 for k in OPERATIONS)


class Words:
    """The word view of a tokenizer's ids: which tokens start a word or are whitespace."""

    def __init__(self, tokenizer: Tokenizer):
        pieces = tokenizer.piece_texts()
        self.starts_space = np.asarray([p[:1].isspace() for p in pieces])
        self.all_space = np.asarray([p != "" and p.isspace() for p in pieces])

    def split(self, ids: np.ndarray) -> list[np.ndarray]:
        """The words of a text's ids (the pieces of `ids`, in order)."""
        ids = np.asarray(ids)
        if len(ids) == 0:
            return []
        start = self.starts_space[ids].copy()
        start[1:] &= ~self.all_space[ids[:-1]]
        start[0] = True
        return np.split(ids, np.flatnonzero(start)[1:])

    def lead(self, word: np.ndarray) -> int:
        """How many of the word's first tokens are whitespace."""
        space = self.all_space[word]
        return len(word) if space.all() else int(np.argmin(space))


def delete(words: list[np.ndarray], p: float, rng: np.random.Generator,
           view: Words) -> list[np.ndarray]:
    """Each word deleted with probability p; one always stays."""
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    out = [w for w, k in zip(words, keep) if k]
    if not keep[0]:  # the new first word: no leading whitespace
        out[0] = out[0][view.lead(out[0]):]
    return out


def swap(words: list[np.ndarray], p: float, rng: np.random.Generator,
         view: Words) -> list[np.ndarray]:
    """Each word, with probability p, trades bodies with another word of the text."""
    n = len(words)
    draw = rng.random(n)
    if n < 2:
        return words
    leads = [w[:view.lead(w)] for w in words]
    bodies = [w[view.lead(w):] for w in words]
    for i in np.flatnonzero(draw < p):
        j = int(rng.integers(n - 1))
        j += j >= i  # another word than i
        bodies[i], bodies[j] = bodies[j], bodies[i]
    return [np.concatenate([a, b]) for a, b in zip(leads, bodies)]


def insert(words: list[np.ndarray], p: float, rng: np.random.Generator,
           vocabulary: list[np.ndarray]) -> list[np.ndarray]:
    """After each word, with probability p, a word of `vocabulary`."""
    draw = rng.random(len(words))
    if not vocabulary:
        return words
    out = []
    for w, d in zip(words, draw):
        out.append(w)
        if d < p:
            out.append(vocabulary[int(rng.integers(len(vocabulary)))])
    return out


def mask(words: list[np.ndarray], p: float, rng: np.random.Generator, view: Words,
         mask_id: int) -> list[np.ndarray]:
    """A share p of the words (binomially drawn) masked in spans: every body token of a
    chosen word becomes `mask_id`; whitespace stays."""
    n = len(words)
    target = int(rng.binomial(n, p))
    chosen = np.zeros(n, bool)
    for _ in range(4 * n):  # spans overlap at times; this bounds the tries
        if chosen.sum() >= target:
            break
        length = min(int(rng.geometric(SPAN_P)), MAX_SPAN, n, target - int(chosen.sum()))
        start = int(rng.integers(n - length + 1))
        chosen[start:start + length] = True
    out = []
    for w, c in zip(words, chosen):
        if c:
            w = w.copy()
            w[view.lead(w):] = mask_id
        out.append(w)
    return out


class Augmenter:
    """config.finetune.augment for one training set: `__call__(parts, epoch, example)`
    gives the example's augmented token ids, or None where it stays as it is."""

    def __init__(self, cfg_augment, tokenizer: Tokenizer, seed: int,
                 texts: list[np.ndarray]):
        """`texts`: the training texts' token ids (every part), whose words after the
        first are the vocabulary insertions draw from."""
        self.rates, self.seed = settings(cfg_augment), seed
        self.view = Words(tokenizer)
        self.mask_id = tokenizer.bert_ids.get("mask")
        if self.rates["mask"] > 0 and self.mask_id is None:
            raise ConfigError(f"config.finetune.augment.mask={self.rates['mask']}: "
                              f"config.data.tokenizer={tokenizer.name!r} has no [MASK] token "
                              "(span masking is for BERT: byte:bert, wordpiece:DIR, a "
                              "SentencePiece model with <mask>)")
        seen, self.vocabulary = set(), []
        for ids in texts:
            for w in self.view.split(ids)[1:]:
                if w.tobytes() not in seen:
                    seen.add(w.tobytes())
                    self.vocabulary.append(w)
        if self.rates["insert"] > 0 and not self.vocabulary:
            raise ConfigError(f"config.finetune.augment.insert={self.rates['insert']}: the "
                              "training texts have no second word to draw insertions from")

    def fingerprint(self) -> str:
        """What decides the augmentation besides the data and seed (for the source's)."""
        return json.dumps(self.rates, sort_keys=True)

    def text(self, ids: np.ndarray, rng_for) -> np.ndarray:
        """One text's ids, augmented; `rng_for(op)`: the generator of each operation."""
        words = self.view.split(ids)
        if not words:
            return np.asarray(ids)
        r = self.rates
        if r["delete"]:
            words = delete(words, r["delete"], rng_for(0), self.view)
        if r["swap"]:
            words = swap(words, r["swap"], rng_for(1), self.view)
        if r["insert"]:
            words = insert(words, r["insert"], rng_for(2), self.vocabulary)
        if r["mask"]:
            words = mask(words, r["mask"], rng_for(3), self.view, self.mask_id)
        return np.concatenate(words).astype(np.asarray(ids).dtype)

    def __call__(self, parts, epoch: int, example: int):
        """`parts`: (text ids, pair ids or None) of example `example` read in `epoch`."""
        if not any(self.rates[k] for k in OPERATIONS) or self.rates["examples"] == 0:
            return None
        key = [self.seed, _AUGMENT_STREAM, epoch, example]
        if self.rates["examples"] < 1 and \
                np.random.default_rng(key + [_CHOOSE]).random() >= self.rates["examples"]:
            return None
        return tuple(None if ids is None else
                     self.text(ids, lambda op, part=part: np.random.default_rng(key + [part, op]))
                     for part, ids in enumerate(parts))
