"""Train step: overfitting, determinism, gradient accumulation, weight-decay mask, schedule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from jaxlm.models.gpt import GPT
from jaxlm.train import loop, optimizer


def make(cfg, microbatches=None):
    """(initial state, jitted step) on one device."""
    if microbatches:
        cfg.train.microbatches = microbatches
    setup = loop.build(cfg, jax.devices()[:1])
    return setup.init_state(), setup.compile_step()


def batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (cfg.train.batch_size, cfg.data.seq_len + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones((cfg.train.batch_size, cfg.data.seq_len), np.float32)}


def test_tiny_model_overfits_one_batch(cfg):
    cfg.train.steps = 150
    cfg.optimizer.update(warmup_steps=10, weight_decay=0.0)
    state, run = make(cfg)
    b = batch(cfg)
    losses = []
    for _ in range(cfg.train.steps):
        state, m = run(state, b, jax.random.PRNGKey(0))
        losses.append(float(m["loss"]))
    assert losses[0] > 5.0  # ~log(258) at init
    assert losses[-1] < 0.5, f"could not overfit a single batch: {losses[::15]}"


def test_same_seed_gives_bitwise_identical_losses(cfg):
    cfg.model.update(dropout=0.1, attention_dropout=0.1)  # dropout RNG must be reproducible too

    def run_losses():
        state, run = make(cfg)
        out = []
        for i in range(4):
            state, m = run(state, batch(cfg, i), jax.random.PRNGKey(1))
            out.append(np.asarray(m["loss"]))
        return np.array(out), state.params

    (a, pa), (b, pb) = run_losses(), run_losses()
    np.testing.assert_array_equal(a, b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, pa, pb)


def test_gradient_accumulation_equals_large_batch(cfg):
    """4 microbatches of 2 give the same loss, grad norm and updated params as one batch of 8."""
    b = batch(cfg)
    b["weights"][:, -5:] = 0.0  # uneven token counts per row must still add up exactly
    b["weights"][3, :] = 0.0
    results = []
    for micro in (1, 4):
        state, run = make(cfg, microbatches=micro)
        state, m = run(state, b, jax.random.PRNGKey(0))
        results.append((m, state.params))
    (m1, p1), (m4, p4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p4)


@pytest.mark.parametrize("no_decay", [("bias", "scale"), ("bias", "scale", "embedding")])
def test_weight_decay_mask(no_decay):
    """With zero gradients only decayed parameters move, and they shrink by lr*wd."""
    cfg = tiny_config()
    cfg.optimizer.update(no_decay=no_decay, warmup_steps=0, weight_decay=0.5, grad_clip_norm=0.0)
    model = GPT(cfg.model)
    boxed = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    # + 1 so that every parameter is non-zero (biases start at zero).
    params = jax.tree_util.tree_map(lambda x: x + 1.0, nn.meta.unbox(boxed))
    tx = optimizer.make_optimizer(cfg.optimizer, 10)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    lr = cfg.optimizer.learning_rate
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        name = "/".join(p.key for p in path)
        p = params
        for k in path:
            p = p[k.key]
        if any(n in name for n in no_decay):
            assert float(jnp.max(jnp.abs(u))) == 0.0, f"{name} was decayed"
        else:
            np.testing.assert_allclose(u, -lr * 0.5 * p, rtol=1e-5, err_msg=name)


def test_learning_rate_schedule():
    cfg = tiny_config()
    cfg.optimizer.update(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    s = optimizer.learning_rate_schedule(cfg.optimizer, 110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half-way
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-5)

