"""Mesh construction and logical-axis rules.

Parameters and activations are annotated with logical names (see models/layers.py); the
strategy named by `config.mesh.strategy` maps them to mesh axes. A single device is the
trivial 1x1x1x1 mesh, so the same jitted code runs on a laptop and on a pod.

Pipeline stages (config.mesh.pipeline > 1) add a "stage" axis, outermost, over which the
scanned blocks' stacked layer axis is split (logical "layers" -> "stage"); with one stage
the mesh has no such axis, so nothing changes for a model without stages.

A single slice's devices are ordered by `mesh_utils.create_device_mesh` (on TPU: along the
physical torus). Multi-slice (TPU slices joined by the data-centre network, or GPU hosts):
config.mesh.dcn_* say how many slices each axis spans. The mesh is then built with
`mesh_utils.create_hybrid_device_mesh`, so that only those axes cross the slow network.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
STAGE = "stage"  # pipeline stages: the outermost axis, present only with more than one
DCN_AXES = ("stage", "data", "fsdp")  # axes that may span slices (config.mesh.dcn_<axis>)
_FIELD = {STAGE: "pipeline"}  # mesh axis -> its config.mesh field, where the names differ


def stages(cfg_mesh) -> int:
    """Pipeline stages in all: config.mesh.pipeline per slice x dcn_pipeline slices."""
    return cfg_mesh.get("pipeline", 1) * cfg_mesh.get("dcn_pipeline", 1)


def mesh_axes(cfg_mesh) -> tuple[str, ...]:
    return ((STAGE,) if stages(cfg_mesh) > 1 else ()) + MESH_AXES


def stage_count(mesh: Mesh) -> int:
    """The stages of a mesh (1 when it has no stage axis)."""
    return dict(mesh.shape).get(STAGE, 1)


def mesh_shape(cfg_mesh, num_devices: int, where: str = "") -> tuple[int, ...]:
    """Resolves the -1 entry of config.mesh and checks the product against the devices."""
    axes = mesh_axes(cfg_mesh)
    sizes = [cfg_mesh[_FIELD.get(a, a)] for a in axes]
    if STAGE in axes and num_devices % sizes[0]:
        raise ConfigError(f"config.mesh.pipeline={sizes[0]} does not divide the "
                          f"{num_devices} devices{where}")
    if sizes.count(-1) > 1:
        raise ConfigError("config.mesh: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"config.mesh: fixed axes multiply to {known}, which does not "
                              f"divide the {num_devices} devices{where}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"config.mesh: {dict(zip(axes, sizes))} multiplies to "
                          f"{math.prod(sizes)}, but there are {num_devices} devices{where}")
    return tuple(sizes)


def _granules(devices, count: int) -> bool:
    """Whether slices are told apart by slice_index (TPU) rather than process (GPU, CPU)."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) == count:
        return False
    processes = {d.process_index for d in devices}
    if len(processes) != count:
        raise ConfigError(f"config.mesh.dcn_*: {count} slices requested, but the devices span "
                          f"{len(slices)} slice(s) and {len(processes)} process(es)")
    return True


