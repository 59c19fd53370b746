"""Tokenizers: text <-> integer ids, chosen by `config.data.tokenizer`.

    "byte"                  UTF-8 bytes (258 ids); no files, the default.
    "sentencepiece:PATH"    a SentencePiece model file, e.g. one trained by
                            `python -m jaxlm.data.tokenizer train` (below).
    "gpt2:DIR"              GPT-2's byte-level BPE (50257 ids) from local vocabulary files:
                            DIR holds encoder.json + vocab.bpe (OpenAI's names) or
                            vocab.json + merges.txt (Hugging Face's); nothing is downloaded.

The trainer, the evaluator and the checkpoint code talk to the `Tokenizer` interface only.
`to_dict()` identifies a tokenizer exactly (file tokenizers include the sha256 of their
files, not their path): it is stored in every checkpoint and compared on restore.

Training a SentencePiece model from a corpus (text files, or JSONL with --text_key):

    python -m jaxlm.data.tokenizer train --input=corpus.txt --vocab_size=8000 \
        --output=runs/spm8k.model [--model_type=unigram|bpe] [--max_sentences=1000000]

Its special ids are fixed so that GPT and BERT can share one model: 0 <pad>, 1 <unk>,
2 <eos> (also BOS and document separator), then the BERT pieces 3 <cls>, 4 <sep>,
5 <mask>. Unknown characters fall back to UTF-8 byte pieces, so every text round-trips.
"""

from __future__ import annotations

import abc
import argparse
import hashlib
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jaxlm.config import ConfigError


class Tokenizer(abc.ABC):
    """What the rest of jaxlm needs from a tokenizer.

    Subclasses set the four attributes and implement `encode` / `decode`.
    """

    name: str  # Registry name, e.g. "byte"; see `get_tokenizer`.
    vocab_size: int  # Size of the model's embedding table, special ids included.
    eos_id: int  # End of document; also used as BOS / document separator.
    pad_id: int  # Fills batches; never a training target (its weight is 0).

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
        self._check_text(text)
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


def _sha256(*paths: pathlib.Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- SentencePiece

# Special pieces of models trained by `train_sentencepiece`; ids in this order from 0.
SPM_PAD, SPM_UNK, SPM_EOS = "<pad>", "<unk>", "<eos>"
SPM_BERT_PIECES = ("<cls>", "<sep>", "<mask>")  # ids 3, 4, 5: reserved for BERT


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file. EOS and PAD are the model's eos/pad pieces (a model
    without them is refused: the pipeline needs both). `special_ids` maps the BERT pieces
    (and any other user-defined piece) to ids."""

    name = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm  # only needed for this tokenizer

        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise ConfigError(f"config.data.tokenizer: no SentencePiece model file {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id, self.pad_id = self.sp.eos_id(), self.sp.pad_id()
        if self.eos_id < 0 or self.pad_id < 0:
            raise ConfigError(f"config.data.tokenizer: {self.path} defines no eos or pad piece "
                              f"(eos_id={self.eos_id}, pad_id={self.pad_id}); train it with "
                              "python -m jaxlm.data.tokenizer train")
        self.special_ids = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                            if self.sp.is_control(i) or self._is_user_defined(i)}
        self.sha256 = _sha256(self.path)

    def _is_user_defined(self, i: int) -> bool:
        return self.sp.id_to_piece(i) in SPM_BERT_PIECES

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = self._checked_ids(ids)
        specials = set(self.special_ids.values())
        return self.sp.decode([i for i in ids if i not in specials])

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "sha256": self.sha256}


def _read_documents(paths: list[str], text_key: str) -> Iterator[str]:
    """Documents of text files (one per file) and JSONL files (one per line, field text_key)."""
    for path in paths:
        p = pathlib.Path(path)
        if not p.is_file():
            raise ConfigError(f"--input: no such file {p}")
        if p.suffix == ".jsonl":
            with p.open("rb") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield _jsonl_text(line, text_key, p, n)
        else:
            yield _utf8(p.read_bytes(), p)


def _utf8(data: bytes, path: pathlib.Path, line: int | None = None) -> str:
    """Strict UTF-8 decoding; the error names the file and the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = line if line is not None else data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{where}: not UTF-8 (byte 0x{data[e.start]:02x}); "
                          "convert the file to UTF-8 first") from None


def _jsonl_text(line: bytes, text_key: str, path: pathlib.Path, n: int) -> str:
    try:
        record = json.loads(_utf8(line, path, n))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        raise ConfigError(f"{path}:{n}: no string field {text_key!r}")
    return record[text_key]


