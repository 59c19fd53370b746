"""GPT forward pass: shapes, causality, segment masking, KV-cache decoding, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import models
from jaxlm.models import count_params
from jaxlm.models.gpt import GPT, flops_per_token


def init(cfg_model, L=16, seed=0):
    model = GPT(cfg_model)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, L), jnp.int32))["params"])
    return model, params


def random_tokens(B, L, V, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, L)), jnp.int32)


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_param_names(position, tie):
    cfg = tiny_config(position=position, tie_embeddings=tie).model
    model, params = init(cfg)
    logits = model.apply({"params": params}, random_tokens(3, 16, cfg.vocab_size))
    assert logits.shape == (3, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    assert ("lm_head" in params) != tie
    assert ("positions" in params["embed"]) == (position == "learned")
    qkv = models.block_params(params, 0)["attn"]["qkv"]
    assert qkv["kernel"].shape == (32, 3, 4 * 8) and qkv["bias"].shape == (3, 4 * 8)  # D, 3, H*K


def test_every_parameter_has_logical_axis_names():
    model = GPT(tiny_config(tie_embeddings=False).model)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == len(x.value.shape)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_causal_future_tokens_do_not_change_past_logits(position):
    cfg = tiny_config(position=position).model
    model, params = init(cfg)
    a = random_tokens(2, 16, cfg.vocab_size, seed=1)
    b = a.at[:, 9:].set(random_tokens(2, 7, cfg.vocab_size, seed=2))
    la, lb = (model.apply({"params": params}, t) for t in (a, b))
    np.testing.assert_array_equal(np.asarray(la[:, :9]), np.asarray(lb[:, :9]))
    assert not np.allclose(la[:, 9:], lb[:, 9:])  # the test could fail: later logits differ


def test_segments_isolate_packed_documents():
    """A document's logits are the same alone or packed after another document."""
    cfg = tiny_config(position="rope").model
    model, params = init(cfg)
    doc1, doc2 = random_tokens(1, 6, cfg.vocab_size, 3), random_tokens(1, 10, cfg.vocab_size, 4)
    packed = jnp.concatenate([doc1, doc2], axis=1)
    segments = jnp.array([[1] * 6 + [2] * 10])
    positions = jnp.array([list(range(6)) + list(range(10))])
    out = model.apply({"params": params}, packed, positions, segments)
    alone = model.apply({"params": params}, doc2)
    np.testing.assert_allclose(out[:, 6:], alone, atol=1e-5)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_kv_cache_decoding_matches_full_forward(position):
    cfg = tiny_config(position=position).model
    model, params = init(cfg)
    tokens = random_tokens(2, 12, cfg.vocab_size, 5)
    full = model.apply({"params": params}, tokens)
    # Prefill 5 tokens, then feed the other 7 one at a time.
    logits, v = model.apply({"params": params}, tokens[:, :5], decode=True, mutable=["cache"])
    steps = [logits]
    for t in range(5, 12):
        pos = jnp.full((2, 1), t)
        logits, v = model.apply({"params": params, "cache": v["cache"]}, tokens[:, t:t + 1], pos,
                                decode=True, mutable=["cache"])
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_bf16_compute_keeps_fp32_params():
    cfg = tiny_config(dtype="bfloat16").model
    model, params = init(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    logits = model.apply({"params": params}, random_tokens(2, 16, cfg.vocab_size))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    ref = GPT(tiny_config().model).apply({"params": params}, random_tokens(2, 16, cfg.vocab_size))
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.1  # close to fp32, not equal


@pytest.mark.parametrize("tie", [True, False])
def test_logits_in_the_compute_dtype_when_not_wide(tie):
    cfg = tiny_config(dtype="bfloat16", tie_embeddings=tie, wide_logits=False).model
    model, params = init(cfg)
    tokens = random_tokens(2, 16, cfg.vocab_size)
    logits = model.apply({"params": params}, tokens)
    wide = GPT(tiny_config(dtype="bfloat16", tie_embeddings=tie).model).apply(
        {"params": params}, tokens)
    assert logits.dtype == jnp.bfloat16 and wide.dtype == jnp.float32
    assert jnp.array_equal(logits, wide.astype(jnp.bfloat16))  # the same sums, rounded


@pytest.mark.parametrize("lookup", ["one_hot", "gather_whole"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lookups_give_the_gathered_rows_and_their_gradient(dtype, lookup):
    """config.model.embed_lookup: one_hot(tokens) @ table has one term per sum, and
    gather_whole takes the same rows from the gathered table, so the logits are the
    gather's bit for bit; the table's gradient sums the same terms."""
    cfg = tiny_config(dtype=dtype, embed_lookup="gather").model
    model, params = init(cfg)
    hot = GPT(tiny_config(dtype=dtype, embed_lookup=lookup).model)
    tokens = random_tokens(2, 16, cfg.vocab_size)
    assert jnp.array_equal(model.apply({"params": params}, tokens),
                           hot.apply({"params": params}, tokens))

    def grad(m):
        return jax.grad(lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, tokens))))(params)
    got, want = grad(hot), grad(model)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_one_hot_lookup_refuses_an_int8_token_table():
    from jaxlm.errors import ConfigError
    from jaxlm.setup import build
    cfg = tiny_config(embed_lookup="one_hot")
    cfg.quant.update(mode="int8_weight", train=True, skip=())
    with pytest.raises(ConfigError, match=r"embed_lookup='one_hot' with a quantized token"):
        build(cfg, jax.devices()[:1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_projection_gradients_are_autodiffs_and_a_frozen_table_costs_none(dtype):
    """layers.logits ties its two gradients together (an optimization barrier): the same
    numbers as autodiff of the plain einsum, bit for bit; and when only x is differentiated
    (a frozen table) the step has no matmul for the table's gradient."""
    from jaxlm.models import layers

    def plain(x, t):
        d = jnp.dtype(dtype)
        return jnp.einsum("bld,vd->blv", x.astype(d), t.astype(d),
                          preferred_element_type=layers.wide(d))

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
    t = jax.random.normal(jax.random.PRNGKey(1), (40, 16))

    def loss(f):
        return lambda x, t: jnp.sum(jnp.sin(f(x, t)))
    tied = lambda x, t: layers.logits(x, t, dtype)  # noqa: E731
    for got, want in zip(jax.grad(loss(tied), (0, 1))(x, t), jax.grad(loss(plain), (0, 1))(x, t)):
        assert jnp.array_equal(got, want)
    dots = [jax.jit(jax.grad(loss(f))).lower(x, t).as_text().count("dot_general")
            for f in (tied, plain)]
    assert dots[0] == dots[1] == 2  # the forward's and x's gradient's


def test_norms_outside_the_scan_keep_their_input_not_an_fp32_copy():
    """LayerNorm(recompute=True) gives the same values and gradients, and keeps for the
    backward pass only its bf16 input (and scale); a bf16 GPT's saved residuals then hold
    no fp32 [B, L, D] array (the final norm's copy, before recompute)."""
    from jaxlm.models import layers
    cfg = tiny_config(dtype="bfloat16", remat=True, scan_layers=True).model
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, cfg.d_model)).astype(jnp.bfloat16)
    outs = []
    for recompute in (False, True):
        norm = layers.LayerNorm(cfg, recompute=recompute)
        params = norm.init(jax.random.PRNGKey(1), x)
        y, vjp = jax.vjp(norm.apply, params, x)
        outs.append((y, vjp(jnp.ones_like(y))))
        saved = [(r.shape, r.dtype) for r in jax.tree_util.tree_leaves(vjp) if r.ndim == 3]
        assert (((2, 8, cfg.d_model), jnp.float32) in saved) != recompute
    for a, b in zip(*map(jax.tree_util.tree_leaves, outs)):
        assert jnp.array_equal(a, b)

    model, params = init(cfg)
    tokens = random_tokens(2, 16, cfg.vocab_size)
    _, vjp = jax.vjp(lambda p: model.apply({"params": p}, tokens), params)
    saved = [(r.shape, r.dtype) for r in jax.tree_util.tree_leaves(vjp)]
    assert ((2, 16, cfg.d_model), jnp.bfloat16) in saved
    assert ((2, 16, cfg.d_model), jnp.float32) not in saved


