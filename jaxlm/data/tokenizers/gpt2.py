"""GPT-2's byte-level BPE from local vocabulary files, run by tiktoken."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

from jaxlm.data.tokenizers.base import Tokenizer, sha256_of
from jaxlm.errors import ConfigError

# GPT-2's pre-tokenisation regex (Radford et al. 2019, encoder.py): contractions, letter
# runs, digit runs, other symbols, each with an optional leading space; then whitespace.
GPT2_SPLIT = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
              r"""|\s+(?!\S)|\s+""")
GPT2_EOS = "<|endoftext|>"
GPT2_FILES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, as its vocabulary files write them: byte b is
    chr(b) when that is a visible character (33-126, 161-172, 174-255), else chr(256 + n)
    for the n-th other byte. Returns character -> byte."""
    out, n = {}, 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            out[chr(b)] = b
        else:
            out[chr(256 + n)] = b
            n += 1
    return out


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE through tiktoken, from local files. EOS is <|endoftext|>;
    GPT-2 has no padding token, so PAD = EOS (padding always has weight 0 anyway)."""

    name = "gpt2"

    def __init__(self, directory: str | os.PathLike):
        import tiktoken  # only needed for this tokenizer

        d = pathlib.Path(directory)
        found = [(d / v, d / m) for v, m in GPT2_FILES if (d / v).is_file() and (d / m).is_file()]
        if not found:
            names = " or ".join(f"{v} + {m}" for v, m in GPT2_FILES)
            raise ConfigError(f"config.data.tokenizer: {d} holds no GPT-2 vocabulary ({names}); "
                              "copy the files there (nothing is downloaded)")
        vocab_path, merges_path = found[0]
        ranks, eos, self.unused = self._load(vocab_path, merges_path)
        self.encoding = tiktoken.Encoding(f"gpt2-{d.name}", pat_str=GPT2_SPLIT,
                                          mergeable_ranks=ranks,
                                          special_tokens={GPT2_EOS: eos})
        self.vocab_size = max([eos, *self.unused]) + 1
        self.eos_id = self.pad_id = eos
        self.sha256 = sha256_of(vocab_path, merges_path)

    @staticmethod
    def _load(vocab_path: pathlib.Path, merges_path: pathlib.Path):
        """(token bytes -> id, EOS id, unused id -> bytes), after checking that the
        vocabulary and the merges agree: in GPT-2 the i-th merge creates token 256 + i, so
        ids are merge ranks. Tokens past the merges (a vocabulary padded to a round size)
        are kept as transformers keeps them: never made by encoding, decoded to their
        bytes."""
        alphabet = byte_alphabet()

        def to_bytes(token: str, where: str) -> bytes:
            try:
                return bytes(alphabet[c] for c in token)
            except KeyError as e:
                raise ConfigError(f"{where}: {token!r} has a character ({e.args[0]!r}) outside "
                                  "GPT-2's byte alphabet") from None

        vocab = json.loads(vocab_path.read_text("utf-8"))
        if GPT2_EOS not in vocab:
            raise ConfigError(f"{vocab_path}: no {GPT2_EOS} token")
        eos = vocab.pop(GPT2_EOS)
        lines = merges_path.read_text("utf-8").split("\n")
        merges = [ln.split(" ") for ln in lines if ln and not ln.startswith("#version")]
        n = 256 + len(merges)
        ranks = {to_bytes(tok, str(vocab_path)): i for tok, i in vocab.items() if i < n}
        unused = {i: to_bytes(tok, str(vocab_path)) for tok, i in vocab.items() if i >= n}
        if sorted(ranks.values()) != list(range(n)) or eos < n or eos in unused or \
                len(unused) != len(vocab) - len(ranks):
            raise ConfigError(f"{vocab_path}: ids are not 0..{n - 1} (256 bytes and "
                              f"{len(merges)} merges) and then {GPT2_EOS} and unused tokens, "
                              "each once")
        for i, (a, b) in enumerate(merges):
            merged = to_bytes(a + b, f"{merges_path}:{i + 2}")
            if ranks.get(merged) != 256 + i:
                raise ConfigError(f"{merges_path}:{i + 2}: merge {a!r} {b!r} is not token "
                                  f"{256 + i} of {vocab_path.name}; the files do not belong together")
        return ranks, eos, unused

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i for i in self._checked_ids(ids) if i != self.eos_id]
        if self.unused and any(i in self.unused for i in ids):
            data = b"".join(self.unused[i] if i in self.unused
                            else self.encoding.decode_single_token_bytes(i) for i in ids)
            return data.decode("utf-8", errors="replace")
        return self.encoding.decode(ids, errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "sha256": self.sha256}
