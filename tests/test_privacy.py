"""Differentially private training (config.privacy, jaxlm.train.privacy): per-example
clipping bounds one example's contribution, the DP step reduces to the plain one without
clipping and noise and does not depend on the microbatch split or on jit vs pmap, epsilon
is dp-accounting's for the same settings (logged, in checkpoints and results.json), the
noise follows the seed and survives a resume bit for bit, and every refusal is one line
naming the field, with nothing written."""

import json
import shutil

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, tiny_bert_config, tiny_config
from data_helpers import memory_cache
from dp_accounting import pld, rdp
from test_bad_input import command
from test_main import tree_digest

from jaxlm import checkpoint
from jaxlm import finetune as finetune_lib
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import CheckpointError
from jaxlm.runlog import read_history
from jaxlm.setup import build
from jaxlm.train import loop, objectives, privacy
from jaxlm.train.build import build_train
from jaxlm.train.step import value_and_grad


def dp_config(**privacy_fields):
    """A tiny BERT (one block) classifying the synthetic facts, privately: 32 examples,
    8 rows a step."""
    cfg = tiny_bert_config(num_classes=2, num_layers=1)
    cfg.finetune.update(train_examples=32, epochs=2, batch_size=8, learning_rate=1e-3,
                        class_names=("false", "true"))
    cfg.evaluate.batch_size = 25
    cfg.privacy.update(noise_multiplier=1.0, delta=1e-3, seed=3)
    cfg.privacy.update(**privacy_fields)
    return cfg


def classification_batch(cfg, rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    L = cfg.data.seq_len
    return {"inputs": rng.integers(3, 250, (rows, L)).astype(np.int32),
            "types": np.zeros((rows, L), np.int32), "segments": np.ones((rows, L), np.int32),
            "labels": rng.integers(0, 2, rows).astype(np.int32),
            "weights": np.ones(rows, np.float32)}


# ----------------------------------------------------------------------------- clipping


def test_one_example_adds_at_most_the_clip_norm_and_exactly_its_gradient_below_it():
    cfg = dp_config()
    cfg.train.objective = "classification"
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(0))
    objective = objectives.make_objective(cfg, setup.tokenizer)
    loss = lambda p, b, r, deterministic: objective.loss(setup.model, p, b, r,  # noqa: E731
                                                         deterministic=deterministic)
    batch = jax.tree_util.tree_map(jnp.asarray, classification_batch(cfg, 4))
    without = dict(batch, weights=batch["weights"].at[2].set(0.0))  # example 2 removed
    rng = jax.random.PRNGKey(1)
    plain = jax.jit(value_and_grad(loss))
    unclipped = [plain(params, jax.tree_util.tree_map(lambda x: x[i:i + 1], batch), rng)[1]
                 for i in range(4)]
    norms = [float(optax.tree.norm(g)) for g in unclipped]
    fn = jax.jit(lambda p, b, r, clip: privacy.clipped_value_and_grad(loss, clip)(p, b, r))
    for clip in (min(norms) / 10, 10 * max(norms)):
        (_, (weight, _)), with_k = fn(params, batch, rng, clip)
        (_, (weight_without, _)), without_k = fn(params, without, rng, clip)
        assert (float(weight), float(weight_without)) == (4.0, 3.0)
        contribution = jax.tree_util.tree_map(jnp.subtract, with_k, without_k)
        size = float(optax.tree.norm(contribution))
        assert size <= clip * (1 + 1e-5)
        if clip < min(norms):   # clipped: exactly the clip norm, in its own direction
            assert size == pytest.approx(clip, rel=1e-4)
        else:                   # below the clip: the example's own gradient, unchanged
            assert size == pytest.approx(norms[2], rel=1e-4)
            total = jax.tree_util.tree_map(lambda *g: sum(g), *unclipped)
            for a, b in zip(jax.tree_util.tree_leaves(with_k), jax.tree_util.tree_leaves(total)):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the step


def step_for(cfg, devices):
    step = build_train(cfg, devices)
    return step, step.place_state(step.init_state())


