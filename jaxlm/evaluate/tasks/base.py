"""What a few-shot task is, and how its prompts and requests are built, exactly as
lm-evaluation-harness 0.4 builds them (so that scores can be compared to the fourth decimal).

A task is a list of documents (dicts, in the dataset's own field names) and four functions
of a document, the same ones lm-eval's task definitions declare:

  text(doc)     the question as the model reads it ("Question: ...\\nAnswer:"); for partial
                scoring (Winogrande) the index of the gold choice instead;
  choices(doc)  the candidate answers (partial scoring: the candidate contexts);
  target(doc)   the gold: an index into choices, or the answer string;
  kind          "multiple_choice" (score each choice, pick the most likely),
                "loglikelihood" (one continuation: its log-likelihood and whether greedy
                decoding gives it, e.g. LAMBADA), "generate_until" (decode, compare).

A k-shot context is k demonstrations, each `text + target_delimiter + answer +
fewshot_delimiter`, then the document's text. A multiple-choice request is
`(context, target_delimiter + choice)`: the space before an answer belongs to the
continuation. Partial scoring turns it around: one context per choice (demonstrations +
the sentence up to the blank, filled with that choice) and one continuation, the rest of
the sentence.

Demonstrations (`default_shots`) follow lm-eval's default sampler: for each (task, k) a
`random.Random(fewshot_seed)`, advanced over the documents in order; when the pool is the
evaluated split itself, k + 1 are drawn and the document itself dropped, so no example is
its own demonstration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import random
from collections.abc import Callable, Sequence

from jaxlm.errors import DataError

KINDS = ("multiple_choice", "loglikelihood", "generate_until")
METRICS = ("acc", "acc_norm", "perplexity", "exact_match")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str                                     # one of KINDS
    docs: tuple[dict, ...]                        # what is scored
    fewshot_docs: tuple[dict, ...]                # the pool demonstrations come from
    text: Callable[[dict], str | int]
    choices: Callable[[dict], list[str]] | None
    target: Callable[[dict], int | str]
    metrics: tuple[str, ...] = ("acc",)           # reported, of METRICS
    partial: bool = False                         # Winogrande: choices are contexts
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: tuple[str, ...] = ("\n\n",)            # generate_until: stop sequences
    fewshot_from_docs: bool = True                # pool = the evaluated split (drop the doc)
    # (task, doc index, k, rng) -> demonstrations; None: lm-eval's default sampler.
    sampler: Callable | None = None
    description: str = ""
    source: str = ""                              # where the documents were read
    baseline: float | None = None                 # accuracy of a no-skill strategy

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if unknown := set(self.metrics) - set(METRICS):
            raise ValueError(f"task {self.name}: unknown metrics {sorted(unknown)}")

    def gold(self, doc: dict) -> int:
        """Index of the gold choice (multiple choice)."""
        if self.partial:
            return int(self.text(doc))
        gold = self.target(doc)
        return self.choices(doc).index(gold) if isinstance(gold, str) else int(gold)

    @property
    def chance(self) -> float:
        """`baseline` when given; for multiple choice the mean of 1/len(choices)."""
        if self.baseline is not None:
            return self.baseline
        if self.kind == "multiple_choice" and self.docs:
            return sum(1 / len(self.choices(d)) for d in self.docs) / len(self.docs)
        return 0.0


def answer_text(task: Task, doc: dict) -> str:
    """The gold answer as a demonstration shows it."""
    gold = task.target(doc)
    if task.choices is not None and not task.partial and isinstance(gold, int):
        return task.choices(doc)[gold]
    return gold


def demonstration(task: Task, doc: dict) -> str:
    question = task.choices(doc)[task.text(doc)] if task.partial else task.text(doc)
    return question + task.target_delimiter + answer_text(task, doc) + task.fewshot_delimiter


def default_shots(task: Task, index: int, k: int, rng: random.Random) -> list[dict]:
    """lm-eval's default sampler (module docstring); `rng` carries over between documents."""
    pool, doc = task.fewshot_docs, task.docs[index]
    if k > len(pool) - (1 if task.fewshot_from_docs else 0):
        raise ValueError(f"task {task.name}: {k} demonstrations requested, the pool "
                         f"({task.source or 'few-shot documents'}) has {len(pool)}")
    if not task.fewshot_from_docs:
        return [pool[j] for j in rng.sample(range(len(pool)), k)]
    shots = [pool[j] for j in rng.sample(range(len(pool)), k + 1) if pool[j] != doc][:k]
    if len(shots) < k:  # the document appears twice in the pool: lm-eval draws again
        others = [d for d in pool if d != doc]
        shots = [others[j] for j in rng.sample(range(len(others)), k)]
    return shots


