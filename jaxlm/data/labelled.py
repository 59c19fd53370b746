"""Labelled text for sequence classification (fine-tuning), read by global index like the
language-model sources, so a fine-tuning run resumes exactly on any number of hosts.

Where the examples come from (`config.finetune.train_data` / `validation_data`):
  PATH.csv | PATH.tsv   a header row, then one example per row (PATH[a:b]: examples a..b-1
                        of the file, for splitting one file);
  glue:TASK:SPLIT       a GLUE task's split, e.g. glue:mrpc:train: read by jaxlm.data.glue
                        (which builds on this module; jaxlm.finetune passes such specs there);
  PATH.jsonl            one JSON object per line;
                        fields config.finetune.text_field, pair_field (sentence pairs;
                        "" = single sentences) and label_field. A label is a class number
                        0..C-1, or one of config.finetune.class_names (a real number when
                        config.model.num_classes = 1: a regression head).
  tfds:NAME:SPLIT       a prepared TFDS dataset, e.g. tfds:glue/sst2:validation or
                        tfds:imdb_reviews:train (the same field settings; nothing downloaded).
  synthetic:facts:SPLIT the built-in check of memorised facts (jaxlm.data.synthetic): "Bako
                        lives in Tesmor." is true (1) or false (0) in the synthetic world; its
                        train and validation splits share no (entity, attribute) pair.
  synthetic:rules:SPLIT which of the world's 6 in-context rules a line "kaz -> kAz" applies,
                        on words the corpus never uses; train and validation words differ.

Every problem is a DataError naming the file and line (or the dataset and example): a
missing field, an empty text, a label outside the classes.

Encoding (`Encoder`): a family that classifies from a pooled first token (BERT:
models.Family.pooled) reads "[CLS] a [SEP]" or "[CLS] a [SEP] b [SEP]" with token type 0 up
to the first [SEP] and 1 after; GPT reads "EOS a" or "EOS a EOS b" and classifies at its
last token. A text longer than config.data.seq_len is cut, the longer of the two parts
first ("longest first", as BERT's reference code does), and counted (`Encoder.truncated`).

Training examples may be augmented (config.finetune.augment, jaxlm.data.augment): word
deletion, swap, insertion and span masking on each text's ids, drawn from (seed, epoch,
example), then laid out again by the encoder; validation and evaluation never are.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import pathlib
import re

import numpy as np

from jaxlm.data import augment as augment_lib
from jaxlm.data import synthetic
from jaxlm.data.text_files import decode_utf8
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import ConfigError, DataError

_EPOCH_STREAM = 4  # seed-sequence tag of the epoch order (LM sources use 1 and 2)


@dataclasses.dataclass
class Labelled:
    """Examples: texts, optional second texts, integer labels, and where each one is."""
    name: str
    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray
    where: list[str]     # "file:line" of each example, for messages

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, n: int) -> Labelled:
        """The first n examples (n = 0: all): "few labels" experiments."""
        if not n or n >= len(self):
            return self
        return Labelled(self.name, self.texts[:n], self.pairs[:n] if self.pairs else None,
                        self.labels[:n], self.where[:n])


def read(spec: str, cfg_ft, num_classes: int, data_dir: str = "") -> Labelled:
    """The examples `spec` names (see the module docstring), checked."""
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        task, _, split = rest.partition(":")
        makers = {"facts": synthetic_facts, "rules": synthetic_rules}
        if task not in makers or split not in ("train", "validation"):
            raise ConfigError("expected synthetic:facts:SPLIT or synthetic:rules:SPLIT, SPLIT "
                              "train or validation")
        data = makers[task](split)
        if task == "rules" and num_classes != len(synthetic.DEFAULT_RULES):
            raise ConfigError(f"the rules task has {len(synthetic.DEFAULT_RULES)} classes, and "
                              f"config.model.num_classes={num_classes}")
        return data
    if kind == "tfds":
        name, _, split = rest.rpartition(":")
        return _read_tfds(name, split, data_dir, cfg_ft, num_classes, spec)
    piece = re.fullmatch(r"(.*)\[([^\]]*)\]", spec)  # FILE[a:b]: a slice of the examples
    if piece and not re.fullmatch(r"\d*:\d*", piece.group(2)):
        raise ConfigError(f"[{piece.group(2)}]: a slice of the examples is [a:b] with whole "
                          "numbers 0 <= a < b, either one may be left out (e.g. data.csv[0:1000])")
    path = pathlib.Path(piece.group(1) if piece else spec).expanduser()
    if path.suffix not in (".csv", ".tsv", ".jsonl"):
        raise ConfigError("expected a .csv, .tsv or .jsonl file, tfds:NAME:SPLIT or "
                          "synthetic:TASK:SPLIT")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = _jsonl_rows(path) if path.suffix == ".jsonl" else _table_rows(path)
    if piece:
        start, stop = (int(x) if x else None for x in piece.group(2).split(":"))
        if start is not None and stop is not None and start >= stop:
            raise ConfigError(f"[{piece.group(2)}]: the slice is empty (a >= b)")
        rows = itertools.islice(rows, start or 0, stop)
    return _checked(spec, rows, cfg_ft, num_classes)


def _jsonl_rows(path: pathlib.Path):
    data = path.read_bytes()
    for n, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            try:
                record = json.loads(decode_utf8(line, path, n))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object")
            yield f"{path}:{n}", record


def _table_rows(path: pathlib.Path):
    text = decode_utf8(path.read_bytes(), path)
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ",")
    for record in reader:
        where = f"{path}:{reader.line_num}"  # the record's last line (a quoted field may span lines)
        if None in record:  # DictReader keeps the fields past the header's under None
            raise DataError(f"{where}: {len(reader.fieldnames) + len(record[None])} fields, the "
                            f"header has {len(reader.fieldnames)} (a field holding the "
                            "delimiter needs quotes)")
        yield where, record


def _label(value, where: str, cfg_ft, num_classes: int) -> int | float:
    if num_classes == 1:  # a regression head: any finite number
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = float("nan")
        if not np.isfinite(score) or isinstance(value, bool):
            raise DataError(f"{where}: label {value!r} is not a number (config.model."
                            "num_classes=1: a regression target)")
        return score
    names = list(cfg_ft.class_names)
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    try:
        label = int(value)
        ok = str(value).strip() == str(label) and 0 <= label < num_classes
    except (TypeError, ValueError):
        ok = False
    if not ok:
        allowed = f"0..{num_classes - 1}" + (f" or one of {names}" if names else "")
        raise DataError(f"{where}: label {value!r} is not a class of config.model.num_classes="
                        f"{num_classes} ({allowed})")
    return label


def _checked(name: str, rows, cfg_ft, num_classes: int) -> Labelled:
    texts, pairs, labels, where = [], [], [], []
    fields = [cfg_ft.text_field, cfg_ft.label_field] + ([cfg_ft.pair_field] if cfg_ft.pair_field else [])
    for at, record in rows:
        for f in fields:
            if f not in record or record[f] is None:
                raise DataError(f"{at}: no field {f!r} (config.finetune.{_which(cfg_ft, f)}); "
                                f"the example has {sorted(record)}")
        for f in fields[:1] + fields[2:]:
            if not isinstance(record[f], str) or not record[f].strip():
                raise DataError(f"{at}: field {f!r} is empty")
        texts.append(record[cfg_ft.text_field])
        if cfg_ft.pair_field:
            pairs.append(record[cfg_ft.pair_field])
        labels.append(_label(record[cfg_ft.label_field], at, cfg_ft, num_classes))
        where.append(at)
    if not texts:
        raise DataError(f"{name}: no examples")
    return Labelled(name, texts, pairs if cfg_ft.pair_field else None,
                    np.asarray(labels, np.float32 if num_classes == 1 else np.int32), where)


def _which(cfg_ft, field: str) -> str:
    return next(k for k in ("text_field", "pair_field", "label_field") if cfg_ft[k] == field)


def _read_tfds(name: str, split: str, data_dir: str, cfg_ft, num_classes: int,
               spec: str) -> Labelled:
    from jaxlm.data.tfds_split import builder_for
    builder = builder_for(name, data_dir, "the TFDS dataset")
    if split.split("[")[0] not in builder.info.splits:
        raise ConfigError(f"{name} has splits {sorted(builder.info.splits)}")
    source = builder.as_data_source(split=split)

    def rows():
        for i in range(len(source)):
            ex = source[i]
            yield f"{spec} example {i}", {k: (v.decode("utf-8") if isinstance(v, bytes) else
                                              v.item() if hasattr(v, "item") else v)
                                          for k, v in ex.items()}
    return _checked(spec, rows(), cfg_ft, num_classes)


def synthetic_facts(split: str, seed: int = 0) -> Labelled:
    """True and false fact sentences about the synthetic world (balanced): 1 if the
    world holds it, 0 if the value is another entity's. The (entity, attribute) pairs are
    split 3:1 into train and validation, so validation asks about facts no label taught."""
    world = synthetic.World(seed)
    rng = world.rng("facts_check")
    pairs = [(e, a) for e in world.entities for a in synthetic.FACT_PHRASINGS]
    order = rng.permutation(len(pairs))
    cut = len(pairs) * 3 // 4
    chosen = order[:cut] if split == "train" else order[cut:]
    texts, labels = [], []
    for n, i in enumerate(chosen):
        entity, attr = pairs[i]
        prompt, ending = synthetic.fact_prompt(attr, entity.name)
        truth = n % 2 == 0
        value = entity.facts[attr]
        if not truth:
            others = [v for v in world.attribute_values[attr] if v != value]
            value = others[int(rng.integers(len(others)))]
        texts.append(f"{prompt} {value}{ending}")
        labels.append(int(truth))
    where = [f"synthetic:facts:{split} example {i}" for i in range(len(texts))]
    return Labelled(f"synthetic:facts:{split}", texts, None, np.asarray(labels, np.int32), where)


def synthetic_rules(split: str, seed: int = 0, count: int = 600) -> Labelled:
    """Lines "kaz -> kAz" of the synthetic world's in-context rules, labelled by the rule
    (6 classes, balanced), on held-out words (never in the corpus) for which every rule
    gives a different output; train and validation words differ."""
    world = synthetic.World(seed)
    rng = world.rng(f"rules_check_{split}")
    taken = set() if split == "train" else set(synthetic_rules("train", seed, count).texts)
    texts, labels = [], []
    while len(texts) < count:
        word = world.random_word(rng, held_out=True)
        rule = world.rules[len(texts) % len(world.rules)]
        line = synthetic.rule_line(word, rule)
        if len({synthetic.RULES[r](word) for r in world.rules}) == len(world.rules) and \
                not any(line.split(" ->")[0] == t.split(" ->")[0] for t in taken) and line not in texts:
            texts.append(line)
            labels.append(world.rules.index(rule))
    where = [f"synthetic:rules:{split} example {i}" for i in range(len(texts))]
    return Labelled(f"synthetic:rules:{split}", texts, None, np.asarray(labels, np.int32), where)


class Encoder:
    """Text (and pair) -> tokens, token types and segments of one length (see the module
    docstring); counts what it had to cut."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, *, pooled: bool):
        """`pooled`: the model's models.Family.pooled (it classifies from the first token)."""
        self.tok, self.seq_len = tokenizer, seq_len
        self.truncated = 0
        if pooled:
            if not {"cls", "sep"} <= set(tokenizer.bert_ids):
                raise ConfigError(f"config.data.tokenizer={tokenizer.name!r} has no [CLS]/[SEP] "
                                  "tokens, which BERT's classification input needs")
            self.start, self.sep, self.end = ([tokenizer.bert_ids["cls"]], [tokenizer.bert_ids["sep"]],
                                              [tokenizer.bert_ids["sep"]])
        else:
            self.start, self.sep, self.end = [tokenizer.eos_id], [tokenizer.eos_id], []

    def parts(self, text: str, pair: str | None = None) -> tuple[list[int], list[int] | None]:
        """The token ids of the text (and pair), cut to fit; a cut example is counted."""
        a = self.tok.encode(text)
        b = self.tok.encode(pair) if pair is not None else None
        a, b, cut = self._fit(a, b)
        self.truncated += cut
        return a, b

    def _fit(self, a, b):
        room = self.seq_len - len(self.start) - len(self.end) - (len(self.sep) if b is not None else 0)
        cut = len(a) + len(b if b is not None else []) > room
        while len(a) + len(b if b is not None else []) > room:  # longest first
            if b is not None and len(b) > len(a):
                b = b[:-1]
            else:
                a = a[:-1]
        return a, b, cut

    def assemble(self, a, b=None) -> dict:
        """Tokens, token types and segments of a text's ids (and a pair's), cut to fit
        (longest first, not counted: augmented parts, jaxlm.data.augment, may grow)."""
        a, b, _ = self._fit(list(a), None if b is None else list(b))
        first = self.start + a + (self.sep if b is not None else self.end)
        second = (b + self.end) if b is not None else []
        n = len(first) + len(second)
        tokens = np.full(self.seq_len, self.tok.pad_id, np.int32)
        tokens[:n] = first + second
        types = np.zeros(self.seq_len, np.int32)
        types[len(first):n] = 1
        segments = (np.arange(self.seq_len) < n).astype(np.int32)
        return {"tokens": tokens, "types": types, "segments": segments}

    def __call__(self, text: str, pair: str | None = None) -> dict:
        return self.assemble(*self.parts(text, pair))


