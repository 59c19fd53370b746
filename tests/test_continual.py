"""Continued pretraining (config.train.init, jaxlm.train.init): a run that starts from
another run's params with a fresh optimizer and a re-warmed learning rate."""

import jax
import numpy as np
import pytest
from test_bad_input import command, refused
from test_main import argv, run, tree_digest

from jaxlm import checkpoint, cli
from jaxlm.train.build import build_train


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GPT trained 4 steps: the model to continue from."""
    workdir = tmp_path_factory.mktemp("base")
    run(workdir, "--config.train.steps=4", evaluate=False)
    return workdir


def state_at(workdir, step, *args):
    ckpt = checkpoint.Checkpointer(workdir)
    train_step = build_train(cli.parse(argv(workdir, *args), "test", "").config)
    state = ckpt.restore(step, train_step.abstract_state, train_step.state_shardings)[0]
    ckpt.close()
    return state


def test_a_continued_run_starts_from_the_params_with_a_fresh_optimizer(base, tmp_path):
    """The learning rate re-warms from 0, so the first step leaves the params as they were:
    equal to the base run's bit for bit, while the step counter and Adam's moments start
    anew (the first step's moments are not the base run's)."""
    args = ("--config.train.steps=2", "--config.checkpoint.every=1",
            f"--config.train.init={base}")
    run(tmp_path, *args, evaluate=False)
    before, after = state_at(base, 4, "--config.train.steps=4"), state_at(tmp_path, 1, *args)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before.params, after.params)
    assert int(after.step) == 1
    count = jax.tree_util.tree_leaves(after.opt_state)
    assert any(int(x) == 1 for x in count if np.ndim(x) == 0)  # Adam's count restarted


def test_a_continued_run_resumes_exactly(base, tmp_path):
    """Once it has a checkpoint, the run resumes from it (resume > init): stopping at step 2
    and going on to 4 ends where a straight run to 4 ends."""
    init = f"--config.train.init={base}"
    run(tmp_path / "straight", "--config.train.steps=4", init, evaluate=False)
    run(tmp_path / "split", "--config.train.steps=2", "--config.checkpoint.every=2", init,
        evaluate=False)
    run(tmp_path / "split", "--config.train.steps=4", init, evaluate=False)
    a = state_at(tmp_path / "straight", 4, "--config.train.steps=4")
    b = state_at(tmp_path / "split", 4, "--config.train.steps=4")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)


@pytest.mark.parametrize("args,match", [
    (["--config.train.init={tmp}/nothing"], "config.train.init="),
    (["--config.train.init={base}", "--config.model.d_model=64"],
     "config.model.d_model is 32 there and 64 here"),
    (["--config.finetune.init={base}"], "config.finetune.init="),
])
def test_a_bad_init_is_refused_before_writing(base, tmp_path, args, match):
    error = refused("train", tmp_path / "new", *[a.format(tmp=tmp_path, base=base) for a in args],
                    match=match)
    assert not (tmp_path / "new").exists(), error


def test_the_base_run_is_only_read(base, tmp_path):
    before = tree_digest(base)
    code, errors = command("train", *argv(tmp_path, "--config.train.steps=2",
                                          f"--config.train.init={base}"))
    assert code == 0, errors
    assert tree_digest(base) == before

