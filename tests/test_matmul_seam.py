"""Every weight matmul runs on the parameter itself, inside the module that owns it.

A matmul interceptor such as google/qwix (int8 quantization, LoRA) replaces
jax.lax.dot_general / jnp.einsum while a Flax model runs, and treats an operand as a weight
only when it is one of the *current* module's own parameters: the array `self.param` gave,
or that array through unary ops (a dtype cast, a reshape). A matmul on a kernel stacked
from several modules' parameters, or on a parameter read outside its module, is silently
left in float. `weight_matmuls` applies that same rule while tracing a model and records
each weight matmul it sees; the tests count them against the model's weight kernels, for
GPT and BERT, unrolled and scanned, through every head and the chunked loss. (The rule
follows qwix's own lookup, flax_util.find_param; qwix 0.1.8's PtqProvider, run over these
models, quantizes exactly the kernels counted here.)
"""

import collections
import contextlib
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_bert_config, tiny_config

from jaxlm import models
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.models import layers
from jaxlm.train.objectives import make_objective


def _own_param(x, own: dict) -> str | None:
    """The name of the parameter `x` is (or is through single-input ops), else None."""
    while True:
        if id(x) in own:
            return own[id(x)]
        parent = getattr(x, "parent", None)  # a tracer's producing equation, when traced
        if parent is None or len(parent.in_tracers) != 1:
            return None
        x = parent.in_tracers[0]


@contextlib.contextmanager
def weight_matmuls(monkeypatch):
    """Intercepts jax.lax.dot_general and jnp.einsum; yields the list of (block call,
    module path, parameter name) of every call with an operand that is a parameter of the
    module running it. Block calls are numbered in the order blocks are traced (None
    outside a block): nn.scan traces its body more than once, so a scanned model's
    matmuls are counted per traced call of the block."""
    seen, current, traced = [], [], itertools.count()  # current: the block being traced
    plain_dot, plain_einsum = jax.lax.dot_general, jnp.einsum

    def count_blocks(next_fun, args, kwargs, context):
        if not isinstance(context.module, layers.Block) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        current.append(next(traced))
        try:
            return next_fun(*args, **kwargs)
        finally:
            current.pop()

    def record(*operands):
        stack = nn.module._context.module_stack
        module = stack[-1] if stack else None
        if module is None or module.scope is None:
            return  # outside any module: no interceptor can tell a weight here
        own = {id(v): name for name, v in module.variables.get("params", {}).items()
               if hasattr(v, "shape")}  # the module's own leaves, not its children's
        names = [n for n in (_own_param(x, own) for x in operands) if n]
        if names:
            seen.append((current[-1] if current else None, "/".join(module.path), names[0]))

    def dot_general(lhs, rhs, *args, **kwargs):
        record(lhs, rhs)
        return plain_dot(lhs, rhs, *args, **kwargs)

    def einsum(spec, *operands, **kwargs):
        record(*operands)
        return plain_einsum(spec, *operands, **kwargs)

    monkeypatch.setattr(jax.lax, "dot_general", dot_general)
    monkeypatch.setattr(jnp, "einsum", einsum)
    with nn.intercept_methods(count_blocks):
        yield seen


BLOCK_KERNELS = ("attn/qkv", "attn/out", "mlp/fc_in", "mlp/fc_out")


def check(seen, cfg_model, heads: tuple[str, ...]) -> None:
    """Each traced block call shows its four kernels once (block_i/... unrolled, one call
    per block; blocks/... scanned), and outside the blocks each head's kernels appear once
    (names as in the families' docstrings)."""
    calls = collections.defaultdict(collections.Counter)
    outside = collections.Counter()
    for call, path, name in seen:
        (outside if call is None else calls[call])[(path, name)] += 1
    n = cfg_model.num_layers
    if cfg_model.scan_layers:
        want_calls = [collections.Counter((f"blocks/{k}", "kernel") for k in BLOCK_KERNELS)]
        assert calls and all(c == want_calls[0] for c in calls.values()), dict(calls)
    else:
        want_calls = [collections.Counter((f"{layers.block_name(i)}/{k}", "kernel")
                                          for k in BLOCK_KERNELS) for i in range(n)]
        assert [calls[i] for i in sorted(calls)] == want_calls, dict(calls)
    tied = ("embed/tokens", "embedding")
    per_head = {"logits": ([tied] if cfg_model.tie_embeddings else [("lm_head", "kernel")])
                if cfg_model.arch == "gpt" else [("mlm_dense", "kernel"), tied],
                "classes": ([("pooler", "kernel")] if cfg_model.arch == "bert" else [])
                + [("classifier/out", "kernel")],
                "next_sentence": [("pooler", "kernel"), ("next_sentence", "kernel")]}
    want = []
    for h in heads:
        want += [k for k in per_head[h] if k not in want]  # BERT's pooler serves both heads
    assert outside == collections.Counter(want)