def train_sentencepiece(inputs: list[str], vocab_size: int, output: str, *,
                        model_type: str = "unigram", text_key: str = "text",
                        max_sentences: int = 0, character_coverage: float = 0.9995,
                        seed_sentencepieces: int = 1_000_000) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on the lines of `inputs` and writes it to `output`
    (atomically). Identity normalisation, no dummy prefix and byte fallback make decode an
    exact inverse of encode. Returns the tokenizer."""
    import sentencepiece as spm  # only needed for this tokenizer

    def sentences():
        for doc in _read_documents(inputs, text_key):
            for line in doc.split("\n"):
                if line.strip():
                    yield line

    out = pathlib.Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = _BytesWriter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model,
            vocab_size=vocab_size, model_type=model_type,
            pad_id=0, unk_id=1, eos_id=2, bos_id=-1,
            pad_piece=SPM_PAD, unk_piece=SPM_UNK, eos_piece=SPM_EOS,
            user_defined_symbols=list(SPM_BERT_PIECES),
            byte_fallback=True, character_coverage=character_coverage,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True,
            input_sentence_size=max_sentences, shuffle_input_sentence=max_sentences > 0,
            seed_sentencepiece_size=seed_sentencepieces, minloglevel=2)
    except RuntimeError as e:  # e.g. a vocab_size the corpus cannot fill
        raise ConfigError(f"sentencepiece training failed: {e}") from None
    _write_atomic(out, model.data)
    return SentencePieceTokenizer(out)


class _BytesWriter:
    """`model_writer` for SentencePieceTrainer: keeps the serialized model in memory."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes):
        self.data += data


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- GPT-2 BPE

# GPT-2's pre-tokenisation regex (Radford et al. 2019, encoder.py): contractions, letter
# runs, digit runs, other symbols, each with an optional leading space; then whitespace.
GPT2_SPLIT = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
              r"""|\s+(?!\S)|\s+""")
GPT2_EOS = "<|endoftext|>"
GPT2_FILES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def _gpt2_byte_alphabet() -> dict[str, int]:
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
        ranks, eos = self._load(vocab_path, merges_path)
        self.encoding = tiktoken.Encoding(f"gpt2-{d.name}", pat_str=GPT2_SPLIT,
                                          mergeable_ranks=ranks,
                                          special_tokens={GPT2_EOS: eos})
        self.vocab_size = eos + 1
        self.eos_id = self.pad_id = eos
        self.sha256 = _sha256(vocab_path, merges_path)

    @staticmethod
    def _load(vocab_path: pathlib.Path, merges_path: pathlib.Path) -> tuple[dict[bytes, int], int]:
        """(token bytes -> id, EOS id), after checking that the vocabulary and the merges
        agree: in GPT-2 the i-th merge creates token 256 + i, so ids are merge ranks."""
        alphabet = _gpt2_byte_alphabet()

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
        ranks = {to_bytes(tok, str(vocab_path)): i for tok, i in vocab.items()}
        if sorted(ranks.values()) != list(range(len(ranks))) or eos != len(ranks):
            raise ConfigError(f"{vocab_path}: ids are not 0..{len(ranks) - 1} followed by {GPT2_EOS}")
        lines = merges_path.read_text("utf-8").split("\n")
        merges = [ln.split(" ") for ln in lines if ln and not ln.startswith("#version")]
        for i, (a, b) in enumerate(merges):
            merged = to_bytes(a + b, f"{merges_path}:{i + 2}")
            if ranks.get(merged) != 256 + i:
                raise ConfigError(f"{merges_path}:{i + 2}: merge {a!r} {b!r} is not token "
                                  f"{256 + i} of {vocab_path.name}; the files do not belong together")
        if len(ranks) != 256 + len(merges):
            raise ConfigError(f"{vocab_path} has {len(ranks)} tokens, expected 256 bytes + "
                              f"{len(merges)} merges")
        return ranks, eos

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = self._checked_ids(ids)
        return self.encoding.decode([i for i in ids if i != self.eos_id], errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "sha256": self.sha256}


# ----------------------------------------------------------------------------- registry

# Name -> constructor taking the text after "name:" in the spec (or nothing).
_TOKENIZERS: dict[str, Callable[..., Tokenizer]] = {
        "byte": ByteTokenizer,
        "sentencepiece": SentencePieceTokenizer,
        "gpt2": GPT2Tokenizer,
}


def get_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer for a `config.data.tokenizer` spec: "byte", "sentencepiece:PATH"
    or "gpt2:DIR" (see the module docstring)."""
    name, _, arg = spec.partition(":")
    if name not in _TOKENIZERS:
        raise ConfigError(f"config.data.tokenizer={spec!r}: unknown tokenizer {name!r}; "
                          f"known tokenizers: {sorted(_TOKENIZERS)}")
    if (name == "byte") == bool(arg):
        usage = "'byte'" if name == "byte" else f"'{name}:PATH'"
        raise ConfigError(f"config.data.tokenizer={spec!r}: expected {usage}")
    return _TOKENIZERS[name](arg) if arg else _TOKENIZERS[name]()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.data.tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a SentencePiece model from text/JSONL files")
    t.add_argument("--input", required=True, help="comma-separated .txt / .jsonl files")
    t.add_argument("--vocab_size", type=int, required=True)
    t.add_argument("--output", required=True, help="model file to write, e.g. spm.model")
    t.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
    t.add_argument("--text_key", default="text", help="field of each JSONL line")
    t.add_argument("--max_sentences", type=int, default=0,
                   help="train on a random sample of this many lines (0 = all)")
    args = parser.parse_args(argv)
    try:
        tok = train_sentencepiece(args.input.split(","), args.vocab_size, args.output,
                                  model_type=args.model_type, text_key=args.text_key,
                                  max_sentences=args.max_sentences)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.output}: {json.dumps(tok.to_dict())}; use "
          f"--config.data.tokenizer=sentencepiece:{args.output}")


if __name__ == "__main__":
    main()
