"""The classic data-parallel path (`config.parallelism = "pmap"`), as one adapter with the
interface of jaxlm.train.step.JitTrainStep.

Every local device holds a full replica of the state (a leading device axis); each takes
its share of the batch rows, sums its loss and gradients, one `psum` adds the sums of all
devices, and every replica takes the identical update. config.mesh is not used for
training. Checkpoints hold the one unreplicated state, so a run saved under pmap resumes
under jit and the other way round.

DP-SGD (config.privacy): each device clips its own examples; the noise key is split off
the step's key before the device index is folded in, so every replica draws the same
noise for the same reduced sum: the noise is added once, as on the jit path.
"""

from __future__ import annotations

import functools

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.trainable import Trainable
from jaxlm.train import privacy
from jaxlm.train.step import (TrainState, apply_update, bind_loss, boxed_state, check_aux,
                              dp_args, finalize, fresh_state, gradient_fns, local_sums,
                              private_args)

AXIS = "devices"


def pmap_train_step(state: TrainState, frozen, aux, batch: dict, rng: jax.Array,
                    dp: dict | None = None, *, objective, model, split: Trainable,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    microbatches: int, clip_norm: float = 0.0) -> tuple[TrainState, dict]:
    """One step on one device's rows, run under `jax.pmap(axis_name=AXIS)`: the two-phase
    gradient of jaxlm.train.step with the reduction an explicit psum."""
    device = jax.lax.axis_index(AXIS)
    grad_fn, rng, noise = gradient_fns(bind_loss(objective, model, split, frozen, aux),
                                       jax.random.fold_in(rng, state.step), dp)
    rng = jax.random.fold_in(rng, device)  # dropout differs per device, the noise does not
    sums = local_sums(state.params, batch, rng, grad_fn=grad_fn, microbatches=microbatches,
                      metrics=objective.metrics)
    sums = jax.lax.psum(sums, axis_name=AXIS)
    return apply_update(state, finalize(sums, clip_norm=clip_norm, noise=noise), tx=tx,
                        schedule=schedule)


class PmapTrainStep:
    def __init__(self, setup, objective, tx: optax.GradientTransformation,
                 schedule: optax.Schedule, aux=None, init_extra=None):
        self.setup, self.objective, self.tx = setup, objective, tx
        self.init_extra = init_extra
        self.devices = jax.local_devices()
        self.data_parallel = len(self.devices)
        self.num_devices = jax.device_count()
        self.split = Trainable.of(setup.cfg, setup.abstract_params)
        boxed_frozen = self.split.split(setup.boxed_params)[1]
        # Inits and restores happen on the first device; `place_state` replicates.
        self.abstract_state = nn.meta.unbox(boxed_state(setup.boxed_params, self.split, tx,
                                                        init_extra))
        self.abstract_frozen = nn.meta.unbox(boxed_frozen)
        one = jax.sharding.SingleDeviceSharding(self.devices[0])
        self.state_shardings = jax.tree_util.tree_map(lambda _: one, self.abstract_state)
        self.frozen_shardings = jax.tree_util.tree_map(lambda _: one, self.abstract_frozen)
        self.frozen = {}  # global layout (first device); replicated for the step
        if getattr(objective, "aux_spec", None) is not None or aux is not None:
            check_aux(aux, getattr(objective, "aux_spec", None))
        mesh = jax.sharding.Mesh(np.asarray(self.devices), (AXIS,))
        self._split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
        self._replicated = {}  # id of a global tree -> its per-device copies
        self.aux = aux
        self.traces = 0
        self.private = privacy.enabled(setup.cfg.privacy)  # DP-SGD (as JitTrainStep)
        self.dp = None
        bound = functools.partial(
            pmap_train_step, objective=objective, model=setup.model, split=self.split, tx=tx,
            schedule=schedule, microbatches=setup.cfg.train.microbatches,
            clip_norm=setup.cfg.optimizer.grad_clip_norm)

        def counted(state, frozen, aux, batch, rng, dp):
            self.traces += 1
            return bound(state, frozen, aux, batch, rng, dp)
        counted.__name__ = counted.__qualname__ = "train_step"  # names the HLO and its dumps
        self._pmapped = jax.pmap(counted, axis_name=AXIS, in_axes=(0, 0, 0, 0, None, None),
                                 donate_argnums=(0,))

    def __call__(self, state, batch, rng):
        frozen, aux = self._replicas("frozen", self.frozen), self._replicas("aux", self.aux)
        state, metrics = self._pmapped(state, frozen, aux, batch, rng, private_args(self))
        return state, jax.tree_util.tree_map(lambda x: x[0], metrics)  # identical on all

    def set_privacy(self, l2_clip: float, noise_std: float, denominator: float) -> None:
        self.dp = dp_args(l2_clip, noise_std, denominator)

    def _replicas(self, name: str, tree):
        """`tree` copied to every local device, once (it does not change between steps)."""
        if name not in self._replicated or self._replicated[name][0] is not tree:
            self._replicated[name] = (tree, self.place_state(tree))
        return self._replicated[name][1]

    def init_state(self, params=None):
        state, self.frozen = fresh_state(self.setup, self.split, self.tx,
                                         (self.state_shardings, self.frozen_shardings), params,
                                         self.init_extra)
        return state

    def params(self, state):
        return self.split.merge(self.global_state(state).params, self.frozen)

    def place_batch(self, local_batch: dict) -> dict:
        """Rows [B, ...] -> [devices, B / devices, ...], one slice per device."""
        return {k: jax.device_put(einops.rearrange(v, "(d n) ... -> d n ...", d=len(self.devices)),
                                  self._split)
                for k, v in local_batch.items()}

    def place_state(self, state):
        """One copy per local device, stacked on a new leading axis."""
        n = len(self.devices)
        return jax.tree_util.tree_map(
            lambda x: jax.device_put(jnp.broadcast_to(x, (n,) + x.shape), self._split), state)

    def global_state(self, state):
        return jax.tree_util.tree_map(lambda x: x[0], state)