class LabelledSource:
    """Encoded examples by global index: example i of epoch e = i // N is example
    perm_e[i mod N], perm_e seeded by (seed, e). With `augment` (config.finetune.augment,
    training sources only) the example is augmented by (seed, e, perm_e[i mod N])
    (jaxlm.data.augment) and laid out again."""

    def __init__(self, data: Labelled, encoder: Encoder, seed: int, augment=None):
        self.data, self.encoder, self.seed = data, encoder, seed
        self.seq_len = encoder.seq_len
        self.parts = [encoder.parts(t, data.pairs[i] if data.pairs else None)
                      for i, t in enumerate(data.texts)]
        self.encoded = [dict(encoder.assemble(*p), label=data.labels[i].item())  # int or float
                        for i, p in enumerate(self.parts)]
        self.augmenter = None
        if augment is not None and augment_lib.active(augment):
            texts = [np.asarray(x, np.int32) for p in self.parts for x in p if x is not None]
            self.augmenter = augment_lib.Augmenter(augment, encoder.tok, seed, texts)
        self._perm = {}

    def __len__(self) -> int:
        return len(self.encoded)

    def example(self, index: int) -> dict:
        epoch, j = divmod(index, len(self))
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, _EPOCH_STREAM, epoch]).permutation(len(self))}
        k = int(self._perm[epoch][j])
        parts = self.augmenter(self.parts[k], epoch, k) if self.augmenter else None
        if parts is None:
            return self.encoded[k]
        return dict(self.encoder.assemble(*parts), label=self.encoded[k]["label"])

    def stats(self) -> dict:
        out = {"name": self.data.name, "documents": len(self), "sequences_per_epoch": None}
        if self.augmenter:
            out["augment"] = self.augmenter.rates
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.data.name, self.seq_len, self.seed]).encode())
        for e in self.encoded:
            label = e["label"]  # a class (as always hashed) or a regression target
            h.update(e["tokens"].tobytes() + (bytes([label % 256]) if isinstance(label, int)
                                              else np.float32(label).tobytes()))
        if self.augmenter:  # unaugmented runs keep the fingerprint they always had
            h.update(self.augmenter.fingerprint().encode())
        return h.hexdigest()[:16]