def make_mesh(cfg_mesh, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    axes = mesh_axes(cfg_mesh)
    dcn = tuple(cfg_mesh.get(f"dcn_{_FIELD.get(a, a)}", 1) if a in DCN_AXES else 1 for a in axes)
    slices = math.prod(dcn)
    if slices == 1:
        # On TPU, create_device_mesh lays each axis along the chips' torus (rings of
        # neighbours); a plain reshape of the device list follows host order instead (on a
        # v5p 4x4x4 XLA then gathered FSDP shards with all-reduces: BENCHMARKS.md, "Device
        # order").
        # Elsewhere it is that reshape (GPU: sorted by id).
        grid = mesh_utils.create_device_mesh(mesh_shape(cfg_mesh, len(devices)), devices,
                                             allow_split_physical_axes=True)
        return Mesh(grid, axes)
    if len(devices) % slices:
        raise ConfigError(f"config.mesh.dcn_*: {slices} slices do not divide {len(devices)} devices")
    ici = mesh_shape(cfg_mesh, len(devices) // slices, where=" per slice")
    by_process = _granules(devices, slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
    return Mesh(grid, axes)


_BATCH = ("batch", ("data", "fsdp"))
_FSDP = (("embed", "fsdp"),)
_TP = (("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
# Activations split along their length when config.mesh.sequence > 1 (a no-op at size 1);
# attention then gathers keys and values across the sequence axis.
_SEQ = (("length", "sequence"),)

# Logical axis -> mesh axes, by strategy. Rules are tried in order and a mesh axis is used
# at most once per array, so under FSDP activations take "fsdp" for their batch and leave
# their embed axis whole, while parameters (no batch axis) are split along embed.
STRATEGIES = {
    "dp": (_BATCH, *_SEQ),
    "fsdp": (_BATCH, *_SEQ, *_FSDP),
    "tp": (_BATCH, *_SEQ, *_TP),
    "fsdp_tp": (_BATCH, *_SEQ, *_FSDP, *_TP),
}


# Pipeline stages: the stacked layer axis of the scanned blocks (parameters, their
# gradients and Adam moments) and the stage slots of the pipeline's activation buffer
# (layers.Pipeline) split over the stage axis; a mesh without stages has no such rule.
_STAGES = (("layers", STAGE), ("stage", STAGE))

# Every logical axis name the models use (models/layers.py).
# "layers" is the stacked axis of scanned blocks (config.model.scan_layers): split only
# over pipeline stages; "stage" is the stage slot of the pipeline's activations.
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "pos", "layers",
                "stage")


def rules(cfg_mesh) -> tuple:
    """The config's extra rules, then its strategy's; ConfigError for an unknown name."""
    if cfg_mesh.strategy not in STRATEGIES:
        raise ConfigError(f"config.mesh.strategy={cfg_mesh.strategy!r}: expected one of "
                          f"{sorted(STRATEGIES)}")
    extra = []
    for rule in cfg_mesh.rules:
        if not isinstance(rule, (list, tuple)) or len(rule) != 2:
            raise ConfigError(f"config.mesh.rules: {rule!r} is not a (logical axis, mesh axes) "
                              "pair; e.g. (('embed', 'fsdp'), ('mlp', ('tensor', 'fsdp')), "
                              "('heads', None))")
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        if not (axes is None or isinstance(axes, (str, tuple))):
            raise ConfigError(f"config.mesh.rules: ({name!r}, {axes!r}): the mesh axes are a "
                              "name, a tuple of names or None")
        if name not in LOGICAL_AXES:
            raise ConfigError(f"config.mesh.rules: unknown logical axis {name!r}; "
                              f"known: {', '.join(LOGICAL_AXES)}")
        for a in (axes,) if isinstance(axes, str) else axes or ():
            if a not in mesh_axes(cfg_mesh):
                raise ConfigError(f"config.mesh.rules: ({name!r}, {axes!r}) names mesh axis "
                                  f"{a!r}; mesh axes are {', '.join(mesh_axes(cfg_mesh))}")
        extra.append((name, axes))
    staged = _STAGES if stages(cfg_mesh) > 1 else ()
    return tuple(extra) + staged + STRATEGIES[cfg_mesh.strategy]


def logical_shardings(tree, mesh: Mesh, cfg_mesh):
    """NamedShardings for a tree of logically annotated values (e.g. jax.eval_shape of init)."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules(cfg_mesh))


def batch_sharding(mesh: Mesh, cfg_mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array [B, ...] of `ndim` dimensions: B over the mesh axes the
    "batch" rule names, the rest whole."""
    batch_axes = dict(rules(cfg_mesh)).get("batch")
    return NamedSharding(mesh, P(batch_axes, *[None] * (ndim - 1)))


def split_count(mesh: Mesh, cfg_mesh, logical: str) -> int:
    """Into how many parts the strategy's rules split the logical axis `logical`."""
    axes = dict(rules(cfg_mesh)).get(logical) or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def data_parallel_size(mesh: Mesh, cfg_mesh) -> int:
    return split_count(mesh, cfg_mesh, "batch")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh: Mesh, cfg_mesh):
    """Makes `mesh` and the config's logical rules current, so the logical constraints in
    the model become sharding constraints while a function is traced."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules(cfg_mesh)):
        yield


def check_divisible(boxed_tree, mesh: Mesh, cfg_mesh) -> None:
    """Every sharded dimension must split evenly over its mesh axes; raises ConfigError
    naming the parameter, its logical axis and the sizes otherwise."""
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for path, leaf in leaves:
        if not isinstance(leaf, nn.Partitioned):
            continue
        spec = nn.logical_to_mesh_axes(leaf.names, rules(cfg_mesh))
        for dim, (size, axes) in enumerate(zip(leaf.value.shape, spec)):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts:
                name = jax.tree_util.keystr(path)
                raise ConfigError(
                    f"parameter {name} has {leaf.names[dim]}={size}, which config.mesh."
                    f"strategy={cfg_mesh.strategy!r} splits over mesh axes {axes} of total "
                    f"size {parts}: not divisible (change the model size or config.mesh)")
