"""lm-evaluation-harness's own task catalog, scored by a jaxlm model (config.evaluate.harness_tasks).

    python -m jaxlm.evaluate --config=FILE --workdir=DIR --config.evaluate.tasks= \
        --config.evaluate.harness_tasks=piqa,gsm8k --config.evaluate.shots=0,5 \
        --config.evaluate.harness_data=gsm8k=data/gsm8k,piqa=data/piqa/validation.jsonl

Every name lm-eval knows (tasks, groups such as mmlu, tags) runs as lm-eval defines it,
through jaxlm's scorer and generator (lm_eval_adapter.JaxlmLM): one lm-eval run per k in
config.evaluate.shots, the first config.evaluate.num_examples documents (lm-eval's --limit).
Nothing is downloaded (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE). A task's data comes from
config.evaluate.harness_data (TASK=PATH: a task file written here includes lm-eval's YAML
as it is and replaces only dataset_path and dataset_kwargs, as evaluate_local does for the
standard tasks), else from the Hugging Face datasets cache (datasets prepared there before).
config.evaluate.harness_include adds a folder of the user's own task YAMLs.

Results: results.json's "harness" section, {task: {kind, metric, source, shots: {k: ...}}},
lm-eval's metrics named `<metric>` (filter "none") or `<filter>/<metric>`, each with its
`_stderr` (None where lm-eval has none); with config.evaluate.log_samples, lm-eval's
samples in WORKDIR/samples/harness_<task>_<k>shot.jsonl. Multi-host: every process runs
the same requests (the model's computations span all hosts); process 0 writes.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pathlib
import sys
import tempfile

import jax

from jaxlm import models, workdir as workdir_lib
from jaxlm.errors import ConfigError, DataError
from jaxlm.evaluate.tasks import REPO

log = logging.getLogger("jaxlm")

MISSING = ("config.evaluate.harness_tasks needs lm-evaluation-harness: pip install "
           "lm_eval==0.4.13 (or the test extra)")
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")


def offline():
    """Nothing downloaded (datasets from local files or the Hugging Face cache only), also
    where `datasets` was imported before; and lm-eval's bootstrap in this process, not in
    forked workers (a fork of a process running JAX threads can hang)."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", DISABLE_MULTIPROC="1")
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        if module in sys.modules:
            for attr in names:
                setattr(sys.modules[module], attr, True)


def local_task_yaml(include, task: str, files: dict, builder: str = "json", unset=()) -> str:
    """An lm-eval task file that includes the task YAML `include` as it is and replaces only
    where the data is: `files` ({split: path or glob}) read by the `datasets` builder
    `builder` (json, csv, parquet, arrow); the config keys in `unset` (e.g. a split the
    files lack) become null."""
    return (f"include: {json.dumps(str(include))}\ntask: {task}\n"
            f"dataset_path: {builder}\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
            + "".join(f"    {split}: {json.dumps(str(path))}\n" for split, path in files.items())
            + "".join(f"{key}: null\n" for key in unset))


def _task_manager(include_paths):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(MISSING) from None
    return TaskManager(include_path=[str(p) for p in include_paths] or None)


def _path(text: str) -> pathlib.Path:
    path = pathlib.Path(text).expanduser()
    return path if path.is_absolute() else (REPO / path).resolve()


def parse_data(entries) -> dict[str, pathlib.Path]:
    """config.evaluate.harness_data ("TASK=PATH", ...) as {task: existing path}."""
    data = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"config.evaluate.harness_data: {entry!r} is not TASK=PATH")
        data[name.strip()] = _path(path.strip())
        if not data[name.strip()].exists():
            raise ConfigError(f"config.evaluate.harness_data: {entry}: no such file or folder")
    return data