def test_on_tpu_the_scan_output_is_row_major_and_nothing_else_changes():
    """Compiled for a TPU, the layers' scan output carries a row-major layout constraint
    (layers.row_major_on_tpu: the final norm's backward pass then reads the head's copy, not
    a second [B, L, D] array); the loss and every gradient are bit-identical without it.
    Run here on CPU, as a GPU-compiled model (no constraint) against a TPU-compiled one."""
    cfg = tiny_config(remat=True, scan_layers=True).model
    tokens = random_tokens(2, 16, cfg.vocab_size)
    results = {}
    for platform in ("gpu", "tpu"):
        with cfg.unlocked():
            cfg.platform = platform
        model, params = init(cfg)
        loss = jax.jit(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2))
        results[platform] = jax.value_and_grad(loss)(params)
        assert ("LayoutConstraint" in loss.lower(params).as_text()) == (platform == "tpu")
    for a, b in zip(*map(jax.tree_util.tree_leaves, results.values())):
        assert jnp.array_equal(a, b)


@pytest.mark.parametrize("shape", [(6, 5), (2, 7, 11)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_nll_and_its_gradient_equal_autodiff_of_log_softmax(shape, dtype):
    """objectives.token_nll's own backward pass (softmax - one_hot from the logits) against
    JAX's autodiff of -log_softmax[target], for classes [B, C] and tokens [B, L, V]."""
    from jaxlm.train.objectives import token_nll
    logits = (3 * jax.random.normal(jax.random.PRNGKey(0), shape)).astype(dtype)
    targets = jax.random.randint(jax.random.PRNGKey(1), shape[:-1], 0, shape[-1])
    weights = jax.random.uniform(jax.random.PRNGKey(2), shape[:-1])

    def reference(x):
        logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    ours, ours_grad = jax.value_and_grad(lambda x: jnp.sum(token_nll(x, targets) * weights))(logits)
    ref, ref_grad = jax.value_and_grad(lambda x: jnp.sum(reference(x) * weights))(logits)
    assert token_nll(logits, targets).dtype == jnp.float32 and ours_grad.dtype == dtype
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours_grad, np.float32), np.asarray(ref_grad, np.float32),
                               rtol=1e-5, atol=1e-6 if dtype == jnp.float32 else 1e-2)


