"""Magnitude pruning (config.prune), as the last transformation of the optimizer.

Every pruned parameter (config.prune.params; default: every matmul kernel) has a boolean
mask in the optimizer state, True = kept. At a schedule step the masks are recomputed from
the magnitudes the weights would have after this step's update: the largest are kept, and
a weight once pruned stays pruned (masks only shrink). The update of a pruned weight is
then -weight, so it lands on exactly 0 and stays there; a kept weight gets exactly
AdamW's update, bit for bit (AdamW's moments are left alone).

Unstructured: the share of zeros rises from 0 at prune.start_step to prune.sparsity at
prune.end_step by the cubic schedule of Zhu & Gupta (2017, "To prune, or not to prune"),
    s_t = sparsity * (1 - (1 - (t - start) / (end - start))^3),
(0 at start_step itself: the first zeros come at the next mask update), with a mask
update every prune.every steps and at end_step; each kernel (each layer of a scanned
stack) keeps its own largest weights (scope "layer"), or one threshold holds for all of
them together ("global"). N:M (e.g. 2:4, what sparse tensor cores run): of every M
consecutive weights along a kernel's input axis the N largest are kept, all at start_step.

`t` counts the updates applied, as AdamW's own count does: a step skipped as non-finite
(config.train.nonfinite) does not advance it.

    tx = optax.chain(adamw, prune(cfg.prune, trainable_params))  # optimizer.make_optimizer
    masks_of(state.opt_state), sparsity_of(params, cfg.prune)    # for reports
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.models.layers import STACKED
from jaxlm.trainable import path_of


class PruneState(NamedTuple):
    count: jax.Array   # int32: the updates applied so far (the schedule's t)
    masks: Any         # the params' nesting, pruned parameters only: bool, True = kept


@dataclasses.dataclass(frozen=True)
class Target:
    """One pruned parameter."""
    keys: tuple[str, ...]
    shape: tuple[int, ...]
    stacked: bool          # a leading layers axis (scanned blocks): [layers, in, *out]

    @property
    def input_axis(self) -> int:
        return 1 if self.stacked else 0


def enabled(cfg_prune) -> bool:
    return cfg_prune.sparsity > 0 or config_lib.n_of_m(cfg_prune.pattern) is not None


def _flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)) if tree else {}


def _regexes(patterns) -> list[re.Pattern]:
    return [config_lib.regex(p, "prune.params") for p in patterns]


def _matched(cfg_prune, params) -> list[tuple[str, ...]]:
    """Keys of the parameters of `params` that config.prune.params names (sorted)."""
    regexes = _regexes(cfg_prune.params)
    return sorted(k for k in _flat(params) if any(r.search(path_of(k)) for r in regexes))


def targets(cfg_prune, params) -> list[Target]:
    """The parameters of `params` (the trainable ones: only those reach the optimizer)
    that are pruned, after checking config.prune against them: every regex must match
    one, and an N:M pattern must divide every input axis."""
    flat = _flat(params)
    paths = [path_of(k) for k in flat]
    for p, r in zip(cfg_prune.params, _regexes(cfg_prune.params)):
        if not any(r.search(path) for path in paths):
            raise ConfigError(f"config.prune.params: {p!r} matches no trainable parameter "
                              f"(paths look like {paths[0]!r}, {paths[-1]!r})")
    out = [Target(k, tuple(flat[k].shape), k[0] == STACKED) for k in _matched(cfg_prune, params)]
    nm = config_lib.n_of_m(cfg_prune.pattern)
    for t in out if nm else ():
        if len(t.shape) <= t.input_axis or t.shape[t.input_axis] % nm[1]:
            size = t.shape[t.input_axis] if len(t.shape) > t.input_axis else "none"
            raise ConfigError(f"config.prune.pattern={cfg_prune.pattern!r}: parameter "
                              f"{path_of(t.keys)} {list(t.shape)} has input axis {size}, not "
                              f"divisible into groups of {nm[1]}; narrow config.prune.params")
    return out


# ----------------------------------------------------------------------------- schedule


def scheduled_sparsity(cfg_prune, t: jax.Array) -> jax.Array:
    """s_t (float32) of the cubic schedule at update count `t`; 0 before start_step."""
    start, end = cfg_prune.start_step, cfg_prune.end_step
    if end == start:
        return jnp.where(t >= start, jnp.float32(cfg_prune.sparsity), 0.0)
    done = jnp.clip((t - start) / (end - start), 0.0, 1.0).astype(jnp.float32)
    return jnp.where(t >= start, cfg_prune.sparsity * (1 - (1 - done) ** 3), 0.0)


def is_mask_update(cfg_prune, t: jax.Array) -> jax.Array:
    """Whether the masks are recomputed at update count `t` (a traced bool)."""
    start, end = cfg_prune.start_step, cfg_prune.end_step
    if config_lib.n_of_m(cfg_prune.pattern):
        return t == start
    on_grid = (t - start) % cfg_prune.every == 0
    return (t >= start) & (t <= end) & (on_grid | (t == end))


def _zeros(cfg_prune, t, size: int) -> jax.Array:
    """How many of `size` weights are zero at update count `t`: floor(s_t * size), with s_t
    in float32, except from end_step on, where it is floor(sparsity * size) exactly."""
    final = math.floor(cfg_prune.sparsity * size)
    now = jnp.floor(scheduled_sparsity(cfg_prune, t) * size).astype(jnp.int32)
    return jnp.clip(jnp.where(t >= cfg_prune.end_step, final, now), 0, size - 1)


# ----------------------------------------------------------------------------- masks


def keep_largest(magnitude: jax.Array, keep: jax.Array) -> jax.Array:
    """True for the `keep` largest entries of every row of [R, N] `magnitude` (an exact
    count: entries equal to the smallest kept value are kept by position, first first)."""
    n = magnitude.shape[-1]
    ascending = jnp.sort(magnitude, axis=-1)
    kth = jnp.take(ascending, n - keep, axis=-1)[:, None]  # the keep-th largest
    above, tie = magnitude > kth, magnitude == kth
    need = keep - above.sum(-1, keepdims=True)
    return above | (tie & (jnp.cumsum(tie, axis=-1) <= need))


def keep_n_of_m(magnitude: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    """True for the n largest of every m consecutive entries along `axis` (ties: the
    first ones)."""
    x = jnp.moveaxis(magnitude, axis, -1)
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    mine, other = groups[..., :, None], groups[..., None, :]   # [..., G, M, M]: i, j
    first = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]    # j before i
    rank = ((other > mine) | ((other == mine) & first)).sum(-1)
    return jnp.moveaxis((rank < n).reshape(x.shape), -1, axis)


def _new_keep(cfg_prune, found: list[Target], magnitude: dict, t) -> dict:
    """Which weights the magnitudes at update count `t` keep (before and-ing the old
    masks); pruned weights enter with magnitude -1, below every real one."""
    nm = config_lib.n_of_m(cfg_prune.pattern)
    if nm:
        return {x.keys: keep_n_of_m(magnitude[x.keys], *nm, x.input_axis) for x in found}
    if cfg_prune.scope == "global":
        flat = jnp.concatenate([magnitude[x.keys].reshape(-1) for x in found])
        keep = keep_largest(flat[None], flat.size - _zeros(cfg_prune, t, flat.size))[0]
        ends = np.cumsum([math.prod(x.shape) for x in found])[:-1]
        return {x.keys: part.reshape(x.shape) for x, part in zip(found, jnp.split(keep, ends))}
    out = {}
    for x in found:  # "layer": every kernel, every layer of a stack, on its own
        rows = magnitude[x.keys].reshape(x.shape[0] if x.stacked else 1, -1)
        keep = keep_largest(rows, rows.shape[1] - _zeros(cfg_prune, t, rows.shape[1]))
        out[x.keys] = keep.reshape(x.shape)
    return out


def prune(cfg_prune, params) -> optax.GradientTransformation:
    """The pruning transformation for the (abstract) trainable `params`; checks
    config.prune against them first (ConfigError). Apply it last, after the optimizer."""
    found = targets(cfg_prune, params)
    by_keys = {x.keys for x in found}

    def init(params):
        flat = _flat(params)  # boxed params (Partitioned) are leaves here: each mask is
        # made by a tree_map over its box, so it keeps the parameter's logical axis names
        missing = by_keys - set(flat)
        if missing:
            raise ValueError(f"prune: params lack {sorted(path_of(k) for k in missing)}")
        masks = {k: jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, jnp.bool_), flat[k])
                 for k in sorted(by_keys)}
        return PruneState(jnp.zeros([], jnp.int32), flax.traverse_util.unflatten_dict(masks))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("prune needs the params in update()")
        t, masks = state.count, _flat(state.masks)
        flat_u, flat_p = _flat(updates), _flat(params)

        def recompute(masks):
            candidate = {k: optax.apply_updates(flat_p[k], flat_u[k]) for k in masks}
            magnitude = {k: jnp.where(masks[k], jnp.abs(candidate[k]).astype(jnp.float32), -1.0)
                         for k in masks}
            keep = _new_keep(cfg_prune, found, magnitude, t)
            return {k: masks[k] & keep[k] for k in masks}

        masks = jax.lax.cond(is_mask_update(cfg_prune, t), recompute, lambda m: m, masks)

        def masked(path, u, p):
            keys = tuple(str(getattr(k, "key", k)) for k in path)
            return jnp.where(masks[keys], u, (-p).astype(u.dtype)) if keys in masks else u
        updates = jax.tree_util.tree_map_with_path(masked, updates, params)
        return updates, PruneState(t + 1, flax.traverse_util.unflatten_dict(masks))

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- reports


def masks_of(opt_state) -> dict[str, jax.Array]:
    """{path: mask} of the PruneState in an optimizer state ({} when it has none)."""
    found = [s for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda s: isinstance(s, PruneState)) if isinstance(s, PruneState)]
    return {path_of(k): v for s in found for k, v in _flat(s.masks).items()}


def sparsity_of(params, cfg_prune) -> dict[str, float]:
    """{path: share of zeros} of the parameters config.prune.params names."""
    flat = _flat(params)
    return {path_of(k): float(np.mean(np.asarray(jax.device_get(flat[k])) == 0))
            for k in _matched(cfg_prune, params)}