def split_files(name: str, path: pathlib.Path, cfg: dict) -> tuple[str, dict[str, str]]:
    """(datasets builder, {split: file or glob}) of `path`: a datasets save_to_disk folder,
    a folder of <split>.<ext> files, or one file, which is the split the task scores (its
    YAML's test_split, else validation_split) unless its stem names another of its splits."""
    where = f"config.evaluate.harness_data: {name}={path}"
    if path.is_dir() and (path / "dataset_dict.json").is_file():    # DatasetDict.save_to_disk
        return "arrow", {d.name: str(d / "*.arrow") for d in sorted(path.iterdir())
                         if d.is_dir() and any(d.glob("*.arrow"))}
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in BUILDERS]
    if not files:
        raise ConfigError(f"{where}: no {'/'.join(BUILDERS)} files")
    if len({BUILDERS[f.suffix] for f in files}) > 1:
        raise ConfigError(f"{where}: files of different formats ({', '.join(f.name for f in files)})")
    named = {cfg.get(key) for key in SPLIT_KEYS} - {None}
    if path.is_file() and path.stem not in named:
        scored = cfg.get("test_split") or cfg.get("validation_split")
        if scored is None:
            raise ConfigError(f"{where}: name the file after the split it holds (one of {sorted(named)})")
        return BUILDERS[path.suffix], {scored: str(path)}
    return BUILDERS[files[0].suffix], {f.stem: str(f) for f in files}