def params_after(step, state, batch, rng):
    state, metrics = step(state, step.place_batch(batch), rng)
    return jax.device_get(step.params(state)), metrics


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def test_dp_step_without_clipping_or_noise_is_the_plain_step_and_any_split_or_pmap_agrees():
    """With a clip no gradient reaches and zero noise over a full batch, DP-SGD's update is
    the plain one (denominator = batch size = example weight); with clipping and noise,
    4 accumulated microbatches on one device (jit) give the update of one row on each of 8
    devices (pmap): accumulation stays per-example exact, and the noise is drawn once,
    not once per device."""
    cfg = dp_config()
    cfg.train.update(objective="classification", batch_size=8)
    # The first step at the peak rate, and Adam near-linear in the gradient (a large eps):
    # float-summation differences of near-zero gradients do not flip Adam's sign-like step.
    cfg.optimizer.update(grad_clip_norm=0.0, warmup_steps=0, eps=1.0)
    batch, rng, one_device = classification_batch(cfg, 8), jax.random.PRNGKey(5), jax.devices()[:1]
    plain_cfg = cfg.copy_and_resolve_references()
    plain_cfg.privacy.noise_multiplier = 0.0
    plain, state = step_for(plain_cfg, one_device)
    want, _ = params_after(plain, state, batch, rng)

    cfg.train.microbatches = 4
    private, state = step_for(cfg, one_device)
    private.set_privacy(1e6, 0.0, 8)  # clip, noise std, denominator: arguments, one compile
    got, _ = params_after(private, state, batch, rng)
    for a, b in zip(leaves(got), leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    private.set_privacy(0.01, 0.5, 4)  # clipping active, noise on
    accumulated, metrics = params_after(private, private.place_state(private.init_state()),
                                        batch, rng)
    cfg.train.microbatches, cfg.parallelism = 1, "pmap"
    pmapped, state = step_for(cfg, None)  # one row on each of the 8 local devices
    pmapped.set_privacy(0.01, 0.5, 4)
    spread, _ = params_after(pmapped, state, batch, rng)
    assert not bool(metrics["nonfinite"])
    for a, b in zip(leaves(spread), leaves(accumulated)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves(accumulated), leaves(want)))
    assert moved > 1e-4  # the noise did change the update


# ----------------------------------------------------------------------------- accounting


def pld_epsilon(n, expected, rows, sigma, steps, delta):
    accountant = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                   value_discretization_interval=privacy.PLD_DISCRETIZATION)
    accountant.compose(dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=n, sampling_probability=expected / n, truncated_batch_size=rows,
        noise_multiplier=sigma), steps)
    return accountant.get_epsilon(delta)


def test_fixed_size_sampling_is_accounted_by_rdp_under_replace_one_and_the_solve_is_tight():
    a = privacy.Accountant("fixed", 1000, 20, 20, 1.3, 1e-5)
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        1000, 20, dp_accounting.GaussianDpEvent(1.3 / 2)), 300)  # sensitivity 2 * clip
    assert a.epsilon(300) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert a.adjacency == "replace one example"

    poisson = privacy.Accountant("poisson", 1000, 40, 20, 1.0, 1e-5)
    sigma = privacy.solve_noise(poisson, 300, 3.0)
    assert pld_epsilon(1000, 20, 40, sigma, 300, 1e-5) <= 3.0
    assert pld_epsilon(1000, 20, 40, sigma - 0.01, 300, 1e-5) > 3.0


def test_sampled_batches_are_poisson_or_fixed_drawn_from_the_key():
    class Source:
        def example(self, i):
            return {"tokens": np.array([i])}
    key = np.array([1, 2], np.uint32)
    fixed = privacy.Sampled(Source(), 100, 10, 10, "fixed", key)
    assert all(len(set(fixed.draw(s))) == 10 for s in range(20))
    poisson = privacy.Sampled(Source(), 100, 10, 5, "poisson", key)
    counts = [len(poisson.draw(s)) for s in range(400)]
    assert max(counts) == 10 and 4.5 < np.mean(counts) < 5.3  # E = 5, cut at 10
    step = next(s for s in range(400) if counts[s] < 10)
    rows = [poisson.make_example(lambda w, i, r: {"weights": np.float32(1)})(None, 10 * step + r)
            for r in range(10)]
    assert [float(r["weights"]) for r in rows] == [1.0] * counts[step] + [0.0] * (10 - counts[step])
    again = privacy.Sampled(Source(), 100, 10, 5, "poisson", key)
    other = privacy.Sampled(Source(), 100, 10, 5, "poisson", np.array([1, 3], np.uint32))
    assert all(np.array_equal(again.draw(s), poisson.draw(s)) for s in range(50))
    assert not all(np.array_equal(other.draw(s), poisson.draw(s)) for s in range(50))


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    """A private fine-tuning run: 32 examples, Poisson 4 per step in 8 rows, 16 steps."""
    path = tmp_path_factory.mktemp("privacy") / "run"
    finetune_lib.finetune(dp_config(), path)
    return path