def test_token_nll_picks_the_target_from_the_logits_as_given():
    """The target's logit is gathered from the logits in their own dtype and widened after:
    gathered from an fp32 copy of bf16 logits, XLA:TPU wrote that whole [B, L, V] copy out
    (0.4 GB a sequence at 50257 tokens and 2048 positions; BENCHMARKS.md, fit table)."""
    from jaxlm.train.objectives import token_nll
    logits = jnp.zeros((2, 3, 7), jnp.bfloat16)
    targets = jnp.zeros((2, 3), jnp.int32)

    def gathers(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "gather":
                yield eqn.invars[0].aval
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from gathers(sub)
    for x in (logits, logits.astype(jnp.float32)):
        found = list(gathers(jax.make_jaxpr(jax.grad(
            lambda x: jnp.sum(token_nll(x, targets))))(x).jaxpr))
        assert [a.dtype for a in found] == [x.dtype], found


def test_remat_gives_same_loss_and_grads():
    cfg = tiny_config().model
    model, params = init(cfg)
    remat_model = GPT(tiny_config(remat=True).model)
    tokens = random_tokens(2, 16, cfg.vocab_size)
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, tokens, deterministic=False,
                                                rngs={"dropout": jax.random.PRNGKey(0)}) ** 2)
    g1 = jax.grad(loss(model))(params)
    g2 = jax.grad(loss(remat_model))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_kernel_gradients_equal_the_plain_matmul(dtype):
    """On CPU, layers.kernel_dot computes each kernel's gradient as [out, in] and transposes
    it (XLA:CPU's fast matmul takes it only that way round); loss and every gradient
    (2-D kernels and the fused [D, 3, H*K] query/key/value kernel) equal the plain
    lax.dot_general's, which config.model.platform "gpu" selects here."""
    results = []
    for platform in ("cpu", "gpu"):
        cfg = tiny_config(dtype=dtype).model
        with cfg.unlocked():
            cfg.platform = platform
        model, params = init(cfg)
        tokens = random_tokens(2, 16, cfg.vocab_size)
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (ours, our_grads), (plain, plain_grads) = results
    tol = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(ours, plain, rtol=tol)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 1e-2),
                           our_grads, plain_grads)


