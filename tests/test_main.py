"""The main job end to end in a tiny config: pretrain -> checkpoint -> few-shot eval -> outputs;
resuming; refusing a workdir that holds another model."""

import hashlib
import importlib
import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest
from conftest import REPO

from jaxlm import checkpoint, cli
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import CheckpointError
from jaxlm.evaluate.tasks.synthetic import NAMES as TASK_NAMES
from jaxlm.runlog import read_history
from jaxlm.train.build import build_train

TINY = ["--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=4",
        "--config.model.mlp_dim=64", "--config.model.max_len=128", "--config.data.seq_len=64",
        "--config.train.batch_size=8", "--config.train.log_every=4",
        "--config.optimizer.warmup_steps=2", "--config.evaluate.num_examples=6",
        "--config.evaluate.batch_size=8", "--config.evaluate.num_samples=2",
        "--config.evaluate.sample_len=16", "--config.evaluate.max_new_tokens=8"]


COMMANDS = {(True, True): "jaxlm.main", (True, False): "jaxlm.train.__main__",
            (False, True): "jaxlm.evaluate.__main__"}


def argv(workdir, *extra):
    return [f"--config={REPO}/configs/gpt/debug.py", f"--workdir={workdir}", *TINY, *extra]


def run(workdir, *extra, train=True, evaluate=True):
    """The command `python -m jaxlm.main` (or its train / evaluate half) in this process."""
    command = importlib.import_module(COMMANDS[train, evaluate])
    return cli.run(command.main, argv(workdir, *extra))


def tree_digest(path: pathlib.Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_main_job_writes_results_plots_and_resumes(tmp_path):
    out = run(tmp_path, "--config.train.steps=8", "--config.checkpoint.every=4")
    assert out["train"]["step"] == 8 and out["train"]["compiles"] == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["step"] == 8
    assert set(results["tasks"]) == set(TASK_NAMES)
    for name, task in results["tasks"].items():
        assert set(task["shots"]) == {"0", "1", "4", "8"}
        assert 0.0 < task["chance"] < 1.0 and task["num_examples"] == 6
        for r in task["shots"].values():
            assert 0.0 <= r[task["metric"]] <= 1.0 and r["num_examples"] == 6
    assert len(results["samples"]) == 2
    for png in ("loss.png", "fewshot.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert [h["step"] for h in read_history(tmp_path)] == [4, 8]

    # Same workdir again: resumes at step 8, trains nothing, evaluates the same weights.
    again = run(tmp_path, "--config.train.steps=8", "--config.checkpoint.every=4")
    assert again["train"]["step"] == 8
    assert again["evaluate"]["tasks"] == results["tasks"]


def test_resume_matches_uninterrupted_run(tmp_path):
    """Drop the final checkpoint of a 12-step run and resume from step 6: the resumed run
    ends with bitwise the same parameters and logs the same losses."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ("--config.train.steps=12", "--config.checkpoint.every=6", "--config.train.log_every=2")
    run(full, *args, evaluate=False)
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")
    history = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(history[:3]) + "\n")  # steps 2, 4, 6
    run(resumed, *args, evaluate=False)

    losses = lambda d: [(h["step"], h["loss"], h["grad_norm"]) for h in read_history(d)]
    assert losses(full) == losses(resumed) and len(losses(full)) == 6
    assert all(h["perplexity"] == pytest.approx(math.exp(h["loss"])) for h in read_history(full))
    states = []
    for d in (full, resumed):
        ckpt = checkpoint.Checkpointer(d)
        step = build_train(cli.parse(argv(d, *args), "test", "").config)
        states.append(ckpt.restore(12, step.abstract_state, step.state_shardings)[0])
        ckpt.close()
    jax.tree_util.tree_map(np.testing.assert_array_equal, states[0].params, states[1].params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, states[0].opt_state, states[1].opt_state)


def test_workdir_of_another_model_is_refused_and_untouched(tmp_path):
    run(tmp_path, "--config.train.steps=2", evaluate=False)
    before = tree_digest(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--config.train.steps=4", "--config.model.num_layers=3")
    assert exit_info.value.code == 2
    assert tree_digest(tmp_path) == before


def test_mismatch_message_names_the_field(tmp_path):
    run(tmp_path, "--config.train.steps=2", evaluate=False)
    cfg = cli.parse(argv(tmp_path, "--config.model.d_model=64"), "test", "").config
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"config.model.d_model is 32 there and 64 here"):
        ckpt.check_compatible(cfg, get_tokenizer("byte"))
    ckpt.close()


def test_evaluate_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, train=False)
    assert "no checkpoint to evaluate" in capsys.readouterr().err


def test_pmap_training_loop_matches_jit_loop(tmp_path):
    """The whole loop (data placement, replicated state, checkpoint of the unreplicated
    state) under config.parallelism=pmap logs the same losses as the jit loop."""
    args = ("--config.train.steps=6", "--config.train.log_every=2", "--config.checkpoint.every=3")
    run(tmp_path / "jit", *args, evaluate=False)
    run(tmp_path / "pmap", *args, "--config.parallelism=pmap", evaluate=False)
    jit, pmap = read_history(tmp_path / "jit"), read_history(tmp_path / "pmap")
    assert [h["step"] for h in jit] == [h["step"] for h in pmap] == [2, 4, 6]
    np.testing.assert_allclose([h["loss"] for h in pmap], [h["loss"] for h in jit], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "pmap" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["3", "6"]