def contexts(task: Task, k: int, fewshot_seed: int, limit: int | None = None) -> list:
    """The k-shot context of each of the first `limit` documents: a string, or for
    partial scoring a list of strings (one per choice)."""
    rng = random.Random(fewshot_seed)
    sample = task.sampler or default_shots
    out = []
    for i, doc in enumerate(task.docs[:limit]):
        prefix = "".join(demonstration(task, s) for s in sample(task, i, k, rng)) if k else ""
        if task.partial:
            out.append([prefix + c for c in task.choices(doc)])
        else:
            out.append(prefix + task.text(doc))
    return out


def requests(task: Task, doc: dict, context) -> list[tuple[str, str]]:
    """The (context, continuation) pairs a log-likelihood task scores for `doc`."""
    if task.kind == "loglikelihood":
        return [(context, task.target(doc))]
    if task.partial:
        return [(c, task.target_delimiter + task.target(doc)) for c in context]
    return [(context, task.target_delimiter + c) for c in task.choices(doc)]


# ----------------------------------------------------------------------------- metrics

def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean, as lm-eval computes it (sample standard deviation)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


# ----------------------------------------------------------------------------- files

def _checked(doc, fields: Sequence[str], check, where: str) -> dict:
    if not isinstance(doc, dict):
        raise DataError(f"{where}: expected a JSON object")
    if missing := [k for k in fields if k not in doc]:
        raise DataError(f"{where}: missing field(s) {missing}")
    if check is not None and (problem := check(doc)):
        raise DataError(f"{where}: {problem}")
    return doc


def read_jsonl(path: pathlib.Path, fields: Sequence[str],
               check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """The documents of a JSONL file. A line that is not a JSON object with `fields`, or
    that `check` objects to (it returns a message), is an error naming the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: no such task file")
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
            docs.append(_checked(doc, fields, check, f"{path}:{n}"))
    if not docs:
        raise DataError(f"{path}: no documents")
    return docs


class JsonlFolder:
    """A task's documents as FOLDER/<split>.jsonl, in the dataset's original fields."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)

    def where(self, split: str) -> str:
        return str(self.folder / f"{split}.jsonl")

    def has(self, split: str) -> bool:
        return (self.folder / f"{split}.jsonl").is_file()

    def read(self, split: str, fields, check=None) -> list[dict]:
        return read_jsonl(self.folder / f"{split}.jsonl", fields, check)


class TfdsDataset:
    """A task's documents from a prepared TFDS dataset (nothing is downloaded), turned into
    the original fields by `convert(example, features)`."""

    def __init__(self, name: str, data_dir: str, convert: Callable | None = None):
        self.name, self.data_dir = name, data_dir
        self.convert = convert or (lambda example, features: example)
        self._builder = None

    @property
    def builder(self):
        if self._builder is None:
            from jaxlm.data.tfds_split import builder_for
            self._builder = builder_for(self.name, self.data_dir, "config.evaluate.source='tfds'")
        return self._builder

    def where(self, split: str) -> str:
        return f"tfds:{self.name}:{split}"

    def has(self, split: str) -> bool:
        return split in self.builder.info.splits

    def read(self, split: str, fields, check=None) -> list[dict]:
        if not self.has(split):
            raise DataError(f"{self.name} has splits {sorted(self.builder.info.splits)}, not {split!r}")
        source, features = self.builder.as_data_source(split=split), self.builder.info.features
        docs = []
        for i in range(len(source)):
            example = {k: _plain(v) for k, v in source[i].items()}
            docs.append(_checked(self.convert(example, features), fields, check,
                                 f"{self.where(split)} example {i}"))
        if not docs:
            raise DataError(f"{self.where(split)}: no documents")
        return docs


def _plain(value):
    """A TFDS value as JSON would hold it: str for bytes, lists for arrays, dicts inside."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _plain(value.tolist()) if getattr(value, "ndim", 0) else value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def local_task(name: str, reader, split: str, fields: Sequence[str],
               check: Callable[[dict], str | None] | None = None, **task) -> Task:
    """A task whose documents `reader` (JsonlFolder or TfdsDataset) reads from `split`.
    Demonstrations come from its train split when there is one (lm-eval's default), else
    from the evaluated split itself (never a document's own)."""
    docs = tuple(reader.read(split, fields, check))
    own = split == "train" or not reader.has("train")
    pool = docs if own else tuple(reader.read("train", fields, check))
    return Task(name=name, docs=docs, fewshot_docs=pool, fewshot_from_docs=own,
                source=reader.where(split), **task)


def choice_problems(choices: Sequence[str], gold: int) -> str | None:
    """What is wrong with a document's choices and gold index, if anything."""
    if any(not isinstance(c, str) or not c.strip() for c in choices):
        return f"an empty choice in {list(choices)}"
    if len(set(choices)) != len(choices):
        return f"duplicate choices in {list(choices)}"
    if not 0 <= gold < len(choices):
        return f"gold answer {gold} out of range for {len(choices)} choices"
    return None
