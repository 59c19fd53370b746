"""The byte tokenizer: UTF-8 bytes as tokens, no files."""

from __future__ import annotations

from collections.abc import Iterable

from jaxlm.data.tokenizers.base import Tokenizer
from jaxlm.errors import ConfigError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is EOS, 257 is PAD; "byte:bert"
    adds 258 [CLS], 259 [SEP] and 260 [MASK] (261 ids) for BERT.

    No training, no files, and every string round-trips, which is what a tiny
    research model on a synthetic corpus needs.
    """

    name = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def __init__(self, variant: str = ""):
        if variant not in ("", "bert"):
            raise ConfigError(f"config.data.tokenizer='byte:{variant}': expected 'byte' or "
                              "'byte:bert'")
        if variant == "bert":
            self.bert_ids = {"cls": 258, "sep": 259, "mask": 260}
            self.vocab_size = 261

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # int() accepts numpy / jax integer scalars as well as Python ints.
        data = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                data.append(i)
            elif i not in self.special_ids:
                raise ValueError(f"id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        # A model can emit byte sequences that are not valid UTF-8 (e.g. half of a
        # multi-byte character); show them as U+FFFD instead of failing an evaluation.
        return data.decode("utf-8", errors="replace")
