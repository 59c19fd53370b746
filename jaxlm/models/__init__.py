"""Model families, picked by `config.model.arch`.

A family tells the rest of jaxlm what it needs to know about a model without reading the
model's code: how to build it from `config.model`, which `config.model` fields fix its
parameters' shapes and meaning (a checkpoint made with other values is refused), its
training FLOPs per token (for MFU), and the training objectives it supports
(jaxlm.train.objectives; the first is the usual one).

Parameters of block i are `block_params(params, i)`: tests and converters read layers
through it, never through a hand-written path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax

from jaxlm.errors import ConfigError
from jaxlm.models import bert, gpt
from jaxlm.models.layers import block_name


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    module: Callable[..., nn.Module]              # module(config.model)
    shape_fields: tuple[str, ...]                 # config.model fields a checkpoint must share
    flops_per_token: Callable[..., float]         # (config.model, seq_len) -> training FLOPs
    objectives: tuple[str, ...]                   # names in jaxlm.train.objectives


FAMILIES = {
    "gpt": Family("gpt", gpt.GPT, gpt.SHAPE_FIELDS, gpt.flops_per_token,
                  ("causal_lm", "classification")),
    "bert": Family("bert", bert.BERT, bert.SHAPE_FIELDS, bert.flops_per_token,
                   ("masked_lm", "classification")),
}


def family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise ConfigError(f"config.model.arch={arch!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[arch]


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def block_params(params, i: int):
    """The parameters of transformer block i."""
    return params[block_name(i)]
