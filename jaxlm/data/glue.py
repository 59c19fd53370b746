"""The GLUE benchmark (Wang et al. 2019): its nine tasks, their files and labels, read as
jaxlm labelled data (`glue:TASK:SPLIT`, e.g. glue:mrpc:train, glue:mnli:validation_matched).

A task is read from config.finetune.glue_dir, a folder in the layout GLUE's download
script leaves (CoLA/, SST-2/, MRPC/, STS-B/, QQP/, MNLI/, QNLI/, RTE/, WNLI/, diagnostic/:
train.tsv, dev.tsv, test.tsv; MNLI's dev_matched, dev_mismatched, test_matched and
test_mismatched), or, with glue_dir empty, from the prepared TFDS dataset glue/TASK in
config.data.data_dir (nothing is downloaded). The files are GLUE's own: tab-separated, a
header row naming the columns (CoLA's train and dev have none: source, label, the
original annotation, sentence), no quoting (a sentence may hold a lone quote mark).
Columns are found by their header names, so MNLI's many columns and files whose column
order differs read alike.

Every problem is a DataError naming the file and line: a missing column, a row too short,
a label outside the task's set (STS-B: a score that is not a number in [0, 5]). Texts may
be empty (a few of GLUE's are). Test files have no labels; `read_split` returns their
`index` column for the prediction writer (jaxlm.evaluate.glue).

Classes are numbered in TFDS's order, so labels from files and from TFDS agree; `labels`
are the values the files (and the GLUE server) use for them.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from jaxlm.data.labelled import Labelled
from jaxlm.data.text_files import decode_utf8
from jaxlm.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Task:
    name: str                   # glue:NAME:SPLIT, config.finetune.glue_task
    folder: str                 # under config.finetune.glue_dir
    columns: tuple[str, ...]    # header names of the text (and the pair's second text)
    label: str                  # header name of the label
    labels: tuple[str, ...]     # label values as written in the files, in class order; () = a score
    class_names: tuple[str, ...]
    metrics: tuple[str, ...]    # the official metrics; their mean is the task's GLUE score
    tfds_columns: tuple[str, ...]
    dev: tuple[str, ...] = ("validation",)     # the first picks the best epoch
    test: dict = dataclasses.field(default_factory=lambda: {"test": ""})  # split -> server file
    headerless: tuple[int, int] | None = None  # (text, label) fields of CoLA's train/dev
    sources: tuple[tuple[str, str], ...] = ()  # split -> file, where the names are not the usual

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def num_classes(self) -> int:
        return len(self.labels) or 1

    def files(self) -> dict[str, str]:
        """split -> file name in the task's folder."""
        if self.sources:
            return dict(self.sources)
        names = {"train": "train.tsv"}
        for split in self.dev:
            names[split] = "dev" + split[len("validation"):] + ".tsv"
        for split in self.test:
            names[split] = "test" + split[len("test"):] + ".tsv"
        return names


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")
TASKS = {t.name: t for t in (
    Task("cola", "CoLA", ("sentence",), "label", BINARY, ("unacceptable", "acceptable"),
         ("mcc",), ("sentence",), test={"test": "CoLA.tsv"}, headerless=(3, 1)),
    Task("sst2", "SST-2", ("sentence",), "label", BINARY, ("negative", "positive"),
         ("accuracy",), ("sentence",), test={"test": "SST-2.tsv"}),
    Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", BINARY,
         ("not_equivalent", "equivalent"), ("f1", "accuracy"), ("sentence1", "sentence2"),
         test={"test": "MRPC.tsv"}),
    Task("stsb", "STS-B", ("sentence1", "sentence2"), "score", (), (),
         ("pearson", "spearman"), ("sentence1", "sentence2"), test={"test": "STS-B.tsv"}),
    Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", BINARY,
         ("not_duplicate", "duplicate"), ("f1", "accuracy"), ("question1", "question2"),
         test={"test": "QQP.tsv"}),
    Task("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
         ("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"),
         ("accuracy",), ("premise", "hypothesis"),
         dev=("validation_matched", "validation_mismatched"),
         test={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"}),
    Task("qnli", "QNLI", ("question", "sentence"), "label", NLI2, NLI2, ("accuracy",),
         ("question", "sentence"), test={"test": "QNLI.tsv"}),
    Task("rte", "RTE", ("sentence1", "sentence2"), "label", NLI2, NLI2, ("accuracy",),
         ("sentence1", "sentence2"), test={"test": "RTE.tsv"}),
    Task("wnli", "WNLI", ("sentence1", "sentence2"), "label", BINARY,
         ("not_entailment", "entailment"), ("accuracy",), ("sentence1", "sentence2"),
         test={"test": "WNLI.tsv"}),
)}
# The diagnostic set: MNLI's labels, test only; predicted by the MNLI model (AX.tsv).
AX = Task("ax", "diagnostic", ("sentence1", "sentence2"), "label", TASKS["mnli"].labels,
          TASKS["mnli"].class_names, (), ("premise", "hypothesis"), dev=(),
          test={"test": "AX.tsv"}, sources=(("test", "diagnostic.tsv"),))
_ALL = {**TASKS, "ax": AX}
STS_RANGE = (0.0, 5.0)