def test_epsilon_is_dp_accountings_in_metrics_checkpoints_and_results(private_run):
    want = lambda steps: pld_epsilon(32, 4, 8, 1.0, steps, 1e-3)  # noqa: E731
    results = json.loads((private_run / "results.json").read_text())
    dp = results["privacy"]
    assert dp["steps"] == 16 and dp["epsilon"] == pytest.approx(want(16), rel=1e-9)
    assert (dp["sampling"], dp["dataset_size"], dp["expected_batch_size"], dp["rows"]) == \
        ("poisson", 32, 4, 8)
    assert dp["adjacency"] == "add or remove one example"
    logged = {h["step"]: h["epsilon"] for h in read_history(private_run) if "epsilon" in h}
    assert logged and all(e == pytest.approx(want(s), rel=1e-9) for s, e in logged.items())
    ckpt = checkpoint.Checkpointer(private_run, dp_config().checkpoint, read_only=True)
    try:
        meta = ckpt.read_meta(8)
    finally:
        ckpt.close()
    assert meta["privacy"]["epsilon"] == pytest.approx(want(8), rel=1e-9)


def test_resuming_with_other_privacy_settings_is_refused_and_writes_nothing(private_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(private_run, run)
    before = tree_digest(run)
    # (epochs that keep the run at its 16 steps of 8 rows: the steps are checked first)
    for change, epochs, field in (({"noise_multiplier": 2.0}, 2, "noise_multiplier"),
                                  ({"noise_multiplier": 0.0}, 4, "noise_multiplier"),
                                  ({"sampling": "fixed"}, 4, "sampling")):
        cfg = dp_config(**change)
        cfg.finetune.epochs = epochs
        with pytest.raises(CheckpointError, match=f"config.privacy.{field}="):
            finetune_lib.finetune(cfg, run)
    assert tree_digest(run) == before


def train_privately(cfg, workdir):
    """loop.train of the fine-tuning run (no validation: faster); returns its run config."""
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    source, _ = finetune_lib._sources(cfg, tokenizer)
    run = finetune_lib.run_config(cfg, len(source))
    run.train.log_every = 1
    loop.train(run, workdir, hooks=loop.Hooks(source=source))
    return run


def final_params(run, workdir):
    cfg = run.copy_and_resolve_references()
    cfg.checkpoint.step = run.train.steps
    params, _ = checkpoint.load_params(cfg, build(cfg), workdir)
    return jax.device_get(params)


def test_noise_follows_the_seed_and_a_resume_is_bitwise_exact(tmp_path):
    """seed -1 (a secret key from the OS, kept in the checkpoints): two runs differ; a run
    stopped halfway and resumed ends bit for bit where the straight one does."""
    cfg = dp_config(seed=-1)  # 16 steps, a checkpoint at 8
    run = train_privately(cfg, tmp_path / "a")
    train_privately(cfg, tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(run.train.steps))
    kept = [ln for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["step"] <= run.checkpoint.every]
    (tmp_path / "resumed" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    train_privately(cfg, tmp_path / "resumed")
    a, b, resumed = (final_params(run, tmp_path / w) for w in ("a", "b", "resumed"))
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(resumed)))
    assert not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    def norms(workdir):
        return [h["grad_norm"] for h in read_history(tmp_path / workdir) if "grad_norm" in h]
    assert norms("a") == norms("resumed") != norms("b")


