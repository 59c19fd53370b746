"""Scan over layers (config.model.scan_layers) and remat policies: the same maths as the
unrolled model, with parameters converted between the two layouts in one place
(models.stack_blocks / unstack_blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fresh_step, random_batch, tiny_bert_config, tiny_config

from jaxlm import models
from jaxlm.inference.generate import Generator, Sampling
from jaxlm.setup import build
from jaxlm.train.objectives import make_objective


def unrolled_and_stacked(cfg):
    """(unrolled setup, scanned setup, unrolled params, the same params stacked)."""
    flat, scanned = cfg.copy_and_resolve_references(), cfg.copy_and_resolve_references()
    flat.model.scan_layers, scanned.model.scan_layers = False, True
    u, s = build(flat), build(scanned)
    params = u.init_params(jax.random.PRNGKey(0))
    return u, s, params, models.stack_blocks(params, cfg.model.num_layers)


def loss_and_grads(setup, params, batch):
    objective = make_objective(setup.cfg, setup.tokenizer)
    fn = lambda p: objective.loss(setup.model, p, batch, jax.random.PRNGKey(0),  # noqa: E731
                                  deterministic=True)[0]
    return jax.jit(jax.value_and_grad(fn))(params)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_scanned_model_equals_unrolled_loss_and_gradients(family):
    cfg = tiny_config() if family == "gpt" else tiny_bert_config()
    cfg.data.packing = True   # segments and positions through the scan
    u, s, flat, stacked = unrolled_and_stacked(cfg)
    assert jax.tree_util.tree_leaves(stacked["blocks"])[0].shape[0] == cfg.model.num_layers
    batch = {k: jnp.asarray(v) for k, v in random_batch(cfg).items()}
    loss_u, grads_u = loss_and_grads(u, flat, batch)
    loss_s, grads_s = loss_and_grads(s, stacked, batch)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           models.unstack_blocks(grads_s), grads_u)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(  # the conversion is exact both ways
        lambda a, b: bool((a == b).all()), models.unstack_blocks(stacked), flat))


@pytest.mark.parametrize("scan,policy", [(False, "full"), (True, "full"), (True, "save_dots"),
                                         (True, "save_dots_no_batch")])
def test_remat_policies_change_memory_not_gradients(scan, policy):
    cfg = tiny_config(scan_layers=scan)
    setup = build(cfg)
    params = setup.init_params(jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in random_batch(cfg).items()}
    ref_loss, ref_grads = loss_and_grads(setup, params, batch)
    cfg.model.update(remat=True, remat_policy=policy)
    loss, grads = loss_and_grads(build(cfg), params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           grads, ref_grads)


def test_kv_cache_decoding_under_scan_equals_unrolled():
    cfg = tiny_config()
    u, s, flat, stacked = unrolled_and_stacked(cfg)
    prompts = [[5, 9, 11, 40, 3], [7, 7, 100]]
    tokens = [Generator(x.model, p, x.tokenizer, x.mesh, cfg.mesh, 2).generate_tokens(
        prompts, 8, Sampling(temperature=0.0)) for x, p in ((u, flat), (s, stacked))]
    assert tokens[0] == tokens[1] and len(tokens[0][0]) == 8
    _, cache = s.model.apply({"params": stacked}, jnp.asarray([prompts[0]]), decode=True,
                             mutable=["cache"])
    assert cache["cache"]["blocks"]["attn"]["cached_key"].shape[0] == cfg.model.num_layers


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_scanned_fsdp_step_equals_one_device():
    """Stacked parameters keep their FSDP split (the layers axis is never split) and a
    train step on 8 devices equals one device."""
    def config(fsdp):
        cfg = tiny_config(scan_layers=True, vocab_size=264)
        cfg.mesh.update(strategy="fsdp", data=1, fsdp=fsdp)
        return cfg

    batch = random_batch(config(1))
    out = []
    for fsdp, devices in ((1, jax.devices()[:1]), (8, jax.devices())):
        state, run = fresh_step(config(fsdp), devices)
        state, m = run(state, run.place_batch(batch), jax.random.PRNGKey(0))
        out.append((float(m["loss"]), jax.device_get(state.params), state))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           out[1][1], out[0][1])
    fc_in = out[1][2].params["blocks"]["mlp"]["fc_in"]["kernel"]   # [layers, D, F]
    assert fc_in.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert fc_in.addressable_shards[0].data.shape == (2, 4, 64)


def test_stack_blocks_names_every_layer_once():
    params = {"embed": {"w": jnp.zeros(3)},
              **{models.layers.block_name(i): {"w": jnp.full((2,), i)} for i in range(3)}}
    stacked = models.stack_blocks(params, 3)
    assert set(stacked) == {"embed", "blocks"}
    np.testing.assert_array_equal(stacked["blocks"]["w"], [[0, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(models.block_params(stacked, 2)["w"], [2, 2])
    assert models.unstack_blocks(stacked).keys() == params.keys()
