"""Mesh construction and logical-axis rules.

Parameters and activations are annotated with logical names (see models/layers.py);
`config.mesh.rules` maps them to mesh axes. A single device is the trivial 1x1x1 mesh, so
the same jitted code runs on a laptop and on a pod.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg_mesh, num_devices: int) -> tuple[int, ...]:
    """Resolves the -1 entry of config.mesh and checks the product against the devices."""
    sizes = [cfg_mesh[a] for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError("config.mesh: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"config.mesh: fixed axes multiply to {known}, which does not "
                              f"divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} multiplies to "
                          f"{math.prod(sizes)}, but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(cfg_mesh, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg_mesh, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules(cfg_mesh) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                 for name, axes in cfg_mesh.rules)


def logical_shardings(tree, mesh: Mesh, cfg_mesh):
    """NamedShardings for a tree of logically annotated values (e.g. jax.eval_shape of init)."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules(cfg_mesh))


def batch_sharding(mesh: Mesh, cfg_mesh) -> NamedSharding:
    """Sharding of a [B, L] batch: B over the mesh axes the "batch" rule names."""
    batch_axes = dict(rules(cfg_mesh)).get("batch")
    return NamedSharding(mesh, P(batch_axes, None))


def data_parallel_size(mesh: Mesh, cfg_mesh) -> int:
    axes = dict(rules(cfg_mesh)).get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh: Mesh, cfg_mesh):
    """Makes `mesh` and the config's logical rules current, so the logical constraints in
    the model become sharding constraints while a function is traced."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules(cfg_mesh)):
        yield
