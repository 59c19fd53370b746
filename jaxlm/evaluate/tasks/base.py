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

Which split is scored and which gives the demonstrations follow each task's lm-eval
config (`Splits`): the test split when the config names one, else validation; the
demonstrations from its few-shot split, else train, else validation, else test. The sampler
(`default_shots`) is lm-eval's default: for each (task, k) a `random.Random(fewshot_seed)`,
advanced over the documents in order, drawing k documents; or k + 1 with the scored document
dropped when lm-eval's config has the few-shot split equal to the test split (both unset
counts: PIQA, HellaSwag, ...). So a task scored and demonstrated from one split without a
few-shot split (lambada_openai) can show a document as its own demonstration, as lm-eval
does; `config.evaluate.fewshot_exclude_self` forbids that, and marks the results
non-standard. Where the files lack a split lm-eval's config needs, jaxlm falls back (scores
validation instead of test; demonstrates from the scored split, never a document's own) and
says so in `Task.nonstandard`, which the results and the table carry.
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
    fewshot_from_docs: bool = False               # the pool is the scored split itself
    exclude_self: bool = False                    # draw k + 1, drop the scored document
    # (task, doc index, k, rng) -> demonstrations; None: lm-eval's default sampler.
    sampler: Callable | None = None
    description: str = ""
    source: str = ""                              # where the documents were read
    fewshot_source: str = ""                      # where the demonstrations were read
    baseline: float | None = None                 # accuracy of a no-skill strategy
    # How scoring departs from lm-eval's config: at every k, and (demonstrations) at k > 0.
    nonstandard: tuple[str, ...] = ()
    nonstandard_shots: tuple[str, ...] = ()

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
    if k + task.exclude_self > len(pool):
        raise ValueError(f"task {task.name}: {k} demonstrations requested, the pool "
                         f"({task.fewshot_source or 'few-shot documents'}) has {len(pool)}"
                         + (" (one of them the scored document)" if task.exclude_self else ""))
    if not task.exclude_self:
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


@dataclasses.dataclass(frozen=True)
class Splits:
    """A task's splits as its lm-eval config names them (training_split, validation_split,
    test_split, fewshot_split; None: the config has none)."""
    train: str | None = "train"
    validation: str | None = "validation"
    test: str | None = None
    fewshot: str | None = None

    @property
    def scored(self) -> str:
        return self.test or self.validation

    @property
    def demonstrations(self) -> str:
        return self.fewshot or self.train or self.validation or self.test

    @property
    def drops_scored_document(self) -> bool:
        """lm-eval's sampler drops the scored document only when the config's few-shot
        split equals its test split (both None counts)."""
        return self.fewshot == self.test


def local_task(name: str, reader, fields: Sequence[str],
               check: Callable[[dict], str | None] | None = None, *,
               splits: Splits = Splits(), **task) -> Task:
    """A task whose documents `reader` (JsonlFolder or TfdsDataset) reads from the splits
    lm-eval's config names (`splits`). A missing split falls back, and the task says so
    (`Task.nonstandard`): test -> validation for the scored split; the demonstrations from
    the scored split itself, never a document's own."""
    scored, notes, shot_notes = splits.scored, [], []
    fallback = splits.validation if scored == splits.test else None
    if not reader.has(scored) and fallback and reader.has(fallback):
        notes.append(f"scored on {fallback}: lm-eval's {name} scores {scored}, which "
                     f"{reader.where(scored)} does not hold")
        scored = fallback
    docs = tuple(reader.read(scored, fields, check))
    pool_split, exclude = splits.demonstrations, splits.drops_scored_document
    if pool_split != scored and not reader.has(pool_split):
        shot_notes.append(f"demonstrations from {scored}, never a document's own: lm-eval "
                          f"draws them from {pool_split}, which {reader.where(pool_split)} "
                          "does not hold")
        pool_split, exclude = scored, True
    pool = docs if pool_split == scored else tuple(reader.read(pool_split, fields, check))
    return Task(name=name, docs=docs, fewshot_docs=pool, fewshot_from_docs=pool_split == scored,
                exclude_self=exclude, source=reader.where(scored),
                fewshot_source=reader.where(pool_split), nonstandard=tuple(notes),
                nonstandard_shots=tuple(shot_notes), **task)


def never_own_demonstration(task: Task) -> Task:
    """config.evaluate.fewshot_exclude_self: a task demonstrated from its scored split never
    shows a document as its own demonstration (lm-eval does where its config has no few-shot
    split, e.g. lambada_openai); marked non-standard where that changes the protocol."""
    if not task.fewshot_from_docs or task.exclude_self:
        return task
    return dataclasses.replace(task, exclude_self=True, nonstandard_shots=task.nonstandard_shots + (
        "config.evaluate.fewshot_exclude_self: a document is never its own demonstration "
        "(lm-eval's config allows it)",))


def choice_problems(choices: Sequence[str], gold: int) -> str | None:
    """What is wrong with a document's choices and gold index, if anything."""
    if any(not isinstance(c, str) or not c.strip() for c in choices):
        return f"an empty choice in {list(choices)}"
    if len(set(choices)) != len(choices):
        return f"duplicate choices in {list(choices)}"
    if not 0 <= gold < len(choices):
        return f"gold answer {gold} out of range for {len(choices)} choices"
    return None
