"""The interface every tokenizer implements (see jaxlm.data.tokenizers for the kinds)."""

from __future__ import annotations

import abc
import hashlib
import pathlib
from collections.abc import Iterable
from typing import Any


class Tokenizer(abc.ABC):
    """What the rest of jaxlm needs from a tokenizer.

    Subclasses set the four attributes and implement `encode` / `decode`.
    """

    name: str  # Registry name, e.g. "byte"; see `get_tokenizer`.
    vocab_size: int  # Size of the model's embedding table, special ids included.
    eos_id: int  # End of document; also used as BOS / document separator.
    pad_id: int  # Fills batches; never a training target (its weight is 0).
    # BERT's special tokens, {"cls": id, "sep": id, "mask": id}; empty if the tokenizer has
    # none (a BERT config refuses such a tokenizer).
    bert_ids: dict[str, int] = {}

    @property
    def special_ids(self) -> set[int]:
        """Ids that are not text: never masked, never a random replacement."""
        return {self.eos_id, self.pad_id, *self.bert_ids.values()}

    def piece_texts(self) -> list[str]:
        """The text of every id on its own (specials: ""), computed once; what whole-word
        masking reads word boundaries from."""
        if getattr(self, "_pieces", None) is None:
            special = self.special_ids
            self._pieces = [("" if i in special else self._piece(i)) for i in range(self.vocab_size)]
        return self._pieces

    def _piece(self, i: int) -> str:
        return self.decode([i])

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to ids, without adding EOS/BOS (the data pipeline decides where)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special ids are dropped and malformed text is replaced, not raised."""

    @staticmethod
    def _check_text(text) -> None:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        """`ids` as Python ints (numpy / jax scalars accepted), all inside the vocabulary."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, stored in checkpoints to check the tokenizer on restore.

        Two tokenizers that give equal dicts must encode every text the same way.
        """
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "pad_id": self.pad_id}


def sha256_of(*paths: pathlib.Path) -> str:
    """One digest of the files' contents (a file tokenizer's identity, path-free)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()