def _setup(cfg):
    model = models.family(cfg.model.arch).module(cfg.model)
    tokens = jnp.zeros((2, cfg.data.seq_len), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"])
    return model, params, tokens


CASES = [("gpt", True, ("logits",)), ("gpt", False, ("logits",)), ("gpt", True, ("classes",)),
         ("bert", True, ("logits",)), ("bert", True, ("logits", "next_sentence")),
         ("bert", True, ("classes",))]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("arch,tie,heads", CASES)
def test_every_weight_matmul_is_seen_on_its_parameter(monkeypatch, arch, tie, heads, scan):
    make = tiny_config if arch == "gpt" else tiny_bert_config
    cfg = make(scan_layers=scan, num_classes=3, tie_embeddings=tie)
    model, params, tokens = _setup(cfg)
    output = heads[0] if len(heads) == 1 else heads
    with weight_matmuls(monkeypatch) as seen:  # traced only: shapes, nothing compiled
        jax.eval_shape(lambda p: model.apply({"params": p}, tokens, output=output), params)
    check(seen, cfg.model, heads)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_chunked_loss_runs_the_head_through_the_model(monkeypatch, tie, scan):
    """config.train.loss_chunk: the output projection of each chunk is a weight matmul of
    the model's own head (traced once, in the chunk loop's body)."""
    cfg = tiny_config(scan_layers=scan, tie_embeddings=tie)
    cfg.train.loss_chunk = 8
    model, params, _ = _setup(cfg)
    objective = make_objective(cfg, get_tokenizer(cfg.data.tokenizer))
    batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in objective.batch_spec(2).items()}
    loss = lambda p: objective.loss(model, p, batch, jax.random.PRNGKey(0),  # noqa: E731
                                    deterministic=True)[0]
    with weight_matmuls(monkeypatch) as seen:
        jax.eval_shape(loss, params)
    check(seen, cfg.model, ("logits",))


def test_cpu_kernel_dot_yields_to_an_interceptor(monkeypatch):
    """layers.cpu_kernel_dot (XLA:CPU's faster kernel gradient) keeps its custom gradient
    only while jax.lax.dot_general is jax's own: replaced (a monkeypatch) or its code
    swapped (as qwix intercepts), the call goes to jax.lax.dot_general with the operands
    as given; so does a kernel that is not a plain array (e.g. a quantized weight)."""
    x, kernel = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    dims = (((2,), (0,)), ((), ()))
    calls, plain_dot = [], jax.lax.dot_general

    def spy(lhs, rhs, *args, **kwargs):
        calls.append((lhs, rhs))
        return plain_dot(lhs, rhs, *args, **kwargs)

    def plain_jaxpr():
        return str(jax.make_jaxpr(lambda a, b: layers.cpu_kernel_dot(a, b, dims))(x, kernel))

    assert "custom_vjp_call" in plain_jaxpr()  # untouched: the custom gradient
    with monkeypatch.context() as m:
        m.setattr(jax.lax, "dot_general", spy)
        out = layers.cpu_kernel_dot(x, kernel, dims)
        assert len(calls) == 1 and calls[0][0] is x and calls[0][1] is kernel
        assert "custom_vjp_call" not in plain_jaxpr()
    np.testing.assert_array_equal(out, jnp.full((2, 3, 5), 4.0))
    # qwix keeps the function object and swaps its code object: that is seen too (here a
    # copy of the same code, so that dot_general still works meanwhile)
    with monkeypatch.context() as m:
        m.setattr(plain_dot, "__code__", plain_dot.__code__.replace())
        assert "custom_vjp_call" not in plain_jaxpr()
    assert "custom_vjp_call" in plain_jaxpr()