class Harness:
    """The configured harness tasks, found and their data loaded (before the model is
    built: a bad name or data that is not local stops the run before anything runs)."""

    def __init__(self, cfg):
        e = cfg.evaluate
        self.names, self.shots, self.cfg_evaluate = list(e.harness_tasks), list(e.shots), e
        offline()
        data = parse_data(e.harness_data)
        include = [_path(e.harness_include)] if e.harness_include else []
        for folder in include:
            if not folder.is_dir():
                raise ConfigError(f"config.evaluate.harness_include: {folder}: no such folder")
        catalog = _task_manager(include)
        self._unknown(self.names, catalog, "harness_tasks")
        self._unknown(list(data), catalog, "harness_data")
        # Task files pointing at the local data, per process (each host reads its own).
        self._tmp = tempfile.TemporaryDirectory(prefix="jaxlm_harness_")
        self.sources, self.nonstandard = {}, {}
        for name, path in data.items():
            entry = catalog.task_index[name]
            if entry.kind.name not in ("TASK", "PY_TASK") or entry.yaml_path is None:
                raise ConfigError(f"config.evaluate.harness_data: {name} is an lm-eval "
                                  f"{entry.kind.name.lower()}: give data for its tasks")
            self._write_local(name, path, entry)
        self.catalog = _task_manager(include + [pathlib.Path(self._tmp.name)]) if data else catalog
        self.kinds = {}
        for name in self.names:
            self.kinds[name] = self._load(name)
            if self.kinds[name] == "generate_until" and not models.family(cfg.model.arch).causal:
                raise ConfigError(f"config.evaluate.harness_tasks: {name} generates text, which "
                                  f"a masked LM (config.model.arch={cfg.model.arch!r}) does not do")

    @staticmethod
    def _unknown(names, catalog, field):
        unknown = [n for n in names if n not in catalog.all_tasks]
        if unknown:
            near = sorted({m for n in unknown for m in difflib.get_close_matches(n, catalog.all_tasks, 5)})
            raise ConfigError(f"config.evaluate.{field}: unknown lm-eval task(s) {unknown}"
                              + (f" (near: {', '.join(near)})" if near else
                                 " (lm-eval's list: lm-eval ls tasks)"))

    def _write_local(self, name, path, entry):
        cfg = entry.cfg or {}
        builder, files = split_files(name, path, cfg)
        unset, notes = [], []
        for key in SPLIT_KEYS:
            if cfg.get(key) is not None and cfg[key] not in files:
                unset.append(key)
        scored = cfg.get("test_split") or cfg.get("validation_split")
        if "test_split" in unset and cfg.get("validation_split") in files:
            notes.append(f"scored on {cfg['validation_split']}: lm-eval's {name} scores {scored}")
        elif scored is not None and scored not in files:
            raise ConfigError(f"config.evaluate.harness_data: {name}={path} has no {scored} split "
                              f"(the split lm-eval's {name} scores; found: {', '.join(files)})")
        if {"training_split", "fewshot_split"} & set(unset):
            notes.append("no " + "/".join(cfg[k] for k in ("fewshot_split", "training_split")
                                          if k in unset) + " split: lm-eval draws the "
                         "demonstrations from the next split there is (validation, else test)")
        folder = pathlib.Path(self._tmp.name)
        (folder / f"{name}.yaml").write_text(local_task_yaml(entry.yaml_path, name, files, builder, unset))
        self.sources[name], self.nonstandard[name] = str(path), notes

    def _load(self, name) -> str:
        """Loads `name`'s data as lm-eval will (offline); its output_type ("group" for groups)."""
        try:
            loaded = self.catalog.load([name])
        except Exception as err:  # datasets raises many kinds; the first line says which
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            not_local = isinstance(err, (ConnectionError, FileNotFoundError)) or any(
                w in text for w in ("offline", "Offline", "Couldn't reach", "doesn't exist on the Hub"))
            if not_local and name not in self.sources:
                kind = self.catalog.task_index[name].kind.name
                how = f"{name}=PATH" if kind in ("TASK", "PY_TASK") else f"TASK=PATH for the tasks of {name}"
                raise DataError(f"config.evaluate.harness_data: the data of lm-eval's {name} is not "
                                f"local (nothing is downloaded): give it as {how}, or prepare "
                                f"it in the Hugging Face datasets cache ({text})") from None
            raise DataError(f"config.evaluate.harness_data: {name}"
                            f"{'=' + self.sources[name] if name in self.sources else ''}: {text}") from None
        for task_name, task in loaded["tasks"].items():  # a group's tasks too
            if task_name not in self.sources:
                ds, subset = task.get_config("dataset_path"), task.get_config("dataset_name")
                self.sources[task_name] = f"hf:{ds}" + (f"/{subset}" if subset else "")
        return loaded["tasks"][name].get_config("output_type") if name in loaded["tasks"] else "group"

    def run(self, lm, samples_dir: pathlib.Path | None = None) -> dict:
        """{task: {kind, metric, source, num_examples, shots: {k: metrics}}} for every task and
        group lm-eval reports (a group's members included)."""
        import lm_eval
        from lm_eval.utils import handle_non_serializable
        e = self.cfg_evaluate
        results: dict[str, dict] = {}
        for k in self.shots:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=self.names, task_manager=self.catalog, num_fewshot=k,
                limit=e.num_examples, log_samples=bool(samples_dir), fewshot_random_seed=e.fewshot_seed)
            for name, metrics in res["results"].items():
                n = res.get("n-samples", {}).get(name, {}).get("effective")
                r = results.setdefault(name, {
                    "kind": res["configs"].get(name, {}).get("output_type", "group"),
                    "metric": None, "chance": None, "num_examples": n,
                    "source": self.sources.get(name, "group"), "shots": {}})
                shot = {"k": k, "num_examples": n, **_metrics(metrics)}
                if notes := self.nonstandard.get(name):
                    shot["nonstandard"] = notes
                r["metric"] = r["metric"] or next((m for m in shot if f"{m}_stderr" in shot), None)
                r["shots"][str(k)] = shot
                log.info("harness %-16s k=%d  %s", name, k, ", ".join(
                    f"{m} {shot[m]:.4f}" for m in shot if f"{m}_stderr" in shot and shot[m] is not None))
            if samples_dir is not None and jax.process_index() == 0:
                samples_dir.mkdir(parents=True, exist_ok=True)
                for name, samples in res.get("samples", {}).items():
                    workdir_lib.write_text(
                        samples_dir / f"harness_{name}_{k}shot.jsonl",
                        "".join(json.dumps(s, default=handle_non_serializable) + "\n" for s in samples))
        return results


def _metrics(task_results: dict) -> dict:
    """lm-eval's "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": ...
    as {"acc": 0.5, "acc_stderr": 0.1, "strict-match/exact_match": ...}; "N/A" as None."""
    out = {}
    for key, value in task_results.items():
        metric, sep, filt = key.partition(",")
        if not sep:
            continue  # alias, name, sample_len
        stderr = metric.endswith("_stderr")
        metric = metric.removesuffix("_stderr")
        name = (metric if filt == "none" else f"{filt}/{metric}") + ("_stderr" if stderr else "")
        out[name] = float(value) if isinstance(value, (int, float)) else None
    return out


def prepare(cfg) -> Harness | None:
    return Harness(cfg) if cfg.evaluate.harness_tasks else None
