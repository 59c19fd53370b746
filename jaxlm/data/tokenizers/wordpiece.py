"""BERT's WordPiece from a local `vocab.txt`, run by Hugging Face's `tokenizers` library.

Lower-casing (and accent stripping with it) follows the folder's tokenizer_config.json
(`do_lower_case`, default true as for bert-base-uncased). BERT has no end-of-document
token: documents are separated by [SEP] (eos_id), batches padded with [PAD].
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

from jaxlm.data.tokenizers.base import Tokenizer, sha256_of
from jaxlm.errors import ConfigError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPieceTokenizer(Tokenizer):
    name = "wordpiece"

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import decoders, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import WordPiece

        d = pathlib.Path(directory)
        vocab = d / "vocab.txt"
        if not vocab.is_file():
            raise ConfigError(f"config.data.tokenizer: {d} holds no vocab.txt (BERT WordPiece); "
                              "copy it there (nothing is downloaded)")
        settings = d / "tokenizer_config.json"
        self.lowercase = bool(json.loads(settings.read_text()).get("do_lower_case", True)
                              if settings.is_file() else True)
        pieces = vocab.read_text("utf-8").split("\n")
        missing = [s for s in SPECIALS if s not in pieces]
        if missing:
            raise ConfigError(f"{vocab}: no {', '.join(missing)} token; not a BERT vocabulary")
        # BERT's pipeline: clean and (optionally) lower-case + strip accents, split on
        # whitespace and punctuation, then greedy longest-match WordPiece.
        self.encoding = HFTokenizer(WordPiece.from_file(str(vocab), unk_token="[UNK]"))
        self.encoding.normalizer = normalizers.BertNormalizer(lowercase=self.lowercase)
        self.encoding.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.encoding.decoder = decoders.WordPiece(prefix="##")
        self.vocab_size = self.encoding.get_vocab_size()
        ids = {s: self.encoding.token_to_id(s) for s in SPECIALS}
        self.pad_id, self.eos_id = ids["[PAD]"], ids["[SEP]"]
        self.bert_ids = {"cls": ids["[CLS]"], "sep": ids["[SEP]"], "mask": ids["[MASK]"]}
        self.sha256 = sha256_of(vocab)

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        return self.encoding.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(self._checked_ids(ids), skip_special_tokens=True)

    def _piece(self, i: int) -> str:
        """Word-boundary view for whole-word masking: a continuation piece (##x) joins the
        word before it; any other piece starts a word."""
        piece = self.encoding.id_to_token(i) or ""
        return piece[2:] if piece.startswith("##") else " " + piece

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "sha256": self.sha256, "lowercase": self.lowercase}
