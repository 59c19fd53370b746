"""Train state, the loss, and the pure train step.

`train_step(state, batch, rng) -> (state, metrics)` is a module-level function of its
inputs only; `compile_train_step` binds the model/optimizer and jits it once with explicit
shardings and a donated state.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (sum of weighted token losses, sum of weights), both fp32 scalars.

    Sums rather than means so that microbatches add up to exactly the full-batch loss.
    """
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_BxL * weights_BxL), jnp.sum(weights_BxL)


def loss_sum(params, batch, rng, *, model: nn.Module, deterministic: bool):
    logits_BxLxV = model.apply({"params": params}, batch["inputs"],
                               batch.get("positions"), batch.get("segments"),
                               deterministic=deterministic, rngs={"dropout": rng})
    return cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])


def accumulate_gradients(params, batch: dict, rng: jax.Array, *, model: nn.Module,
                         microbatches: int) -> tuple[Any, jax.Array, jax.Array]:
    """Sums over microbatches of (gradients of the summed loss, summed loss, token weight).

    Microbatch i takes rows i, i+M, i+2M, ... so that every data-parallel shard keeps its
    own rows (a contiguous split would move data between devices).
    """
    grad_fn = jax.value_and_grad(
        functools.partial(loss_sum, model=model, deterministic=False), has_aux=True)

    def split(x):  # [B, ...] -> [M, B/M, ...], microbatch i = rows i::M
        x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    def accumulate(carry, xs):
        grads, loss, weight = carry
        i, micro = xs
        (l, w), g = grad_fn(params, micro, jax.random.fold_in(rng, i))
        return (jax.tree_util.tree_map(jnp.add, grads, g), loss + l, weight + w), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    micro_batches = jax.tree_util.tree_map(split, batch)
    (grads, loss, weight), _ = jax.lax.scan(
        accumulate, (zeros, jnp.float32(0), jnp.float32(0)),
        (jnp.arange(microbatches), micro_batches))
    return grads, loss, weight


def apply_gradients(state: TrainState, grads, loss, weight, *, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> tuple[TrainState, dict]:
    """Normalises the summed gradients by the total token weight and takes the step.

    Dividing once, after summing, makes M microbatches (or N pmap devices) equal to one
    M-times larger batch up to float summation order.

    A step whose loss or gradient norm is not finite is not applied: params and optimizer
    state stay as they were (the step counter still advances past the bad batch), and
    metrics["nonfinite"] says so. The loop then stops or skips (config.train.nonfinite).
    """
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    loss, grad_norm = loss / denom, optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_bad = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(finite, new, old))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "tokens": weight, "nonfinite": ~finite}
    return TrainState(step=state.step + 1, params=keep_if_bad(params, state.params),
                      opt_state=keep_if_bad(opt_state, state.opt_state)), metrics


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               microbatches: int) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch (jit path: XLA inserts the collectives)."""
    rng = jax.random.fold_in(rng, state.step)
    sums = accumulate_gradients(state.params, batch, rng, model=model, microbatches=microbatches)
    return apply_gradients(state, *sums, tx=tx, schedule=schedule)


def pmap_train_step(state: TrainState, batch: dict, rng: jax.Array, *, model: nn.Module,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    microbatches: int) -> tuple[TrainState, dict]:
    """The classic data-parallel step, run per device under `jax.pmap(axis_name="batch")`:
    each device sums over its rows, one `psum` adds the sums of all devices, and every
    replica then takes the identical update."""
    device = jax.lax.axis_index("batch")
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), device)
    sums = accumulate_gradients(state.params, batch, rng, model=model, microbatches=microbatches)
    sums = jax.lax.psum(sums, axis_name="batch")
    return apply_gradients(state, *sums, tx=tx, schedule=schedule)


# ----------------------------------------------------------------------------- state creation


def abstract_state(model: nn.Module, tx, seq_len: int):
    """Shapes (with logical-axis boxes) of the train state, computed without allocating."""
    def init(rng):
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(rng, tokens)["params"]  # boxed: carries logical axis names
        # tx.init on boxed params gives moments boxed with the same names, so they
        # are sharded exactly like their parameters.
        return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params))
    return jax.eval_shape(init, jax.random.PRNGKey(0))


def create_state(model: nn.Module, tx, seq_len: int, rng: jax.Array, shardings) -> TrainState:
    """Initializes the state directly into its shardings: no host holds the full model."""
    def init(rng):
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = nn.meta.unbox(model.init(rng, tokens)["params"])
        return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params))

    # No mesh context here: out_shardings places the result, and the model's logical
    # constraints are not needed for an init.
    return jax.jit(init, out_shardings=shardings)(rng)


def compile_train_step(model, tx, schedule, microbatches: int, mesh, cfg_mesh, shardings):
    """jit(train_step) with explicit in/out shardings; the old state's buffers are donated."""
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                             microbatches=microbatches)
    batch_sh = sharding.batch_sharding(mesh, cfg_mesh)
    rep = sharding.replicated(mesh)
    jitted = jax.jit(step, in_shardings=(shardings, batch_sh, rep),
                     out_shardings=(shardings, rep), donate_argnums=(0,))

    def run(state, batch, rng):
        with sharding.activate(mesh, cfg_mesh):
            return jitted(state, batch, rng)
    run.jitted = jitted
    return run


def compile_pmap_train_step(model, tx, schedule, microbatches: int):
    """pmap(pmap_train_step) over this host's devices. The state carries a leading device
    axis (see `replicate`), the batch is split [devices, B/devices, ...]."""
    step = functools.partial(pmap_train_step, model=model, tx=tx, schedule=schedule,
                             microbatches=microbatches)
    pmapped = jax.pmap(step, axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,))

    def run(state, batch, rng):
        state, metrics = pmapped(state, batch, rng)
        return state, jax.tree_util.tree_map(lambda x: x[0], metrics)
    return run


def pmap_sharding() -> jax.sharding.NamedSharding:
    """Leading axis split over this host's devices: the layout pmap reads and writes."""
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("batch",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))


def replicate(tree):
    """One copy per local device, stacked on a new leading axis."""
    n, sh = jax.local_device_count(), pmap_sharding()
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(jnp.broadcast_to(x, (n,) + x.shape), sh), tree)


def unreplicate(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)