def test_private_pretraining_samples_windows_of_the_token_stream(tmp_path):
    """Pretraining a GPT privately: the unit is one window of the stream (N = windows),
    Poisson padding rows carry zero token weights, epsilon reaches the checkpoint."""
    from jaxlm.data.sources import TokenSource
    cfg = tiny_config(num_layers=1)
    cfg.train.update(steps=4, batch_size=8)
    cfg.checkpoint.every = 4
    cfg.privacy.update(noise_multiplier=1.0, delta=1e-3, seed=1)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    docs = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 3 + 1)
            for i in range(60)]
    source = TokenSource(memory_cache(docs, tokenizer), tokenizer, cfg.data.seq_len,
                         packed=False, seed=0)
    summary = loop.train(cfg, tmp_path / "lm", jax.devices()[:1], loop.Hooks(source=source))
    dp = summary["privacy"]
    assert dp["dataset_size"] == source.num_windows and dp["rows"] == 8
    assert dp["expected_batch_size"] == 4 and dp["epsilon"] == pytest.approx(
        pld_epsilon(source.num_windows, 4, 8, 1.0, 4, 1e-3), rel=1e-9)
    plan = privacy.make_plan(cfg, source, None)
    sampled = plan.sampled(source)
    rows = [sampled.make_example(objectives.CausalLM(cfg.data.seq_len, False).example)(
        sampled.example(i), i) for i in range(8)]
    n = len(sampled.draw(0))
    assert [float(r["weights"].sum()) for r in rows[n:]] == [0.0] * (8 - n)
    assert all(float(r["weights"].sum()) == cfg.data.seq_len for r in rows[:n])


# ----------------------------------------------------------------------------- bad input


TINY_FT = ["--config.model.num_layers=2", "--config.model.d_model=32",
           "--config.model.num_heads=4", "--config.model.mlp_dim=64",
           "--config.finetune.train_examples=64", "--config.finetune.epochs=1"]


@pytest.mark.parametrize("module, flags, match", [
    ("jaxlm.finetune", ["--config.privacy.noise_multiplier=-1"],
     "config.privacy.noise_multiplier=-1.0 must be >= 0"),
    ("jaxlm.finetune", ["--config.privacy.noise_multiplier=1", "--config.privacy.delta=0"],
     "config.privacy.delta=0.0 must be in (0, 1)"),
    ("jaxlm.finetune", ["--config.privacy.noise_multiplier=1", "--config.privacy.delta=1"],
     "config.privacy.delta=1.0 must be in (0, 1)"),
    ("jaxlm.finetune", ["--config.privacy.noise_multiplier=1", "--config.privacy.delta=0.1"],
     "config.privacy.delta=0.1 is not below 1 / 64"),
    ("jaxlm.finetune", ["--config.privacy.target_epsilon=0.001"],
     "config.privacy.target_epsilon=0.001 is unreachable in the run's 8 steps"),
    ("jaxlm.finetune", ["--config.privacy.target_epsilon=3", "--config.privacy.noise_multiplier=1"],
     "config.privacy.noise_multiplier=1.0 and config.privacy.target_epsilon=3.0"),
    ("jaxlm.finetune", ["--config.privacy.noise_multiplier=1",
                        "--config.privacy.expected_batch_size=64"],
     "config.privacy.expected_batch_size=64 exceeds the rows of a step"),
    ("jaxlm.train.__main__", ["--config.privacy.noise_multiplier=1", "--config.data.packing=true"],
     "config.data.packing=true with config.privacy"),
    ("jaxlm.train.__main__", ["--config.privacy.noise_multiplier=1"],
     "config.privacy needs a training set of known size"),
])
def test_bad_privacy_input_is_one_line_naming_the_field_and_writes_nothing(
        tmp_path, module, flags, match):
    config = "configs/bert/rules.py" if module == "jaxlm.finetune" else "configs/gpt/debug.py"
    workdir = tmp_path / "run"
    code, errors = command(module, f"--config={REPO}/{config}", f"--workdir={workdir}",
                           *TINY_FT, *flags)
    assert code == 2 and len(errors) == 1, (code, errors)
    assert match in errors[0], errors[0]
    assert not workdir.exists()
