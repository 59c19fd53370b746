"""The train state, the pure train step, and the step jitted over the mesh.

`train_step(state, frozen, aux, batch, rng, ...) -> (state, metrics)` is a module-level
function of its inputs only. `JitTrainStep` binds model, objective and optimizer and jits
it once with explicit shardings and a donated state. jaxlm.train.pmap has the same
interface for the classic pmap path, so the loop never asks which one it drives:

    step.init_state(params=None)          -> a fresh state, global layout (as checkpointed)
    step.abstract_state, .state_shardings -> restore target of a checkpoint, same layout
    step.frozen                           -> the frozen base (config.train.trainable)
    step.place_state(state)               -> the state in the layout the step runs on
    step.place_batch(numpy rows)          -> device batch (this process's rows)
    step(state, batch, rng)               -> (state, metrics), in the step's layout
    step.global_state(state)              -> back to the global layout, e.g. to save it
    step.params(state)                    -> the whole params tree (trainable + frozen)

The gradient is made in two phases so that plain, accumulated, data-parallel and
differentially private training share one path:
  1. `local_sums`: per microbatch, the gradient of the *summed* loss, added up in a scan
     (`grad_fn` computes one microbatch's; DP-SGD's per-example clipping replaces it,
     jaxlm.train.privacy, and runs inside the scan, never holding every example's
     gradient at once);
  2. the cross-device reduction: XLA's under jit (the batch is sharded), a psum under pmap;
  3. `finalize`: the one place that owns the denominator (the total token weight; under
     DP the public expected batch size), the global-norm clip, the non-finite check and
     DP's Gaussian noise (`PrivateNoise`), added once to the reduced sum.
The optimizer update then runs on the finalized gradient, unchanged by any of this.
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
from jaxlm.errors import ConfigError
from jaxlm.train import optimizer, privacy
from jaxlm.trainable import Trainable


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 scalar: optimizer steps taken
    params: Any           # the trainable parameters (all of them unless config.train.trainable)
    opt_state: Any        # the optimizer's state, for the trainable parameters only
    extra: Any = None     # state that is not parameters nor an optimizer's (pruning's masks
                          # live in its optax state): made by the step's `init_extra(params)`,
                          # carried through every step and saved with the state


@flax.struct.dataclass
class GradSums:
    """What microbatches and devices add up: sums, never means, so that M microbatches (or
    N devices) equal one M-times larger batch up to float summation order."""
    grads: Any            # gradient of the summed loss w.r.t. the trainable parameters
    loss: jax.Array       # summed loss
    weight: jax.Array     # summed token (or example) weight: the denominator
    metrics: dict         # {name: summed value}


def value_and_grad(loss_fn: Callable) -> Callable:
    """One microbatch's (loss sum, (weight, metrics)), gradient: the default `grad_fn`."""
    return jax.value_and_grad(functools.partial(loss_fn, deterministic=False), has_aux=True)


def local_sums(params, batch: dict, rng: jax.Array, *, grad_fn: Callable, microbatches: int,
               metrics: tuple[str, ...] = ()) -> GradSums:
    """Phase 1: the sums of this device's (jit: the global) batch over `microbatches`.
    `grad_fn(params, microbatch, rng) -> ((loss sum, (weight sum, {metric: sum})), grads)`.

    Microbatch i takes rows i, i+M, i+2M, ... so that every data-parallel shard keeps its
    own rows (a contiguous split would move data between devices).
    """
    def accumulate(carry: GradSums, xs):
        i, micro = xs
        (loss, (weight, sums)), grads = grad_fn(params, micro, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, carry, GradSums(grads, loss, weight, sums)), None

    zero = jnp.float32(0)
    init = GradSums(jax.tree_util.tree_map(jnp.zeros_like, params), zero, zero,
                    {k: zero for k in metrics})
    micro_batches = jax.tree_util.tree_map(
        lambda x: einops.rearrange(x, "(n m) ... -> m n ...", m=microbatches), batch)
    sums, _ = jax.lax.scan(accumulate, init, (jnp.arange(microbatches), micro_batches))
    return sums


@flax.struct.dataclass
class Finalized:
    """The step's gradient is `grads * scale`; `scale` is applied inside the update so that
    it fuses into the optimizer's pass over the parameters (no extra copy of the gradient)."""
    grads: Any
    scale: jax.Array
    finite: jax.Array
    metrics: dict


