"""SQuAD v1.1 / v2.0 files as span-extraction features for BERT.

A SQuAD file is JSON: {"version", "data": [{"title", "paragraphs": [{"context", "qas":
[{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}. v2.0
questions with "is_impossible": true have no answer; their "answers" list is empty.

A context is usually longer than the model's sequence, so each question becomes one or more
*windows*: "[CLS] question [SEP] context[a:b] [SEP]", token type 0 up to the first [SEP]
and 1 after, window starts `doc_stride` context tokens apart (as BERT's reference SQuAD
code). A window is labelled with the answer's first and last token when it holds the whole
answer, and with position 0 ([CLS]: "no answer here") otherwise, which is also the label of
every window of an unanswerable question. An answer that crosses a window boundary is thus
labelled in the next window that holds it whole (the stride must be smaller than a window
for one to exist).

Token to text: the context is split on whitespace into words (each word keeps its character
span); every word is encoded on its own (after a space for all but the first, so byte and
GPT-2 tokenizers see the spaces), and each token keeps the character span it covers,
counted from the pieces' texts without spaces (a WordPiece split at punctuation included).
Where the pieces do not add up to the word's length (an [UNK], accents stripped, a byte of
a multi-byte character), the word's tokens all get the whole word's span, so an answer is
recovered at word granularity there. Answers are located by their character offsets, which
are checked against the context (a mismatch is a DataError naming the file and question).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np

from jaxlm.data.labelled import _EPOCH_STREAM
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import DataError


@dataclasses.dataclass
class Question:
    """One question of a SQuAD file, its context and its gold answers ([] if impossible)."""
    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]  # character offsets of `answers` in `context`
    where: str  # file and position, for error messages

    @property
    def impossible(self) -> bool:
        return not self.answers


def read(path: str | pathlib.Path) -> list[Question]:
    """The questions of a SQuAD JSON file, every answer's offset checked against its context."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a SQuAD JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: not a SQuAD file (expected an object with a 'data' list)")
    questions, seen = [], {}
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(_field(article, "paragraphs", list, f"{path}: data[{a}]")):
            at = f"{path}: data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", str, at)
            for q, qa in enumerate(_field(paragraph, "qas", list, at)):
                where = f"{at}.qas[{q}]"
                qid = str(_field(qa, "id", (str, int), where))
                where = f"{where} (id {qid})"
                if qid in seen:
                    raise DataError(f"{where}: the id is used again, first at {seen[qid]}")
                seen[qid] = where
                question = _field(qa, "question", str, where)
                answers = [] if qa.get("is_impossible") else _field(qa, "answers", list, where)
                texts, starts = [], []
                for i, answer in enumerate(answers):
                    text = _field(answer, "text", str, f"{where}.answers[{i}]")
                    start = _field(answer, "answer_start", int, f"{where}.answers[{i}]")
                    if context[start:start + len(text)] != text:
                        raise DataError(
                            f"{where}.answers[{i}]: answer_start {start} does not point at "
                            f"{text!r} in the context (found {context[start:start + len(text)]!r})")
                    texts.append(text)
                    starts.append(start)
                if not texts and not qa.get("is_impossible"):
                    raise DataError(f"{where}: no answers and not marked is_impossible")
                questions.append(Question(qid, question, context, texts, starts, where))
    if not questions:
        raise DataError(f"{path}: holds no questions")
    return questions


def _field(obj, name: str, kind, where: str):
    if not isinstance(obj, dict) or name not in obj:
        raise DataError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field {name!r} is {type(value).__name__}, not the expected type")
    return value


@dataclasses.dataclass
class Context:
    """A context's tokens and the character span [start, end) of each."""
    ids: list[int]
    starts: list[int]
    ends: list[int]


def tokenize_context(tokenizer: Tokenizer, context: str) -> Context:
    """Encodes a context word by word, keeping each token's character span (module doc)."""
    texts = tokenizer.piece_texts()  # each id's text, a word-initial WordPiece as " piece"
    ids, starts, ends = [], [], []
    pos = 0
    for n, word in enumerate(context.split()):
        begin = context.index(word, pos)
        pos = begin + len(word)
        pieces = tokenizer.encode(word if n == 0 else " " + word)
        widths = [len(texts[t].replace(" ", "")) for t in pieces]  # characters, spaces aside
        exact = sum(widths) == len(word)
        for t, width in zip(pieces, widths):
            ids.append(t)
            if exact:  # this piece's own characters; a lone space piece is empty
                starts.append(begin)
                begin += width
                ends.append(begin)
            else:
                starts.append(pos - len(word))
                ends.append(pos)
    return Context(ids, starts, ends)