def test_flops_per_token_counts_matmul_params():
    """6N must use the matmul parameters: all params minus LayerNorms, biases and position
    table (the tied token table counts once, as the output projection)."""
    cfg = tiny_config().model
    _, params = init(cfg)
    flat = jax.tree_util.tree_leaves_with_path(params)
    matmul = sum(x.size for path, x in flat
                 if path[-1].key in ("kernel", "embedding") and "positions" not in str(path))
    L = 32
    assert flops_per_token(cfg, L) == 6 * matmul + 12 * cfg.num_layers * cfg.d_model * L
    assert count_params(params) > matmul


def test_fused_qkv_is_initialised_like_three_kernels():
    """q, k and v are one parameter [D, 3, H*K]: each third drawn Normal(0, init_std) like
    the separate kernels before (values differ, the distribution does not)."""
    cfg = tiny_config(d_model=64).model
    _, params = init(cfg)
    kernel = np.asarray(models.block_params(params, 0)["attn"]["qkv"]["kernel"])
    for part in np.moveaxis(kernel, 1, 0):  # 4096 draws each: std within ~1%
        assert abs(part.std() / cfg.init_std - 1) < 0.05 and abs(part.mean()) < 0.05 * cfg.init_std
    assert not np.allclose(kernel[:, 0], kernel[:, 1])  # independent draws


def old_layout(tree):
    """A current params tree in the layout before q/k/v were fused: attn/{query,key,value}
    /{kernel [.., D, H*K], bias [.., H*K]}."""
    if not isinstance(tree, dict):
        return tree
    out = {k: old_layout(v) for k, v in tree.items() if k != "qkv"}
    for i, name in enumerate(("query", "key", "value") if "qkv" in tree else ()):
        out[name] = jax.tree_util.tree_map(lambda x, i=i: x[..., i, :], tree["qkv"])
    return out


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_old_layout_trees_upgrade_to_the_same_model(scan):
    """models.upgrade: params (and Adam moments) saved with separate query/key/value
    convert to the fused layout exactly, and the model gives the same logits."""
    import optax

    from jaxlm.models.upgrade import is_old_layout, upgrade_tree
    cfg = tiny_config(scan_layers=scan).model
    model, params = init(cfg)
    old, block = old_layout(params), models.layers.STACKED if scan else "block_0"
    assert is_old_layout(old) and not is_old_layout(params)
    layers_axis = (cfg.num_layers,) if scan else ()
    assert old[block]["attn"]["query"]["kernel"].shape == layers_axis + (32, 32)
    new = upgrade_tree(old)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, params)
    assert upgrade_tree(params) == params  # the current layout is left as it is
    tokens = random_tokens(2, 8, cfg.vocab_size)
    np.testing.assert_array_equal(model.apply({"params": new}, tokens),
                                  model.apply({"params": params}, tokens))
    # a whole optimizer state (Adam's mu and nu mirror the params), on the host as numpy
    upgraded = upgrade_tree(jax.device_get(optax.adamw(1e-3).init(old)))
    assert jax.tree_util.tree_structure(upgraded) == jax.tree_util.tree_structure(
        optax.adamw(1e-3).init(params))
    nu_qkv = upgraded[0].nu[block]["attn"]["qkv"]["kernel"]
    assert isinstance(nu_qkv, np.ndarray) and nu_qkv.shape == layers_axis + (32, 3, 32)