@flax.struct.dataclass
class PrivateNoise:
    """DP-SGD's part of `finalize` (jaxlm.train.privacy): N(0, std^2) noise on every
    coordinate of the summed clipped gradients, drawn from `rng`, and the public
    denominator (the expected batch size) that replaces the data-dependent token weight."""
    rng: jax.Array
    std: jax.Array
    denominator: jax.Array


def finalize(sums: GradSums, *, clip_norm: float = 0.0,
             noise: PrivateNoise | None = None) -> Finalized:
    """Phase 3, on the reduced sums: divides by the total weight, clips the mean gradient to
    global norm `clip_norm` (0: no clipping), and flags a non-finite loss or gradient norm.
    With `noise` (DP-SGD) the noise is added to the summed gradient first, the division is
    by `noise.denominator`, and only the noised gradient is checked: a skip decided by the
    raw loss would depend on the private batch. The loss and metrics stay per weight."""
    weight = jnp.maximum(sums.weight, 1.0)
    grads, denom = sums.grads, weight
    if noise is not None:
        grads = privacy.add_noise(grads, noise.rng, noise.std)
        denom = noise.denominator
    loss, grad_norm = sums.loss / weight, optax.tree.norm(grads) / denom  # of the mean
    scale = optimizer.clip_factor(grad_norm, clip_norm) / denom
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": sums.weight,
               **{k: v / weight for k, v in sums.metrics.items()}}
    finite = jnp.isfinite(grad_norm) & (jnp.isfinite(loss) if noise is None else True)
    return Finalized(grads, scale, finite, metrics)