@dataclasses.dataclass
class Windows:
    """The model inputs of all windows of some questions, and how to map them back."""
    ids: np.ndarray  # [N, L] int32, padded with the tokenizer's pad id
    token_types: np.ndarray  # [N, L] int32
    starts: np.ndarray  # [N] the answer's first token in the window, 0: none
    ends: np.ndarray  # [N] its last token (inclusive), 0: none
    question: np.ndarray  # [N] index into the questions
    context_offset: np.ndarray  # [N] position of the window's first context token
    context_start: np.ndarray  # [N] index of that token in the question's Context
    context_len: np.ndarray  # [N] context tokens in the window
    contexts: list[Context]  # per question

    def segments(self) -> np.ndarray:
        """[N, L] 1 on a window's tokens ([CLS] question [SEP] context [SEP]), 0 on padding:
        the model's segments, so no position attends to padding."""
        length_N = self.context_offset + self.context_len + 1
        return (np.arange(self.ids.shape[1])[None, :] < length_N[:, None]).astype(np.int32)


def windows(questions: list[Question], tokenizer: Tokenizer, seq_len: int, doc_stride: int,
            max_query_len: int) -> Windows:
    """Every question's windows over its context (module doc), in question order."""
    cls, sep = tokenizer.bert_ids["cls"], tokenizer.bert_ids["sep"]
    rows, cache = [], {}
    contexts = []
    for qi, q in enumerate(questions):
        if q.context not in cache:
            cache[q.context] = tokenize_context(tokenizer, q.context)
        ctx = cache[q.context]
        contexts.append(ctx)
        query = tokenizer.encode(q.question)[:max_query_len]
        room = seq_len - len(query) - 3
        if room < 1:
            raise DataError(f"{q.where}: the question leaves no room for context in "
                            f"config.data.seq_len={seq_len}")
        if doc_stride > room:
            raise DataError(f"config.finetune.doc_stride={doc_stride} is longer than the "
                            f"context part of a window ({room} tokens) at {q.where}: windows "
                            "would skip context")
        span = _answer_tokens(ctx, q)
        offset = len(query) + 2
        begin = 0
        while True:
            length = min(room, len(ctx.ids) - begin)
            ids = [cls, *query, sep, *ctx.ids[begin:begin + length], sep]
            start = end = 0
            if span is not None and begin <= span[0] and span[1] < begin + length:
                start, end = span[0] - begin + offset, span[1] - begin + offset
            rows.append((ids, len(query) + 2, start, end, qi, offset, begin, length))
            if begin + length >= len(ctx.ids):
                break
            begin += doc_stride
    n = len(rows)
    ids = np.full((n, seq_len), tokenizer.pad_id, np.int32)
    types = np.zeros((n, seq_len), np.int32)
    for r, (row, first_b, *_) in enumerate(rows):
        ids[r, :len(row)] = row
        types[r, first_b:len(row)] = 1
    col = lambda i: np.array([row[i] for row in rows], np.int32)  # noqa: E731
    return Windows(ids, types, col(2), col(3), col(4), col(5), col(6), col(7), contexts)


def _answer_tokens(ctx: Context, q: Question) -> tuple[int, int] | None:
    """The first answer's first and last context token, None for an impossible question."""
    if q.impossible:
        return None
    a, b = q.answer_starts[0], q.answer_starts[0] + len(q.answers[0])
    inside = [i for i, (s, e) in enumerate(zip(ctx.starts, ctx.ends)) if s < b and e > a]
    if not inside:  # an answer of only whitespace cannot be located
        raise DataError(f"{q.where}: the answer {q.answers[0]!r} covers no token of the context")
    return inside[0], inside[-1]


class WindowSource:
    """Training windows by global index, for the training loop (as labelled.LabelledSource):
    example i of epoch e = i // N is window perm_e[i mod N], perm_e seeded by (seed, e), so
    a resumed run reads the same windows in the same order."""

    def __init__(self, win: Windows, name: str, seed: int):
        self.win, self.name, self.seed = win, name, seed
        self.seq_len = win.ids.shape[1]
        self.segments_NxL = win.segments()
        self._perm = {}

    def __len__(self) -> int:
        return len(self.win.ids)

    def example(self, index: int) -> dict:
        epoch, j = divmod(index, len(self))
        if epoch not in self._perm:
            rng = np.random.default_rng([self.seed, _EPOCH_STREAM, epoch])
            self._perm = {epoch: rng.permutation(len(self))}
        k = int(self._perm[epoch][j])
        w = self.win
        return {"tokens": w.ids[k], "types": w.token_types[k],
                "segments": self.segments_NxL[k], "start": w.starts[k], "end": w.ends[k]}

    def stats(self) -> dict:
        return {"name": self.name, "documents": len(self), "sequences_per_epoch": None}

    def fingerprint(self) -> str:
        """The windows, their labels and the seed: a resumed run must read the same."""
        h = hashlib.sha256(json.dumps([self.name, self.seq_len, self.seed]).encode())
        for a in (self.win.ids, self.win.token_types, self.win.starts, self.win.ends):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]
