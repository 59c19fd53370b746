"""Tokenizers: text <-> integer ids, chosen by `config.data.tokenizer`.

    "byte"                  UTF-8 bytes (258 ids); no files, the default (byte.py);
                            "byte:bert" adds [CLS], [SEP], [MASK] (261 ids).
    "sentencepiece:PATH"    a SentencePiece model file, e.g. one trained by
                            `python -m jaxlm.data.tokenizers train` (spm.py).
    "gpt2:DIR"              GPT-2's byte-level BPE (50257 ids) from local vocabulary files:
                            DIR holds encoder.json + vocab.bpe (OpenAI's names) or
                            vocab.json + merges.txt (Hugging Face's); nothing is downloaded
                            (gpt2.py).
    "wordpiece:DIR"         BERT's WordPiece from DIR/vocab.txt (lower-casing as DIR/
                            tokenizer_config.json says; wordpiece.py).

The trainer, the evaluator and the checkpoint code talk to the `Tokenizer` interface only.
`to_dict()` identifies a tokenizer exactly (file tokenizers include the sha256 of their
files, not their path): it is stored in every checkpoint and compared on restore.
"""

from __future__ import annotations

from jaxlm.data.tokenizers.base import Tokenizer, sha256_of
from jaxlm.data.tokenizers.byte import ByteTokenizer
from jaxlm.data.tokenizers.gpt2 import GPT2Tokenizer
from jaxlm.data.tokenizers.spm import SentencePieceTokenizer
from jaxlm.data.tokenizers.wordpiece import WordPieceTokenizer
from jaxlm.errors import ConfigError

__all__ = ["Tokenizer", "ByteTokenizer", "SentencePieceTokenizer", "GPT2Tokenizer",
           "WordPieceTokenizer", "get_tokenizer", "sha256_of"]

# Name -> class; the class takes the text after "name:" in the spec (or nothing).
KINDS = {"byte": ByteTokenizer, "sentencepiece": SentencePieceTokenizer, "gpt2": GPT2Tokenizer,
         "wordpiece": WordPieceTokenizer}


def get_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer for a `config.data.tokenizer` spec: "byte", "sentencepiece:PATH"
    or "gpt2:DIR" (see the module docstring)."""
    name, _, arg = spec.partition(":")
    if name not in KINDS:
        raise ConfigError(f"config.data.tokenizer={spec!r}: unknown tokenizer {name!r}; "
                          f"known tokenizers: {sorted(KINDS)}")
    if name != "byte" and not arg:
        raise ConfigError(f"config.data.tokenizer={spec!r}: expected '{name}:PATH'")
    return KINDS[name](arg) if arg else KINDS[name]()