def apply_update(state: TrainState, final: Finalized, *, tx: optax.GradientTransformation,
                 schedule: optax.Schedule) -> tuple[TrainState, dict]:
    """The optimizer step on the finalized gradient.

    A step whose loss or gradient norm is not finite is not applied: params and optimizer
    state stay as they were (the step counter still advances past the bad batch), and
    metrics["nonfinite"] says so. The loop then stops or skips (config.train.nonfinite).
    """
    def update(params, opt_state):
        scaled = jax.tree_util.tree_map(lambda g: g * final.scale.astype(g.dtype), final.grads)
        updates, opt_state = tx.update(scaled, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A branch, not jnp.where(finite, new, old) on every leaf: the select kept the old
    # params and moments alive beside the new ones, and XLA copied all of them each step.
    params, opt_state = jax.lax.cond(final.finite, update, lambda *old: old,
                                     state.params, state.opt_state)
    metrics = {**final.metrics, "learning_rate": schedule(state.step), "nonfinite": ~final.finite}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def bind_loss(objective, model, split: Trainable, frozen, aux) -> Callable:
    """loss(trainable params, batch, rng, deterministic) of the whole model: the frozen base
    joins the trainables inside the differentiated function (so it gets no gradient), and
    auxiliary inputs (e.g. a teacher's params) reach the objective as constants."""
    def loss(trainable, batch, rng, *, deterministic):
        return objective.loss(model, split.merge(trainable, frozen), batch, rng,
                              deterministic=deterministic, aux=aux)
    return loss


def gradient_fns(loss: Callable, rng: jax.Array, dp: dict | None):
    """(grad_fn of phase 1, its rng, the PrivateNoise of phase 3 or None) of one step:
    DP-SGD (`dp` given) clips per example, and splits the noise key off the step's."""
    if dp is None:
        return value_and_grad(loss), rng, None
    rng, noise_rng = jax.random.split(rng)
    return (privacy.clipped_value_and_grad(loss, dp["l2_clip"]), rng,
            PrivateNoise(noise_rng, dp["std"], dp["denominator"]))


def train_step(state: TrainState, frozen, aux, batch: dict, rng: jax.Array,
               dp: dict | None = None, *, objective, model, split: Trainable,
               tx: optax.GradientTransformation, schedule: optax.Schedule, microbatches: int,
               clip_norm: float = 0.0) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch (jit path: XLA inserts the collectives, so the
    sums of phase 1 are already reduced over devices). DP-SGD when `dp` is given:
    {"l2_clip", "std" (of the noise), "denominator"}, scalars (dp_args), so another clip
    or epsilon does not recompile."""
    rng = jax.random.fold_in(rng, state.step)
    grad_fn, rng, noise = gradient_fns(bind_loss(objective, model, split, frozen, aux), rng, dp)
    sums = local_sums(state.params, batch, rng, grad_fn=grad_fn, microbatches=microbatches,
                      metrics=objective.metrics)
    return apply_update(state, finalize(sums, clip_norm=clip_norm, noise=noise), tx=tx,
                        schedule=schedule)


def boxed_state(boxed_params, split: Trainable, tx, init_extra=None):
    """Abstract train state whose optimizer moments carry their parameters' logical axis
    names (tx.init on boxed params boxes the moments alike), so they shard the same way;
    so does `extra` when init_extra maps over the params (e.g. one mask per kernel)."""
    return jax.eval_shape(functools.partial(new_state, split=split, tx=tx,
                                            init_extra=init_extra), boxed_params)[0]


def new_state(params, *, split: Trainable, tx, init_extra=None) -> tuple[TrainState, Any]:
    """(the state at step 0 for `params`, the frozen base): the trainables get optimizer
    state, `init_extra(params)` (if given) makes the extra state."""
    trainable, frozen = split.split(params)
    extra = init_extra(params) if init_extra is not None else None
    return TrainState(step=jnp.array(0, jnp.int32), params=trainable,
                      opt_state=tx.init(trainable), extra=extra), frozen


def fresh_state(setup, split: Trainable, tx: optax.GradientTransformation, shardings,
                params=None, init_extra=None) -> tuple[TrainState, dict]:
    """(a new state, the frozen base) for seed config.train.seed, created straight into
    `shardings` (of both): no host ever holds the full model. `params` (e.g. a pretrained
    encoder) replace the fresh parameters of the same paths; the others (a new head, LoRA's
    adapters) stay fresh."""
    def init(rng, given):
        fresh = setup.init_params(rng)
        if given is not None:
            flat = flax.traverse_util.flatten_dict(fresh)
            flat.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(given)))
            fresh = flax.traverse_util.unflatten_dict(flat)
        return new_state(fresh, split=split, tx=tx, init_extra=init_extra)
    return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(setup.cfg.train.seed), params)


def check_aux(aux, spec, where: str = "auxiliary input") -> None:
    """Refuses auxiliary inputs whose structure, shapes or dtypes differ from what the
    objective declares (`objective.aux_spec`: a tree of ShapeDtypeStructs), naming the
    first difference."""
    got = dict(jax.tree_util.tree_leaves_with_path(aux))
    want = dict(jax.tree_util.tree_leaves_with_path(spec))
    for path in sorted(set(got) | set(want), key=jax.tree_util.keystr):
        name = f"{where} {jax.tree_util.keystr(path)}"
        if path not in got or path not in want:
            raise ConfigError(f"{name} is {'missing' if path not in got else 'not expected'}: "
                              "the auxiliary model does not fit the objective")
        g, w = got[path], want[path]
        if (g.shape, g.dtype) != (w.shape, w.dtype):
            raise ConfigError(f"{name} has shape {g.shape} {g.dtype}, the objective expects "
                              f"{w.shape} {w.dtype}: the auxiliary model does not fit")


def dp_args(l2_clip: float, noise_std: float, denominator: float) -> dict:
    """The `dp` argument of a private step: per-example clip norm, noise std, denominator."""
    return {"l2_clip": jnp.float32(l2_clip), "std": jnp.float32(noise_std),
            "denominator": jnp.float32(denominator)}


def private_args(step) -> dict | None:
    """The `dp` argument of a step (JitTrainStep or the pmap adapter): None when not private."""
    if not step.private:
        return None
    if step.dp is None:
        raise RuntimeError("a private train step needs set_privacy() before it runs")
    return step.dp


class JitTrainStep:
    """The train step compiled once over the mesh (see the module docstring).

    `aux`: inputs the objective reads besides the batch (e.g. {"teacher": params} of a
    distillation teacher built on the same mesh), as placed arrays: jit arguments with
    their own shardings, never donated, never differentiated or seen by the optimizer.
    `init_extra(params) -> tree`: the state's `extra` (TrainState)."""

    def __init__(self, setup, objective, tx: optax.GradientTransformation,
                 schedule: optax.Schedule, aux=None, init_extra=None):
        self.setup, self.objective, self.tx = setup, objective, tx
        self.init_extra = init_extra
        cfg, mesh = setup.cfg, setup.mesh
        self.split = Trainable.of(cfg, setup.abstract_params)
        boxed_frozen = self.split.split(setup.boxed_params)[1]
        boxed = boxed_state(setup.boxed_params, self.split, tx, init_extra)
        self.abstract_state = nn.meta.unbox(boxed)
        self.state_shardings = sharding.logical_shardings(boxed, mesh, cfg.mesh)
        self.abstract_frozen = nn.meta.unbox(boxed_frozen)
        self.frozen_shardings = sharding.logical_shardings(boxed_frozen, mesh, cfg.mesh)
        self.frozen = {}  # set by init_state or a restore (jaxlm.train.loop)
        if getattr(objective, "aux_spec", None) is not None or aux is not None:
            check_aux(aux, getattr(objective, "aux_spec", None))
        self.aux = aux
        aux_shardings = jax.tree_util.tree_map(lambda x: x.sharding, aux)
        # One sharding per batch key (the objective's batch spec): rows split over the mesh.
        self.batch_shardings = {k: sharding.batch_sharding(mesh, cfg.mesh, len(v.shape))
                                for k, v in objective.batch_spec(cfg.train.batch_size).items()}
        self.data_parallel = sharding.data_parallel_size(mesh, cfg.mesh)
        self.num_devices = mesh.size
        self.traces = 0  # how often the step was traced: more than once means it recompiled
        self.private = privacy.enabled(cfg.privacy)  # DP-SGD
        self.dp = None                               # its dp_args: set_privacy
        # With pipeline stages the microbatches flow through the stages inside the model
        # (layers.Pipeline), one forward and backward for the whole batch: no accumulation.
        accumulate = 1 if sharding.stage_count(mesh) > 1 else cfg.train.microbatches
        bound = functools.partial(train_step, objective=objective, model=setup.model,
                                  split=self.split, tx=tx, schedule=schedule,
                                  microbatches=accumulate,
                                  clip_norm=cfg.optimizer.grad_clip_norm)

        def counted(state, frozen, aux, batch, rng, dp):
            self.traces += 1
            return bound(state, frozen, aux, batch, rng, dp)
        counted.__name__ = counted.__qualname__ = "train_step"  # names the HLO and its dumps
        rep = self._replicated = sharding.replicated(mesh)
        self.jitted = jax.jit(counted, in_shardings=(self.state_shardings, self.frozen_shardings,
                                                     aux_shardings, self.batch_shardings, rep,
                                                     rep),
                              out_shardings=(self.state_shardings, rep), donate_argnums=(0,))

    def __call__(self, state: TrainState, batch: dict, rng: jax.Array):
        with sharding.activate(self.setup.mesh, self.setup.cfg.mesh):
            return self.jitted(state, self.frozen, self.aux, batch, rng, private_args(self))

    def set_privacy(self, l2_clip: float, noise_std: float, denominator: float) -> None:
        """DP-SGD's clip, noise std and denominator (jaxlm.train.privacy.Plan), before a step."""
        self.dp = jax.device_put(dp_args(l2_clip, noise_std, denominator), self._replicated)

    def lower(self, state, batch, rng):
        """The step lowered for abstract (ShapeDtypeStruct) arguments, e.g. for a TPU
        topology (jaxlm.plan); the frozen base and aux inputs as this step holds them."""
        frozen = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.abstract_frozen, self.frozen_shardings)
        dp = self.dp if self.dp is not None or not self.private else jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dp_args(1.0, 0.0, 1.0))
        with sharding.activate(self.setup.mesh, self.setup.cfg.mesh):
            return self.jitted.lower(state, frozen, self.aux, batch, rng, dp)

    def init_state(self, params=None) -> TrainState:
        state, self.frozen = fresh_state(self.setup, self.split, self.tx,
                                         (self.state_shardings, self.frozen_shardings), params,
                                         self.init_extra)
        return state

    def params(self, state: TrainState):
        """The whole params tree of a state in the step's layout."""
        return self.split.merge(self.global_state(state).params, self.frozen)

    def place_batch(self, local_batch: dict) -> dict:
        """This process's numpy rows -> global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], v)
                for k, v in local_batch.items()}

    def place_state(self, state: TrainState) -> TrainState:
        return state  # already in state_shardings

    def global_state(self, state: TrainState) -> TrainState:
        return state