def task(name: str, field: str = "config.finetune.glue_task") -> Task:
    if name not in TASKS:
        raise ConfigError(f"{field}={name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name]


def parse_spec(spec: str) -> tuple[Task, str]:
    """(task, split) of "glue:TASK:SPLIT"; ConfigError naming what is wrong."""
    _, name, split = (spec.split(":") + ["", ""])[:3]
    if name not in _ALL:
        raise ConfigError(f"expected glue:TASK:SPLIT with TASK one of {sorted(_ALL)}")
    t = _ALL[name]
    if split not in t.files():
        raise ConfigError(f"glue:{name} has splits {sorted(t.files())}")
    return t, split


def read(spec: str, cfg_ft, num_classes: int, data_dir: str = "") -> Labelled:
    """The examples of "glue:TASK:SPLIT" (a test split: labels 0, see read_split) from
    cfg_ft.glue_dir, checked against the head (config.model.num_classes); the same
    signature as jaxlm.data.labelled.read, which reads every other spec."""
    t, split = parse_spec(spec)
    if num_classes != t.num_classes:
        raise ConfigError(f"glue:{t.name} has {t.num_classes} "
                          f"{'output (a score)' if t.regression else 'classes'}, and "
                          f"config.model.num_classes={num_classes}")
    return read_split(t, split, cfg_ft.glue_dir, data_dir)[0]


def read_split(t: Task, split: str, glue_dir: str, data_dir: str = "") -> tuple[Labelled, list[str]]:
    """(examples, their GLUE index) of one split, from glue_dir or (empty) prepared TFDS."""
    if not glue_dir:
        return _read_tfds(t, split, data_dir)
    path = pathlib.Path(glue_dir).expanduser() / t.folder / t.files()[split]
    if not path.is_file():
        raise DataError(f"{path}: no such file (config.finetune.glue_dir={glue_dir!r} should "
                        f"hold GLUE's {t.folder}/ folder)")
    labelled = not split.startswith("test")
    # a leading UTF-8 byte-order mark (Windows tools write one) is not part of the header
    lines = decode_utf8(path.read_bytes(), path).removeprefix("\ufeff").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = [line.rstrip("\r").split("\t") for line in lines]
    columns, label_at, index_at, first = _layout(t, rows[0] if rows else [], path, labelled)
    texts, pairs, labels, where, ids = [], [], [], [], []
    for n, row in enumerate(rows[first - 1:], first):
        at = f"{path}:{n}"
        need = max(columns + ([label_at] if labelled else []))
        if len(row) <= need:
            raise DataError(f"{at}: {len(row)} fields, the task's columns need {need + 1} "
                            f"(GLUE's files are tab-separated)")
        texts.append(row[columns[0]])
        if len(columns) > 1:
            pairs.append(row[columns[1]])
        labels.append(_label(t, row[label_at], at) if labelled else 0)
        where.append(at)
        ids.append(row[index_at] if not labelled and index_at is not None else str(n - first))
    if not texts:
        raise DataError(f"{path}: no examples")
    dtype = np.float32 if t.regression else np.int32
    return Labelled(f"glue:{t.name}:{split}", texts, pairs if len(columns) > 1 else None,
                    np.asarray(labels, dtype), where), ids


def _layout(t: Task, header: list[str], path: pathlib.Path, labelled: bool):
    """(text column(s), label column, index column, first example's line) of a file:
    found by name in its header, or CoLA's fixed fields in its headerless train/dev."""
    if t.headerless and labelled:
        text_at, label_at = t.headerless
        return [text_at], label_at, None, 1
    for name in list(t.columns) + ([t.label] if labelled else []):
        if name not in header:
            raise DataError(f"{path}:1: no column {name!r}; the header has {header}")
    index_at = next((header.index(c) for c in ("index", "id") if c in header), None)
    return ([header.index(c) for c in t.columns], header.index(t.label) if labelled else None,
            index_at, 2)


def _label(t: Task, value: str, at: str) -> int | float:
    if t.regression:
        try:
            score = float(value)
        except ValueError:
            score = float("nan")
        if not STS_RANGE[0] <= score <= STS_RANGE[1]:
            raise DataError(f"{at}: score {value!r} is not a number in [0, 5] ({t.name}'s "
                            "similarity)")
        return score
    if value not in t.labels:
        raise DataError(f"{at}: label {value!r} is not one of {t.name}'s labels {list(t.labels)}")
    return t.labels.index(value)


def _read_tfds(t: Task, split: str, data_dir: str) -> tuple[Labelled, list[str]]:
    """A prepared TFDS glue/TASK (features per tfds_columns, `label`, `idx`)."""
    from jaxlm.data.tfds_split import builder_for
    name = f"glue/{t.name}"
    builder = builder_for(name, data_dir, "the TFDS dataset (config.finetune.glue_dir is empty)")
    if split not in builder.info.splits:
        raise ConfigError(f"{name} has splits {sorted(builder.info.splits)}")
    source = builder.as_data_source(split=split)
    texts, pairs, labels, where, ids = [], [], [], [], []
    labelled = not split.startswith("test")
    for i in range(len(source)):
        ex = source[i]
        text = [_text(ex[c]) for c in t.tfds_columns]
        texts.append(text[0])
        if len(text) > 1:
            pairs.append(text[1])
        label = ex["label"].item() if hasattr(ex["label"], "item") else ex["label"]
        at = f"tfds:{name}:{split} example {i}"
        if labelled and not t.regression and not 0 <= int(label) < t.num_classes:
            raise DataError(f"{at}: label {label!r} is not a class of {t.name} "
                            f"(0..{t.num_classes - 1})")
        labels.append(label if labelled else 0)
        where.append(at)
        ids.append(str(ex["idx"].item() if hasattr(ex["idx"], "item") else ex["idx"]))
    dtype = np.float32 if t.regression else np.int32
    return Labelled(f"glue:{t.name}:{split}", texts, pairs if len(t.tfds_columns) > 1 else None,
                    np.asarray(labels, dtype), where), ids


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
