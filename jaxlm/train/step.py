"""The train state, the pure train step, and the step jitted over the mesh.

`train_step(state, batch, rng, ...) -> (state, metrics)` is a module-level function of its
inputs only. `JitTrainStep` binds model, objective and optimizer and jits it once with
explicit shardings and a donated state. jaxlm.train.pmap has the same interface for the
classic pmap path, so the loop never asks which one it drives:

    step.init_state(params=None)          -> a fresh state, global layout (as checkpointed)
    step.abstract_state, .state_shardings -> restore target of a checkpoint, same layout
    step.place_state(state)               -> the state in the layout the step runs on
    step.place_batch(numpy rows)          -> device batch (this process's rows)
    step(state, batch, rng)               -> (state, metrics), in the step's layout
    step.global_state(state)              -> back to the global layout, e.g. to save it
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import einops
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm import sharding
from jaxlm.train import optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def accumulate_gradients(params, batch: dict, rng: jax.Array, *, loss_fn: Callable,
                         microbatches: int, metrics: tuple[str, ...] = ()):
    """Sums over microbatches of (gradients of the summed loss, summed loss, token weight,
    {metric: summed value}). `loss_fn(params, batch, rng, deterministic=...) -> (loss sum,
    (weight sum, {metric: sum}))` (jaxlm.train.objectives); `metrics` names those sums.

    Microbatch i takes rows i, i+M, i+2M, ... so that every data-parallel shard keeps its
    own rows (a contiguous split would move data between devices).
    """
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, deterministic=False), has_aux=True)

    def accumulate(carry, xs):
        grads, loss, weight, sums = carry
        i, micro = xs
        (l, (w, m)), g = grad_fn(params, micro, jax.random.fold_in(rng, i))
        sums = {k: sums[k] + m[k] for k in sums}
        return (jax.tree_util.tree_map(jnp.add, grads, g), loss + l, weight + w, sums), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    micro_batches = jax.tree_util.tree_map(
        lambda x: einops.rearrange(x, "(n m) ... -> m n ...", m=microbatches), batch)
    (grads, loss, weight, sums), _ = jax.lax.scan(
        accumulate, (zeros, jnp.float32(0), jnp.float32(0), {k: jnp.float32(0) for k in metrics}),
        (jnp.arange(microbatches), micro_batches))
    return grads, loss, weight, sums


def apply_gradients(state: TrainState, grads, loss, weight, sums=None, *,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    clip_norm: float = 0.0) -> tuple[TrainState, dict]:
    """Normalises the summed gradients (and the loss and metric sums) by the total weight,
    clips them to global norm `clip_norm` (0: no clipping) and takes the step.

    Dividing once, after summing, makes M microbatches (or N pmap devices) equal to one
    M-times larger batch up to float summation order.

    A step whose loss or gradient norm is not finite is not applied: params and optimizer
    state stay as they were (the step counter still advances past the bad batch), and
    metrics["nonfinite"] says so. The loop then stops or skips (config.train.nonfinite).
    """
    denom = jnp.maximum(weight, 1.0)
    loss, grad_norm = loss / denom, optax.tree.norm(grads) / denom  # of the mean gradient
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    scale = optimizer.clip_factor(grad_norm, clip_norm) / denom

    def update(params, opt_state):  # the scaling fuses into the optimizer's pass
        scaled = jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), grads)
        updates, opt_state = tx.update(scaled, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A branch, not jnp.where(finite, new, old) on every leaf: the select kept the old
    # params and moments alive beside the new ones, and XLA copied all of them each step.
    params, opt_state = jax.lax.cond(finite, update, lambda *old: old,
                                     state.params, state.opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "tokens": weight, "nonfinite": ~finite,
               **{k: v / denom for k, v in (sums or {}).items()}}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn: Callable,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               microbatches: int, metrics: tuple[str, ...] = (),
               clip_norm: float = 0.0) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch (jit path: XLA inserts the collectives)."""
    rng = jax.random.fold_in(rng, state.step)
    sums = accumulate_gradients(state.params, batch, rng, loss_fn=loss_fn,
                                microbatches=microbatches, metrics=metrics)
    return apply_gradients(state, *sums, tx=tx, schedule=schedule, clip_norm=clip_norm)


def boxed_state(boxed_params, tx):
    """Abstract train state whose optimizer moments carry their parameters' logical axis
    names (tx.init on boxed params boxes the moments alike), so they shard the same way."""
    return jax.eval_shape(
        lambda p: TrainState(step=jnp.array(0, jnp.int32), params=p, opt_state=tx.init(p)),
        boxed_params)


def fresh_state(setup, tx: optax.GradientTransformation, shardings, params=None) -> TrainState:
    """A new state (seed config.train.seed), created straight into `shardings`: no host
    ever holds the full model. `params` (e.g. a pretrained encoder) replace the fresh
    parameters of the same top-level names; the others (a new head) stay fresh."""
    def init(rng, given):
        fresh = setup.init_params(rng)
        fresh = {**fresh, **given} if given is not None else fresh
        return TrainState(step=jnp.array(0, jnp.int32), params=fresh, opt_state=tx.init(fresh))
    return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(setup.cfg.train.seed), params)


class JitTrainStep:
    """The train step compiled once over the mesh (see the module docstring)."""

    def __init__(self, setup, objective, tx: optax.GradientTransformation,
                 schedule: optax.Schedule):
        self.setup, self.objective, self.tx = setup, objective, tx
        cfg, mesh = setup.cfg, setup.mesh
        boxed = boxed_state(setup.boxed_params, tx)
        self.abstract_state = nn.meta.unbox(boxed)
        self.state_shardings = sharding.logical_shardings(boxed, mesh, cfg.mesh)
        # One sharding per batch key (the objective's batch spec): rows split over the mesh.
        self.batch_shardings = {k: sharding.batch_sharding(mesh, cfg.mesh, len(v.shape))
                                for k, v in objective.batch_spec(cfg.train.batch_size).items()}
        self.data_parallel = sharding.data_parallel_size(mesh, cfg.mesh)
        self.num_devices = mesh.size
        self.traces = 0  # how often the step was traced: more than once means it recompiled
        bound = functools.partial(train_step, loss_fn=functools.partial(objective.loss, setup.model),
                                  tx=tx, schedule=schedule, microbatches=cfg.train.microbatches,
                                  metrics=objective.metrics,
                                  clip_norm=cfg.optimizer.grad_clip_norm)

        def counted(state, batch, rng):
            self.traces += 1
            return bound(state, batch, rng)
        counted.__name__ = counted.__qualname__ = "train_step"  # names the HLO and its dumps
        rep = sharding.replicated(mesh)
        self.jitted = jax.jit(counted, in_shardings=(self.state_shardings, self.batch_shardings, rep),
                              out_shardings=(self.state_shardings, rep), donate_argnums=(0,))

    def __call__(self, state: TrainState, batch: dict, rng: jax.Array):
        with sharding.activate(self.setup.mesh, self.setup.cfg.mesh):
            return self.jitted(state, batch, rng)

    def init_state(self, params=None) -> TrainState:
        return fresh_state(self.setup, self.tx, self.state_shardings, params)

    def place_batch(self, local_batch: dict) -> dict:
        """This process's numpy rows -> global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], v)
                for k, v in local_batch.items()}

    def place_state(self, state: TrainState) -> TrainState:
        return state  # already in state_shardings

    def global_state(self, state: TrainState) -> TrainState:
        return state
