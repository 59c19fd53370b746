"""Model families, picked by `config.model.arch`.

A family tells the rest of jaxlm what it needs to know about a model without reading the
model's code: how to build it from `config.model`, which `config.model` fields fix its
parameters' shapes and meaning (a checkpoint made with other values is refused), its
training FLOPs per token (for MFU), the training objectives it supports
(jaxlm.train.objectives; the first is the usual one), and what it can do (`causal`,
`pooled`). Code outside this package asks these, never the family's name.

Parameters of block i are `block_params(params, i)`: tests and converters read layers
through it, never through a hand-written path. Scanned models (config.model.scan_layers)
keep all blocks in one stacked subtree; `stack_blocks` / `unstack_blocks` convert a params
tree between the two layouts, in this one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.errors import ConfigError
from jaxlm.models import bert, gpt
from jaxlm.models.layers import STACKED, block_name


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    module: Callable[..., nn.Module]              # module(config.model)
    shape_fields: tuple[str, ...]                 # config.model fields a checkpoint must share
    flops_per_token: Callable[..., float]         # (config.model, seq_len) -> training FLOPs
    objectives: tuple[str, ...]                   # names in jaxlm.train.objectives
    # A left-to-right LM: generates text and scores a continuation by its log-likelihood
    # (else an encoder, scored by pseudo-log-likelihood through its masked-LM head).
    causal: bool
    # Classifies from a pooler on the first token, [CLS] (else from the last token, which
    # has seen the whole text): classification inputs are [CLS] A [SEP] B [SEP].
    pooled: bool


FAMILIES = {
    "gpt": Family("gpt", gpt.GPT, gpt.SHAPE_FIELDS, gpt.flops_per_token,
                  ("causal_lm", "classification"), causal=True, pooled=False),
    "bert": Family("bert", bert.BERT, bert.SHAPE_FIELDS, bert.flops_per_token,
                   ("masked_lm", "classification", "span_extraction"), causal=False, pooled=True),
}


def family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise ConfigError(f"config.model.arch={arch!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[arch]


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def block_params(params, i: int):
    """The parameters of transformer block i (unscanned or scanned layout)."""
    if STACKED in params:
        return jax.tree_util.tree_map(lambda x: x[i], params[STACKED])
    return params[block_name(i)]


def stack_blocks(params, num_layers: int):
    """Unscanned params (block_0 ... block_{n-1}) -> the scanned layout ("blocks", every
    leaf stacked on a new leading axis); other entries unchanged."""
    blocks = [params[block_name(i)] for i in range(num_layers)]
    rest = {k: v for k, v in params.items() if k not in {block_name(i) for i in range(num_layers)}}
    return {**rest, STACKED: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_blocks(params):
    """The scanned layout -> block_0 ... block_{n-1}; unscanned params are returned as given."""
    if STACKED not in params:
        return params
    rest = {k: v for k, v in params.items() if k != STACKED}
    n = jax.tree_util.tree_leaves(params[STACKED])[0].shape[0]
    return {**rest, **{block_name(i): block_params(params, i) for i in range(n)}}
