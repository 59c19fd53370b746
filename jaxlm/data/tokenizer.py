"""Tokenizers: text <-> integer ids.

Only a byte-level tokenizer exists today. `Tokenizer` is the seam for the subword
tokenizers (SentencePiece, GPT-2 BPE) that come later: the trainer, the evaluator and
the checkpoint code talk to this interface only, and find tokenizers by name through
`get_tokenizer`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import Any


class Tokenizer(abc.ABC):
    """What the rest of jaxlm needs from a tokenizer.

    Subclasses set the four class attributes and implement `encode` / `decode`.
    """

    name: str  # Registry name, e.g. "byte"; `get_tokenizer(name)` rebuilds it.
    vocab_size: int  # Size of the model's embedding table, special ids included.
    eos_id: int  # End of document; also used as BOS / document separator.
    pad_id: int  # Fills batches; never a training target.

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to ids, without adding EOS/BOS (the data pipeline decides where)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special ids are dropped and malformed text is replaced, not raised."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, stored in checkpoints to check the tokenizer on restore.

        Two tokenizers that give equal dicts must encode every text the same way.
        """
        return {
                "name": self.name,
                "vocab_size": self.vocab_size,
                "eos_id": self.eos_id,
                "pad_id": self.pad_id,
        }


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is EOS, 257 is PAD.

    No training, no files, and every string round-trips, which is what a tiny
    research model on a synthetic corpus needs.
    """

    name = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # int() accepts numpy / jax integer scalars as well as Python ints.
        data = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                data.append(i)
            elif i not in (self.eos_id, self.pad_id):
                raise ValueError(f"id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        # A model can emit byte sequences that are not valid UTF-8 (e.g. half of a
        # multi-byte character); show them as U+FFFD instead of failing an evaluation.
        return data.decode("utf-8", errors="replace")


# Name -> constructor. Subword tokenizers register here when they exist.
_TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
        "byte": ByteTokenizer,
}


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer registered under `name` (see `Tokenizer.name`)."""
    try:
        factory = _TOKENIZERS[name]
    except KeyError:
        raise ValueError(
                f"unknown tokenizer {name!r}; known tokenizers: {sorted(_TOKENIZERS)}") from None
    return factory()
