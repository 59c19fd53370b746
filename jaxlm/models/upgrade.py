"""Parameter trees of the previous layout -> the current one, for checkpoints written
before the layout changed.

Before: each attention kept query, key and value as three modules,
`attn/{query,key,value}/{kernel [D, H*K], bias [H*K]}`. Now: one parameter,
`attn/qkv/{kernel [D, 3, H*K], bias [3, H*K]}` (layers.Attention). Scanned blocks carry a
leading layers axis on every leaf, before and after. Both functions take any pytree that
mirrors the params (params, Adam's mu and nu, a whole optimizer state), unboxed, with
numpy or jax arrays as leaves.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

OLD_QKV = ("query", "key", "value")


def _is_old_attention(x) -> bool:
    return isinstance(x, Mapping) and all(isinstance(x.get(n), Mapping) for n in OLD_QKV)


def is_old_layout(tree) -> bool:
    """Whether any attention in the tree keeps query, key and value as three modules."""
    return any(_is_old_attention(x) for x in
               jax.tree_util.tree_leaves(tree, is_leaf=_is_old_attention))


def _stack(parts):
    """q, k, v leaves stacked on a new second-to-last axis ([.., D, HK] -> [.., D, 3, HK],
    [.., HK] -> [.., 3, HK]); numpy stays numpy (a conversion on the host)."""
    stack = jnp.stack if any(isinstance(p, jax.Array) for p in parts) else np.stack
    return stack(parts, axis=-2)


def upgrade_tree(tree):
    """The tree with every old attention's query/key/value stacked into `qkv` (other
    entries, e.g. `out`, unchanged); a tree already in the current layout comes back
    equal."""
    def upgrade(x):
        if not _is_old_attention(x):
            return x
        rest = {k: v for k, v in x.items() if k not in OLD_QKV}
        qkv = jax.tree_util.tree_map(lambda *parts: _stack(parts), *(x[n] for n in OLD_QKV))
        return {**rest, "qkv": qkv}
    return jax.tree_util.tree_map(upgrade, tree, is_leaf=_is_old_attention)
