"""The task registry: `config.evaluate.tasks` names tasks from here.

Standard benchmarks read local JSONL files in their original field names from
`config.evaluate.data_dir`/<task>/, or with config.evaluate.source=tfds a prepared TFDS
copy where the catalog has one (`TFDS`) (one module per family, each documenting lm-eval's
prompt, delimiters, metrics and where demonstrations come from); the synthetic tasks are
built from the synthetic world of `config.evaluate.world_seed`. Tasks do not depend on the
training data.
"""

from __future__ import annotations

import difflib
import pathlib

from jaxlm.data import synthetic as synthetic_data
from jaxlm.errors import ConfigError
from jaxlm.evaluate.tasks import arc, glue, hellaswag, lambada, piqa, superglue, synthetic, winogrande
from jaxlm.evaluate.tasks.base import JsonlFolder, Task, TfdsDataset, never_own_demonstration

# name -> loader(reader, name) of the standard tasks (a JsonlFolder or TfdsDataset reader)
STANDARD = {
    "hellaswag": hellaswag.load, "piqa": piqa.load, "arc_easy": arc.load,
    "arc_challenge": arc.load, "winogrande": winogrande.load, "lambada_openai": lambada.load,
    "copa": superglue.load_copa, "boolq": superglue.load_boolq, "sst2": glue.load,
}
NAMES = tuple(synthetic.NAMES) + tuple(STANDARD)
# The tasks whose TFDS catalog entry holds lm-eval's data in the original fields. Not
# HellaSwag (TFDS joins ctx_a and ctx_b, which lm-eval's query keeps apart), Winogrande (no
# matching config) or LAMBADA (TFDS has the original release, not OpenAI's).
TFDS = {**piqa.TFDS, **arc.TFDS, **superglue.TFDS, **glue.TFDS}

REPO = pathlib.Path(__file__).resolve().parents[3]


def data_dir(cfg_evaluate) -> pathlib.Path:
    """config.evaluate.data_dir, relative paths from the repository; empty: the shared
    development slices next to the repository (../shared/data/fewshot)."""
    path = pathlib.Path(cfg_evaluate.data_dir or "../shared/data/fewshot").expanduser()
    return path if path.is_absolute() else (REPO / path).resolve()


def get_tasks(cfg_evaluate, names=None) -> dict[str, Task]:
    """The named tasks (default: config.evaluate.tasks), in the order given."""
    names = list(cfg_evaluate.tasks if names is None else names)
    if unknown := [n for n in names if n not in NAMES]:
        near = sorted({m for n in unknown for m in difflib.get_close_matches(n, NAMES, 3, 0.6)
                       + [m for m in NAMES if m.startswith(n)]})
        raise ConfigError(f"config.evaluate.tasks: unknown task(s) {unknown}"
                          + (f" (near: {', '.join(near)})" if near else "")
                          + f"; known tasks: {', '.join(NAMES)}")
    tasks: dict[str, Task] = {}
    if wanted := [n for n in names if n in synthetic.NAMES]:
        built = synthetic.synthetic_tasks(synthetic_data.World(cfg_evaluate.world_seed),
                                          cfg_evaluate.num_examples, cfg_evaluate.seed)
        tasks.update({n: built[n] for n in wanted})
    standard = [n for n in names if n in STANDARD]
    tfds = cfg_evaluate.source == "tfds"
    if tfds and (missing := [n for n in standard if n not in TFDS]):
        raise ConfigError(f"config.evaluate.source='tfds': {', '.join(missing)} has no TFDS copy "
                          f"that matches lm-eval's (those that do: {', '.join(TFDS)}); use the "
                          "JSONL files (source='files')")
    root = data_dir(cfg_evaluate)
    for name in standard:
        if tfds:
            reader = TfdsDataset(TFDS[name][0], cfg_evaluate.tfds_data_dir, TFDS[name][1])
        else:
            reader = JsonlFolder(root / name)
        tasks[name] = STANDARD[name](reader, name)
        if cfg_evaluate.fewshot_exclude_self:
            tasks[name] = never_own_demonstration(tasks[name])
    return {n: tasks[n] for n in names}
