"""The classic data-parallel path (`config.parallelism = "pmap"`), as one adapter with the
interface of jaxlm.train.step.JitTrainStep.

Every local device holds a full replica of the state (a leading device axis); each takes
its share of the batch rows, sums its loss and gradients, one `psum` adds the sums of all
devices, and every replica takes the identical update. config.mesh is not used for
training. Checkpoints hold the one unreplicated state, so a run saved under pmap resumes
under jit and the other way round.
"""

from __future__ import annotations

import functools

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.train.step import (TrainState, accumulate_gradients, apply_gradients, boxed_state,
                              fresh_state)

AXIS = "devices"


def pmap_train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    microbatches: int, metrics: tuple[str, ...] = (),
                    clip_norm: float = 0.0) -> tuple[TrainState, dict]:
    """One step on one device's rows, run under `jax.pmap(axis_name=AXIS)`."""
    device = jax.lax.axis_index(AXIS)
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), device)
    sums = accumulate_gradients(state.params, batch, rng, loss_fn=loss_fn,
                                microbatches=microbatches, metrics=metrics)
    sums = jax.lax.psum(sums, axis_name=AXIS)
    return apply_gradients(state, *sums, tx=tx, schedule=schedule, clip_norm=clip_norm)


class PmapTrainStep:
    def __init__(self, setup, objective, tx: optax.GradientTransformation,
                 schedule: optax.Schedule):
        self.setup, self.objective, self.tx = setup, objective, tx
        self.devices = jax.local_devices()
        self.data_parallel = len(self.devices)
        self.num_devices = jax.device_count()
        # Inits and restores happen on the first device; `place_state` replicates.
        self.abstract_state = nn.meta.unbox(boxed_state(setup.boxed_params, tx))
        one = jax.sharding.SingleDeviceSharding(self.devices[0])
        self.state_shardings = jax.tree_util.tree_map(lambda _: one, self.abstract_state)
        mesh = jax.sharding.Mesh(np.asarray(self.devices), (AXIS,))
        self._split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
        self.traces = 0
        bound = functools.partial(
            pmap_train_step, loss_fn=functools.partial(objective.loss, setup.model), tx=tx,
            schedule=schedule, microbatches=setup.cfg.train.microbatches,
            metrics=objective.metrics, clip_norm=setup.cfg.optimizer.grad_clip_norm)

        def counted(state, batch, rng):
            self.traces += 1
            return bound(state, batch, rng)
        counted.__name__ = counted.__qualname__ = "train_step"  # names the HLO and its dumps
        self._pmapped = jax.pmap(counted, axis_name=AXIS, in_axes=(0, 0, None),
                                 donate_argnums=(0,))

    def __call__(self, state, batch, rng):
        state, metrics = self._pmapped(state, batch, rng)
        return state, jax.tree_util.tree_map(lambda x: x[0], metrics)  # identical on all

    def init_state(self, params=None):
        return fresh_state(self.setup, self.tx, self.state_shardings, params)

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
