"""SentencePiece tokenizers: a model file, and training one from local text.

    python -m jaxlm.data.tokenizers train --input=corpus.txt --vocab_size=8000 \
        --output=runs/spm8k.model [--model_type=unigram|bpe] [--max_sentences=1000000]

Models trained here have fixed special ids so that GPT and BERT can share one model:
0 <pad>, 1 <unk>, 2 <eos> (also BOS and document separator), then the BERT pieces 3 <cls>,
4 <sep>, 5 <mask>. Unknown characters fall back to UTF-8 byte pieces, so every text
round-trips.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable
from typing import Any

from jaxlm.data.text_files import read_text_file
from jaxlm.data.tokenizers.base import Tokenizer, sha256_of
from jaxlm.errors import ConfigError

# Special pieces of models trained by `train_sentencepiece`; ids in this order from 0.
SPM_PAD, SPM_UNK, SPM_EOS = "<pad>", "<unk>", "<eos>"
SPM_BERT_PIECES = ("<cls>", "<sep>", "<mask>")  # ids 3, 4, 5: reserved for BERT


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file. EOS and PAD are the model's eos/pad pieces (a model
    without them is refused: the pipeline needs both). `pieces` maps its control and BERT
    pieces to ids; `bert_ids` holds <cls>, <sep>, <mask> when the model has them."""

    name = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm  # only needed for this tokenizer

        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise ConfigError(f"config.data.tokenizer: no SentencePiece model file {self.path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except RuntimeError:  # sentencepiece: "could not parse ModelProto from ..."
            raise ConfigError(f"config.data.tokenizer: {self.path} is not a SentencePiece model "
                              "file (python -m jaxlm.data.tokenizers train makes one)") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id, self.pad_id = self.sp.eos_id(), self.sp.pad_id()
        if self.eos_id < 0 or self.pad_id < 0:
            raise ConfigError(f"config.data.tokenizer: {self.path} defines no eos or pad piece "
                              f"(eos_id={self.eos_id}, pad_id={self.pad_id}); train it with "
                              "python -m jaxlm.data.tokenizers train")
        self.pieces = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                       if self.sp.is_control(i) or self._is_user_defined(i)}
        self.bert_ids = {name: self.pieces[piece] for name, piece in zip(
            ("cls", "sep", "mask"), SPM_BERT_PIECES) if piece in self.pieces}
        self.sha256 = sha256_of(self.path)

    def _is_user_defined(self, i: int) -> bool:
        return self.sp.id_to_piece(i) in SPM_BERT_PIECES

    @property
    def special_ids(self) -> set[int]:
        return {self.eos_id, self.pad_id, *self.pieces.values()}

    def _piece(self, i: int) -> str:
        return self.sp.id_to_piece(i).replace("\u2581", " ")  # "▁" marks a space

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = self._checked_ids(ids)
        specials = self.special_ids
        return self.sp.decode([i for i in ids if i not in specials])

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "sha256": self.sha256}


def train_sentencepiece(inputs: list[str], vocab_size: int, output: str, *,
                        model_type: str = "unigram", text_key: str = "text",
                        max_sentences: int = 0, character_coverage: float = 0.9995,
                        seed_sentencepieces: int = 1_000_000) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on the lines of `inputs` and writes it to `output`
    (atomically). Identity normalisation, no dummy prefix and byte fallback make decode an
    exact inverse of encode. Returns the tokenizer."""
    import sentencepiece as spm  # only needed for this tokenizer

    def sentences():
        for path in inputs:
            for doc in read_text_file(path, "line", text_key):
                for line in doc.split("\n"):  # a JSONL document may hold several lines
                    if line.strip():
                        yield line

    # Checked before training: a file that fails inside SentencePiece's reader comes back
    # as its multi-line C++ error.
    for path in inputs:
        if not path.strip() or not pathlib.Path(path).is_file():
            raise ConfigError(f"--input: {path!r} is not a file (expected comma-separated "
                              ".txt / .jsonl files)")
    out = pathlib.Path(output)
    if out.is_dir() or not out.name:
        raise ConfigError(f"--output={output}: is a folder; expected the model file to write, "
                          "e.g. DIR/spm.model")
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
    """`path` appears only complete, with the mode the umask gives (not mkstemp's 0600);
    a failed write leaves nothing and names `path`."""
    tmp = path.parent / f".{path.name}.partial-{os.urandom(4).hex()}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
