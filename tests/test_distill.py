"""Knowledge distillation (config.train.objective=distill): the loss equals a hand-written
reference and reduces to the plain loss at alpha = 0; a run with a teacher from an export
resumes bitwise and never changes the teacher; a teacher whose predictions do not compare
is refused before anything is written."""

import jax
import numpy as np
import pytest
from conftest import random_batch, tiny_bert_config, tiny_config
from test_state import assert_trees_equal, restored

from jaxlm import checkpoint
from jaxlm.errors import ConfigError
from jaxlm.setup import build
from jaxlm.train import loop, objectives
from jaxlm.train.build import build_train


def exported(cfg, folder, seed=7):
    """Random params of `cfg`, written as a params export (a teacher)."""
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(seed))
    checkpoint.export_params(folder, params, checkpoint.make_export_meta(cfg, setup.tokenizer, 0))
    return setup, params


def distill_cfg(teacher, steps=4, **student):
    cfg = tiny_config(**student)
    cfg.train.update(objective="distill", steps=steps)
    cfg.checkpoint.every = 2
    cfg.distill.update(teacher=str(teacher), temperature=2.0, alpha=0.3)
    return cfg


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(student_logits, teacher_logits, targets, weights, T, alpha):
    """The loss as the objective's docstring writes it, in float64 numpy."""
    s, t = (np.asarray(x, np.float64) for x in (student_logits, teacher_logits))
    ce = -np.take_along_axis(log_softmax(s), targets[..., None], -1)[..., 0]
    pt, lt, ls = np.exp(log_softmax(t / T)), log_softmax(t / T), log_softmax(s / T)
    kl = (pt * (lt - ls)).sum(-1)
    return alpha * T ** 2 * (kl * weights).sum() + (1 - alpha) * (ce * weights).sum()


def test_causal_loss_equals_the_reference_and_alpha_zero_the_plain_loss(tmp_path):
    teacher, teacher_params = exported(tiny_config(d_model=16, num_heads=2, mlp_dim=32),
                                       tmp_path / "teacher")
    cfg = distill_cfg(tmp_path / "teacher")
    run = build_train(cfg, jax.devices()[:1])
    objective = run.objective
    assert isinstance(objective, objectives.Distill) and objective.metrics[-1] == "distill_kl"
    student = run.setup
    params = jax.jit(student.init_params)(jax.random.PRNGKey(0))
    batch = jax.tree_util.tree_map(np.asarray, random_batch(cfg))
    aux = {"teacher": teacher_params}
    total, (weight, metrics) = objective.loss(student.model, params, batch, jax.random.PRNGKey(0),
                                              deterministic=True, aux=aux)
    apply = lambda s, p: s.model.apply({"params": p}, batch["inputs"])  # noqa: E731
    want = reference(apply(student, params), apply(teacher, teacher_params), batch["targets"],
                     batch["weights"], 2.0, 0.3)
    assert float(total) == pytest.approx(want, rel=1e-5)
    assert float(weight) == batch["weights"].sum() and float(metrics["distill_kl"]) > 0
    objective.alpha = 0.0
    plain = objectives.CausalLM(cfg.data.seq_len, cfg.data.packing).loss(
        student.model, params, batch, jax.random.PRNGKey(0), deterministic=True)
    zero = objective.loss(student.model, params, batch, jax.random.PRNGKey(0), deterministic=True,
                          aux=aux)
    assert float(zero[0]) == float(plain[0])


def test_classifier_loss_equals_the_reference(tmp_path):
    """A fine-tuned BERT classifier teaching a narrower one (class logits, one per example)."""
    tcfg = tiny_bert_config(num_classes=3, d_model=16, num_heads=2, mlp_dim=32)
    teacher, teacher_params = exported(tcfg, tmp_path / "teacher")
    cfg = tiny_bert_config(num_classes=3)
    cfg.train.objective = "distill"
    cfg.distill.update(teacher=str(tmp_path / "teacher"), temperature=3.0, alpha=0.6)
    student = build(cfg, jax.devices()[:1])
    objective = objectives.make_objective(cfg, student.tokenizer)
    objective.with_teacher(teacher.model, teacher.abstract_params)
    params = jax.jit(student.init_params)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 200, (4, cfg.data.seq_len)).astype(np.int32)
    batch = {"inputs": tokens, "types": np.zeros_like(tokens), "segments": np.ones_like(tokens),
             "labels": np.array([0, 2, 1, 2], np.int32), "weights": np.ones(4, np.float32)}
    total, _ = objective.loss(student.model, params, batch, jax.random.PRNGKey(0),
                              deterministic=True, aux={"teacher": teacher_params})
    apply = lambda s, p: s.model.apply({"params": p}, tokens, None, batch["segments"],  # noqa: E731
                                       batch["types"], output="classes")
    want = reference(apply(student, params), apply(teacher, teacher_params), batch["labels"],
                     batch["weights"], 3.0, 0.6)
    assert float(total) == pytest.approx(want, rel=1e-5)


def test_a_distilled_run_resumes_bitwise_and_leaves_the_teacher(tmp_path):
    _, teacher_params = exported(tiny_config(d_model=16, num_heads=2, mlp_dim=32), tmp_path / "teacher")
    devices = jax.devices()[:1]
    loop.train(distill_cfg(tmp_path / "teacher", 4), tmp_path / "whole", devices)
    loop.train(distill_cfg(tmp_path / "teacher", 2), tmp_path / "halves", devices)
    loop.train(distill_cfg(tmp_path / "teacher", 4), tmp_path / "halves", devices)
    run = build_train(distill_cfg(tmp_path / "teacher", 4), devices)
    assert_trees_equal(run.aux["teacher"], teacher_params)  # read from the export, as it was
    states = restored(run, [tmp_path / "whole", tmp_path / "halves"], 4)
    assert_trees_equal(states[0], states[1])


@pytest.mark.parametrize("teacher,message", [
    ("", "config.train.objective='distill' needs config.distill.teacher"),
    ("nowhere", "not a jaxlm workdir or params export"),
    ("other_vocab", "has vocab_size 300, the trained model config.model.vocab_size=258"),
    ("bert", "tokenizer"),
])
def test_a_teacher_that_does_not_compare_is_refused_before_anything_is_written(tmp_path, teacher, message):
    if teacher == "other_vocab":
        exported(tiny_config(vocab_size=300), tmp_path / teacher)
    elif teacher == "bert":
        exported(tiny_bert_config(), tmp_path / teacher)
    cfg = distill_cfg(tmp_path / teacher if teacher else "")
    with pytest.raises(ConfigError, match=message):
        loop.train(cfg, tmp_path / "run", jax.devices()[:1])
    assert not (tmp_path / "run").exists()
    cfg.distill.teacher = ""
    cfg.train.objective, cfg.train.loss_chunk = "distill", 8
    with pytest.raises(ConfigError, match="loss_chunk"):
        build_train(cfg, jax.devices()[:1])
