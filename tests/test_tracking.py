"""Weights & Biases beside TensorBoard (config.logging.wandb, jaxlm.tracking): what a run
sends, one W&B run per workdir across resumes and evaluation, and a real offline run."""

import importlib.util
import json
import sys
import types

import pytest
from test_bad_input import refused
from test_main import run

from jaxlm.runlog import read_history


class FakeRun:
    def __init__(self, calls, kwargs):
        self.calls, self.kwargs, self.summary = calls, kwargs, {}

    def log(self, data, step):
        self.calls.append(("log", self.kwargs["id"], step, data))

    def finish(self):
        self.calls.append(("finish", self.kwargs["id"], None, dict(self.summary)))


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in wandb that records every call (what jaxlm sends is what is checked)."""
    calls = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.util.spec_from_loader("wandb", loader=None)
    module.init = lambda **kwargs: calls.append(("init", kwargs["id"], None, kwargs)) or FakeRun(calls, kwargs)
    module.Table = lambda columns, data: {"columns": columns, "data": data}
    module.Image = lambda path: {"image": path}
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_a_run_its_resume_and_its_evaluation_are_one_wandb_run(fake_wandb, tmp_path):
    args = ("--config.logging.wandb=true", "--config.checkpoint.every=4", "--config.train.log_every=2")
    run(tmp_path, "--config.train.steps=4", *args, evaluate=False)
    run(tmp_path, "--config.train.steps=8", *args)  # resumes, then evaluates
    run_id = (tmp_path / "wandb_id").read_text().strip()
    inits = [c[3] for c in fake_wandb if c[0] == "init"]
    assert [i["job_type"] for i in inits] == ["train", "train", "evaluate"]
    assert {i["id"] for i in inits} == {run_id} and all(i["resume"] == "allow" for i in inits)
    assert inits[0]["config"]["train"]["steps"] == 4 and inits[0]["name"] == tmp_path.name
    # every metrics.jsonl record went to W&B at its step, in order
    sent = [(step, data) for kind, _, step, data in fake_wandb if kind == "log" and "loss" in data]
    assert [(s, d["loss"]) for s, d in sent] == [(h["step"], h["loss"]) for h in read_history(tmp_path)]
    assert [s for s, _ in sent] == [2, 4, 6, 8]
    # the few-shot table at the checkpoint's step: rows equal results.json
    results = json.loads((tmp_path / "results.json").read_text())
    (table,) = [d["fewshot"] for kind, _, step, d in fake_wandb if kind == "log" and "fewshot" in d]
    expected = {(t, "acc" if "acc" in r else "exact_match", int(k)) for t, task in results["tasks"].items()
                for k, r in task["shots"].items()}
    rows = {(row[0], row[1], row[2]): row[3] for row in table["data"]}
    assert expected <= set(rows)
    for t, task in results["tasks"].items():
        for k, r in task["shots"].items():
            metric = task["metric"]
            assert rows[t, metric, int(k)] == r[metric]
    images = [d for kind, _, step, d in fake_wandb if kind == "log" and "plots/fewshot" in d]
    assert images and images[0]["plots/fewshot"]["image"].endswith("fewshot.png")
    assert [c[0] for c in fake_wandb].count("finish") == 3


def test_wandb_without_the_package_is_refused_before_anything(tmp_path, monkeypatch):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find(name, *a))
    refused("train", tmp_path / "new", "--config.logging.wandb=true",
            match="config.logging.wandb=true needs the wandb package")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed "
                    "(pip install -e '.[test]' installs it)")
def test_a_real_offline_run_is_continued_on_resume(tmp_path, monkeypatch):
    """wandb itself, offline (nothing leaves the machine): each start of the workdir writes
    an offline run of the same id under WORKDIR/wandb."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ("--config.logging.wandb=true", "--config.logging.wandb_mode=offline")
    run(tmp_path, "--config.train.steps=2", *args, evaluate=False)
    run(tmp_path, "--config.train.steps=4", *args, evaluate=False)
    run_id = (tmp_path / "wandb_id").read_text().strip()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), runs
    assert all((tmp_path / "wandb" / r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)
