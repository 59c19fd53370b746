"""Fit check: compile the train step for a target topology, without the hardware.

    python -m jaxlm.plan --config=configs/gpt/gpt2_xl.py --topology=cpu:8 \
        --config.mesh.strategy=fsdp --config.mesh.data=1 --config.mesh.fsdp=8
    python -m jaxlm.plan --config=... --topology=tpu:v5e:4x4      # needs libtpu installed

Prints per-device memory (from the compiled program's memory analysis), FLOPs per step,
each parameter's sharding (blocks folded), plain-words warnings about weak choices, and
whether the step fits the device's memory (the HBM of TPU and GPU kinds it knows, or
--device-memory=GB). When it does not, it compiles the cheapest changes that keep the
maths (chunked loss, remat policies, wider FSDP, microbatches) and proposes the first
that fits. A TPU compile checks the HBM itself: over it, XLA refuses the step, and the
verdict gives XLA's figures before the proposals. Nothing is allocated: the state and batch
are abstract shapes carrying their shardings.

With pipeline stages (config.mesh.pipeline) it also prints the GPipe bubble (the share
of stage time idle while the pipeline fills and drains) and what one stage's devices hold:
parameters, optimizer state and activations. When a scanned model does not fit, splitting
its layers into stages is among the proposals.

A run that trains part of its model (LoRA's adapters, config.train.trainable) also shows
how many parameters train and the optimizer state per device, against training the whole
model.

`--top=N` also lists what the temporaries are made of: the N largest address regions of
XLA's allocation (buffers not live at once share one), each named by its largest buffer's
shape and the JAX operation that made it (layers folded: block_3 -> block_*), from XLA's
buffer assignment. That is how to find what makes a config need more memory than
expected, or more than another program of the same model (BENCHMARKS.md, "The largest
batch on every slice").

Topologies: `cpu:N` uses N fake CPU devices (always available); `tpu:<name>` (e.g.
v4:2x2x2, v5e:4x4) uses libtpu's topology descriptions, which need `pip install libtpu`
of the version matching jax, but no TPU.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import cli, models, sharding, trainable
from jaxlm.config import apply_override
from jaxlm.errors import ConfigError
from jaxlm.models.layers import bubble_fraction
from jaxlm.train.build import build_train

# HBM per device, for the "does it fit" verdict. Matched as substrings of device_kind like
# metrics.PEAK_FLOPS. GPUs: vendor spec sheets. v5e, v5p, v6e: what XLA lets one program
# use, the "available HBM" of its compile-time out-of-memory error under libtpu 0.0.52
# (BENCHMARKS.md, "HBM as XLA counts it"). These are GiB: 95e9 bytes, the v5p figure here
# before, was 7.8 GB short of what XLA compiles (benchmarks/tpu_hbm.py measures them). v4:
# the spec's 32 GB a chip; libtpu's AOT description of a v4 slice makes each of a chip's two
# cores a device instead, with 15.25 GiB available to each.
GiB = 2 ** 30
HBM_BYTES = (
    ("H200", 141e9), ("H100", 80e9), ("A100", 80e9),
    ("TPU v6 lite", 31.24 * GiB), ("TPU v5 lite", 15.75 * GiB), ("TPU v5", 95.73 * GiB),
    ("TPU v4", 32e9),
)


def topology_devices(spec: str) -> list:
    kind, _, rest = spec.partition(":")
    if kind == "cpu":
        if not rest.isdigit() or int(rest) < 1:
            raise ConfigError(f"--topology={spec}: expected cpu:N with N a whole number of "
                              "devices >= 1 (e.g. cpu:8), or tpu:<name> (e.g. tpu:v5e:4x4)")
        n = int(rest)
        jax.config.update("jax_num_cpu_devices", n)
        if jax.device_count() != n:
            raise ConfigError(f"--topology={spec}: JAX already started with "
                              f"{jax.device_count()} CPU devices")
        return jax.devices()
    if kind == "tpu":
        from jax.experimental import topologies
        try:
            return topologies.get_topology_desc(platform="tpu", topology_name=rest,
                                                **wraparound(rest)).devices
        except Exception as e:  # libtpu missing or unknown name: say which
            known = "INVALID_ARGUMENT" in str(e)  # libtpu answered: not a slice it knows
            raise ConfigError(f"--topology={spec}: no TPU topology description ({e}); " + (
                "name a slice of a TPU kind the installed libtpu knows (e.g. v5e:4x4)" if known
                else "install libtpu matching your jax version")) from None
    raise ConfigError(f"--topology={spec}: expected cpu:N or tpu:<name>")


def wraparound(name: str) -> dict:
    """get_topology_desc's `wrap` for a TPU slice name (v5p:4x4x4), where any side closes
    into a ring: v4 and v5p slices whose sides are all multiples of 4 are 3D tori, and a v5e
    or v6e side of 16 chips wraps (the wraparound MaxText's accelerator table gives each
    slice). libtpu assumes an open mesh unless told. Compiled for an open 4x4x4 v5p, or
    with the devices in host order (sharding.make_mesh), XLA gathered FSDP shards with
    all-reduces where the real torus takes all-gathers (BENCHMARKS.md, "Device order")."""
    try:
        sides = [int(d) for d in name.partition(":")[2].split("x")]
    except ValueError:
        return {}  # libtpu names the problem
    wrap = ((all(s % 4 == 0 for s in sides),) * 3 if len(sides) == 3
            else tuple(s == 16 for s in sides) + (False,) * (3 - len(sides)))
    return {"wrap": wrap} if any(wrap) else {}


@dataclasses.dataclass
class Stages:
    """A pipelined step: its schedule and what each device of a stage holds."""
    stages: int
    microbatches: int
    repeats: int             # rounds of the circular schedule (1: GPipe)
    param_bytes: int         # per device: this stage's layers and the unstaged rest
    optimizer_bytes: int     # per device: their optimizer state

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.stages, self.microbatches, self.repeats)

    @property
    def schedule(self) -> str:
        return "GPipe" if self.repeats == 1 else f"circular, {self.repeats} rounds"


@dataclasses.dataclass
class Plan:
    mesh: dict
    device_kind: str
    argument_bytes: int      # per device: state + batch
    output_bytes: int
    temp_bytes: int          # activations and scratch
    alias_bytes: int         # outputs written in place of donated arguments
    flops_per_step: float    # per device, from XLA's cost analysis
    model_flops: float       # per device: the family's analytic count (6N + attention)
    param_shardings: dict    # parameter path -> PartitionSpec
    warnings: list
    # --top: the temporaries' largest address regions, (largest buffer, bytes, buffers)
    temp_regions: list = dataclasses.field(default_factory=list)
    # Part of the model trained (config.train.trainable, LoRA): parameters trained and in
    # all, and per device the optimizer state's bytes, and what training the whole model
    # (without LoRA's adapters) would hold. None when every parameter trains.
    trained: tuple[int, int, int, int] | None = None
    pipeline: Stages | None = None  # with pipeline stages (config.mesh.pipeline)

    @property
    def peak_bytes(self) -> int:
        """What one device must hold at once: arguments + outputs + temporaries, outputs
        that reuse donated arguments counted once."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


class OutOfMemory(Exception):
    """XLA refused to compile the step because it needs more memory than a device has
    (TPU compiles check this; CPU and GPU compiles do not). str(): XLA's words."""

    def __init__(self, xla_message: str, mesh: dict, device_kind: str):
        super().__init__(xla_message)
        self.mesh, self.device_kind = mesh, device_kind

    @property
    def reason(self) -> str:
        return hbm_refusal(str(self)) or str(self).splitlines()[0]


def hbm_refusal(text: str) -> str | None:
    """XLA's sentence in `text` (an error, a compile's output) when it refused a program for
    want of device memory, e.g. 'Ran out of memory on HBM, the total memory required for
    HLO temporaries (62.66G) exceeds available HBM (15.75G)'; else None."""
    found = re.search(r"CompileTimeHbmOom: (.*?)(\. HLO module|$)", text, re.M)
    return found.group(1) if found else None


def compile_train_step(cfg: ml_collections.ConfigDict, devices, dump_dir: str | None = None):
    """AOT-compiles the jitted train step for `devices`; returns (compiled, train step).
    dump_dir: where XLA writes its HLO and buffer-liveness dumps (none if None).
    OutOfMemory when XLA refuses it for want of device memory."""
    if cfg.parallelism != "jit":
        raise ConfigError("jaxlm.plan compiles the jit path; set config.parallelism=jit")
    step = build_train(cfg, devices)
    mesh = step.setup.mesh
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    state = jax.tree_util.tree_map(with_sharding, step.abstract_state, step.state_shardings)
    batch = {k: with_sharding(v, step.batch_shardings[k])
             for k, v in step.objective.batch_spec(cfg.train.batch_size).items()}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    lowered = step.lower(state, batch, rng)
    with sharding.activate(mesh, cfg.mesh):
        try:
            compiled = lowered.compile(
                compiler_options={"xla_dump_to": dump_dir} if dump_dir else None)
        except jax.errors.JaxRuntimeError as e:
            if hbm_refusal(str(e)) is None:
                raise
            raise OutOfMemory(str(e), dict(mesh.shape), devices[0].device_kind) from None
    return compiled, step


def _op_group(name: str) -> str:
    """Buffer name -> group: layers folded, tuple index and HLO instance number dropped."""
    name = name.removeprefix("jit(train_step)/").replace("while/body/closed_call/", "")
    name = re.sub(r"block_\d+", "block_*", name).replace("blocks/blocks/", "blocks/")
    name = re.sub(r"(\.\d+)?(\{\d+\})?$", "", name)
    # A while loop: the scan over layers (config.model.scan_layers) outputs what the
    # backward pass reads, stacked over every layer; microbatches are a scan too.
    if re.fullmatch(r"(jvp\(\w+\)/)?while(/body/closed_call)?", name):
        return f"{name} (a scan's carried and stacked buffers: with scan_layers, the " \
               "activations every layer keeps for the backward pass)"
    return name


def _dump(dump_dir: str, suffix: str) -> str:
    """The largest of XLA's dumps of the train step ending in `suffix` (the step's module;
    its smaller namesakes are helper programs)."""
    files = sorted(glob.glob(os.path.join(dump_dir, f"*train_step*{suffix}")),
                   key=os.path.getsize)
    if not files:
        raise RuntimeError(
            f"XLA wrote no *{suffix} dump to {dump_dir}: an executable served by JAX's "
            "persistent compilation cache (JAX_COMPILATION_CACHE_DIR) is not compiled and "
            "leaves none; `python -m jaxlm.plan` turns that cache off for itself")
    with open(files[-1]) as f:
        return f.read()


def temp_regions(dump_dir: str) -> list[tuple[str, int, int]]:
    """What the temporaries' allocation is made of, from XLA's buffer assignment of the
    train step: [(largest buffer, region bytes, buffers)], largest region first.

    XLA places every temporary buffer at an offset in one allocation (its size is the
    step's temp_bytes) and reuses an address range for buffers that are not live at the
    same time. The ranges that overlap are merged into regions, which are disjoint and
    add up to nearly the whole allocation; a region is named by its largest buffer (shape,
    and the JAX operation that made it, layers folded). A per-time liveness count is no
    substitute: on TPU, XLA's own count at its peak (the live-range dump) missed the
    [B, L, V] logits that took half of the allocation (BENCHMARKS.md, "The largest batch
    on every slice")."""
    assignment = _dump(dump_dir, "after_optimizations-buffer-assignment.txt")
    hlo = _dump(dump_dir, "after_optimizations.txt")
    op_of = dict(re.findall(r'^\s*(?:ROOT )?%(\S+) = [^\n]*?op_name="([^"]*)"', hlo, re.M))
    buffers, base = [], 0
    for size, values in re.findall(r"^allocation \d+: size (\d+),(?: page \d+,)? "
                                   r"preallocated-temp:\n((?: value:.*\n)*)", assignment, re.M):
        for name, n, offset, shape in re.findall(
                r"value: <\d+ (\S+?)(?:\{[\d,]*\})?(?: \(phi\))? @0> "
                r"\(size=(\d+),offset=(\d+)\): (.*)", values):
            shape = re.sub(r"\{[^}]*\}", "", shape)  # the layouts
            buffers.append((base + int(offset), int(n), name, shape))
        base += int(size)
    if not buffers:
        raise RuntimeError(f"XLA's buffer assignment in {dump_dir} holds no temporaries in "
                           "a preallocated-temp allocation (unknown XLA dump format)")
    regions: list[list] = []  # [start, end, [(bytes, instruction, shape)]]
    for start, n, name, shape in sorted(buffers):
        if regions and start < regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], start + n)
            regions[-1][2].append((n, name, shape))
        else:
            regions.append([start, start + n, [(n, name, shape)]])
    out = []
    for start, end, held in regions:
        _, name, shape = max(held, key=lambda b: (b[0], b[1] in op_of))
        made_by = _op_group(op_of[name]) if name in op_of else f"{name} (XLA's own, no JAX op)"
        out.append((f"{shape} {made_by}", end - start, len(held)))
    return sorted(out, key=lambda r: -r[1])


def weak_choices(cfg: ml_collections.ConfigDict, mesh_shape: dict) -> list[str]:
    """Plain-words warnings about configurations that run but waste the hardware."""
    m, me, out = cfg.model, cfg.mesh, []
    strategy = me.strategy
    if "fsdp" in strategy and mesh_shape["fsdp"] == 1:
        out.append(f"strategy {strategy!r} shards parameters over the fsdp axis, but "
                   "config.mesh.fsdp is 1: every device holds the full model and optimizer "
                   "state. Give fsdp the devices (e.g. config.mesh.data=1, fsdp=-1).")
    if "tp" in strategy and mesh_shape["tensor"] == 1:
        out.append(f"strategy {strategy!r} splits heads and MLP over the tensor axis, but "
                   "config.mesh.tensor is 1: nothing is tensor-parallel.")
    if mesh_shape["tensor"] > m.num_heads:
        out.append(f"the tensor axis ({mesh_shape['tensor']}) is wider than the number of "
                   f"heads ({m.num_heads}): attention cannot be split that many ways.")
    if strategy == "dp" and mesh_shape["fsdp"] * mesh_shape["tensor"] > 1:
        out.append("strategy 'dp' replicates parameters, so the fsdp/tensor axes only add "
                   "data parallelism.")
    stages, micro = mesh_shape.get(sharding.STAGE, 1), cfg.train.microbatches
    repeats = me.pipeline_repeats
    if stages > 1 and micro < 2 * stages:
        out.append(f"{stages} pipeline stages with config.train.microbatches={micro}: the "
                   f"stages idle {bubble_fraction(stages, micro, repeats):.0%} of the time "
                   f"(the pipeline's bubble); {4 * stages} microbatches would bring it to "
                   f"{bubble_fraction(stages, 4 * stages, repeats):.0%}.")
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    per_device = cfg.train.batch_size / cfg.train.microbatches / dp
    if per_device < 1:
        out.append(f"each microbatch of {cfg.train.batch_size // cfg.train.microbatches} "
                   f"sequences is smaller than the {dp} data-parallel devices.")
    elif per_device * cfg.data.seq_len < 2048:
        out.append(f"each device processes only {per_device:g} sequence(s) x {cfg.data.seq_len} "
                   "tokens per microbatch: too little work to keep an accelerator busy; raise "
                   "the batch or lower microbatches.")
    return out


def make_plan(cfg: ml_collections.ConfigDict, devices, top: int = 0) -> Plan:
    """top > 0: also the `top` largest regions of the temporaries' allocation."""
    with tempfile.TemporaryDirectory() as dump_dir:
        compiled, step = compile_train_step(cfg, devices, dump_dir if top else None)
        regions = temp_regions(dump_dir) if top else []
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    specs = {jax.tree_util.keystr(path): s.spec for path, s in
             jax.tree_util.tree_leaves_with_path(step.setup.param_shardings)}
    mesh_shape = dict(step.setup.mesh.shape)
    warnings = weak_choices(cfg, mesh_shape)
    plan = Plan(mesh_shape, devices[0].device_kind, mem.argument_size_in_bytes,
                mem.output_size_in_bytes, mem.temp_size_in_bytes, mem.alias_size_in_bytes,
                float(cost.get("flops", 0.0)), model_flops(cfg, len(devices)), specs, warnings,
                regions[:top], trained_part(step), pipeline_part(step))
    if cfg.model.remat and devices[0].platform == "cpu":
        warnings.append("XLA:CPU's memory analysis ignores rematerialisation (its temporaries "
                        "come out the same with and without jax.checkpoint), so with "
                        "config.model.remat the temporaries above are an over-estimate; "
                        "compile for a tpu:<topology> for a remat-aware figure.")
    return plan


def per_device_bytes(abstract, shardings) -> int:
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree_util.tree_leaves(abstract),
                               jax.tree_util.tree_leaves(shardings)))


def pipeline_part(step) -> Stages | None:
    """Plan.pipeline of a step on a mesh with stages (None without)."""
    stages = sharding.stage_count(step.setup.mesh)
    if stages == 1:
        return None
    state, shardings = step.abstract_state, step.state_shardings
    cfg = step.setup.cfg
    return Stages(stages, cfg.train.microbatches, cfg.mesh.pipeline_repeats,
                  per_device_bytes(state.params, shardings.params),
                  per_device_bytes(state.opt_state, shardings.opt_state))


def trained_part(step) -> tuple[int, int, int, int] | None:
    """Plan.trained of a train step that trains part of its model: (parameters trained,
    parameters in all, optimizer-state bytes per device, the same when the whole model
    trains: every parameter but LoRA's adapters, under the same rules)."""
    if step.split.everything:
        return None
    setup = step.setup
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(setup.boxed_params))
    whole = flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if not re.search(trainable.ADAPTERS, k[-1])})
    opt_whole = jax.eval_shape(step.tx.init, whole)  # moments keep their params' axis names
    whole_bytes = per_device_bytes(nn.meta.unbox(opt_whole), sharding.logical_shardings(
        opt_whole, setup.mesh, setup.cfg.mesh))
    return (models.count_params(step.abstract_state.params),
            models.count_params(setup.abstract_params),
            per_device_bytes(step.abstract_state.opt_state, step.state_shardings.opt_state),
            whole_bytes)


def model_flops(cfg: ml_collections.ConfigDict, num_devices: int) -> float:
    """Training FLOPs of one step per device by the family's formula (no recomputation)."""
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return models.family(cfg.model.arch).flops_per_token(cfg.model, cfg.data.seq_len) * tokens / num_devices


def memory_flag(given: str) -> float | None:
    """--device-memory=GB as bytes (None when not given); checked before anything compiles."""
    if not given:
        return None
    try:
        gb = float(given.lower().removesuffix("gb"))
    except ValueError:
        gb = -1.0
    if gb <= 0:
        raise ConfigError(f"--device-memory={given}: expected GB per device, e.g. 16 or 80GB")
    return gb * 1e9


def device_memory(device_kind: str, given: float | None = None) -> float | None:
    """Bytes one device holds: `given` (--device-memory), else the known HBM of its kind
    (TPU topologies, NVIDIA GPUs), else None (e.g. cpu:N, which has no fixed budget)."""
    if given is not None:
        return given
    return next((b for k, b in HBM_BYTES if k in device_kind), None)


def candidates(cfg: ml_collections.ConfigDict, mesh_shape: dict, cpu: bool) -> list[dict]:
    """Changes that lower the per-device peak without changing the maths, cheapest first:
    {config field: value}. Remat is left out on CPU topologies, whose memory analysis does
    not see it (make_plan's warning)."""
    out = []
    L = cfg.data.seq_len
    if cfg.train.objective == "causal_lm" and not cfg.train.loss_chunk and L > 128 and L % 128 == 0:
        out.append({"train.loss_chunk": 128})
    if not cpu and not cfg.model.remat:
        out += [{"model.remat": True, "model.remat_policy": "save_dots_no_batch"},
                {"model.remat": True, "model.remat_policy": "full"}]
    elif not cpu and cfg.model.remat_policy != "full":
        out.append({"model.remat_policy": "full"})
    if mesh_shape["data"] > 1:  # parameters and optimizer state split over more devices
        strategy = {"dp": "fsdp", "tp": "fsdp_tp"}.get(cfg.mesh.strategy, cfg.mesh.strategy)
        out.append({"mesh.strategy": strategy, "mesh.fsdp": mesh_shape["fsdp"] * mesh_shape["data"],
                    "mesh.data": 1})
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    micro = cfg.train.microbatches
    for factor in (2, 4, 8, 16):
        if cfg.train.batch_size % (dp * micro * factor) == 0:
            out.append({"train.microbatches": micro * factor})
    return out + stage_candidates(cfg, mesh_shape)


def stage_candidates(cfg: ml_collections.ConfigDict, mesh_shape: dict) -> list[dict]:
    """Pipeline stages taken from the data axis (each stage then holds 1/S of the blocks'
    parameters and optimizer state), with 4S (else 2S, S) microbatches to keep the bubble
    small: for a scanned model whose layers split evenly."""
    now = mesh_shape.get(sharding.STAGE, 1)
    if not cfg.model.scan_layers or cfg.mesh.dcn_pipeline > 1:
        return []
    out = []
    for factor in (2, 4, 8):
        stages, data = now * factor, mesh_shape["data"] // factor
        if mesh_shape["data"] % factor or cfg.model.num_layers % stages:
            continue
        dp = data * mesh_shape["fsdp"]
        micro = next((m for m in (4 * stages, 2 * stages, stages)
                      if cfg.train.batch_size % (dp * m) == 0), None)
        if micro is not None:
            out.append({"mesh.pipeline": stages, "mesh.data": data, "train.microbatches": micro})
    return out


def _with(cfg: ml_collections.ConfigDict, change: dict) -> ml_collections.ConfigDict:
    """`cfg` with the change applied as the proposed command-line flags would apply it."""
    new = cfg.copy_and_resolve_references()
    for field, value in change.items():
        apply_override(new, field, _text(value))
    return new


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def propose(cfg: ml_collections.ConfigDict, devices, budget: float, mesh_shape: dict,
            log=print) -> tuple[dict, Plan] | None:
    """The smallest change that makes the step fit `budget` bytes per device, each try
    verified by compiling it: single changes cheapest first, then the cheap ones combined
    (all loss chunking and remat, growing microbatches last). None if nothing fits."""
    singles = candidates(cfg, mesh_shape, devices[0].platform == "cpu")
    tries, combined = list(singles), {}
    for c in singles:  # each on top of the ones before (a microbatch count replaces the last)
        combined = {**combined, **c}
        if combined != c:
            tries.append(dict(combined))
    for change in tries:
        try:
            plan = make_plan(_with(cfg, change), devices)
        except ConfigError:
            continue  # e.g. microbatches the mesh cannot split
        except OutOfMemory as e:
            log(f"  tried {_flags(change)}: XLA refused it ({e.reason})")
            continue
        log(f"  tried {_flags(change)}: peak {plan.peak_bytes / 1e9:.3f} GB")
        if plan.peak_bytes <= budget:
            return change, plan
    return None


def _flags(change: dict) -> str:
    return " ".join(f"--config.{k}={_text(v)}" for k, v in change.items())


def fold_layers(specs: dict) -> dict:
    """{parameter path: spec} with block_0 ... block_{n-1} shown once as block_* (x n) when
    every block is sharded alike (as they are: one rule set for all)."""
    out, seen = {}, {}
    for name, spec in specs.items():
        key = re.sub(r"\['block_\d+'\]", "['block_*']", name)
        seen.setdefault((key, str(spec)), []).append(name)
    for (key, _), names in seen.items():
        label = key if len(names) == 1 else f"{key} (x{len(names)})"
        out[label] = specs[names[0]]
    return out


def format_plan(plan: Plan, cfg: ml_collections.ConfigDict) -> str:
    gb = lambda b: f"{b / 1e9:.3f} GB"
    lines = [f"mesh {plan.mesh} of {plan.device_kind}; strategy {cfg.mesh.strategy!r}",
             f"per device: arguments {gb(plan.argument_bytes)}, outputs {gb(plan.output_bytes)} "
             f"(aliased {gb(plan.alias_bytes)}), temporaries {gb(plan.temp_bytes)}",
             f"per device peak: {gb(plan.peak_bytes)}",
             f"FLOPs per step per device: {plan.model_flops:.4g} by the model's formula "
             f"(jaxlm.models), {plan.flops_per_step:.4g} by XLA's cost analysis"
             + (" (which counts the scanned blocks once, not once per layer)"
                if cfg.model.scan_layers else ""),
             "parameter shardings:"]
    if plan.trained is not None:
        n, total, opt, whole = plan.trained
        mb = lambda b: f"{b / 1e6:.3f} MB"  # noqa: E731
        lines.insert(-1, f"trained: {n:,} of {total:,} parameters ({100 * n / total:.2g}%); "
                     f"optimizer state {mb(opt)} per device, {mb(whole)} if the whole model "
                     f"trained ({mb(whole - opt)} saved)")
    if plan.pipeline is not None:
        st, mb = plan.pipeline, lambda b: f"{b / 1e6:.3f} MB"  # noqa: E731
        lines.insert(-1, f"pipeline: {st.stages} stages x {st.microbatches} microbatches "
                     f"({st.schedule}): bubble {st.bubble:.1%} of stage time; per "
                     f"device of a stage: parameters {mb(st.param_bytes)}, optimizer state "
                     f"{mb(st.optimizer_bytes)}, activations and scratch {mb(plan.temp_bytes)}")
    folded = fold_layers(plan.param_shardings)
    width = max(map(len, folded))
    lines += [f"  {name:<{width}}  {spec}" for name, spec in folded.items()]
    if plan.temp_regions:
        lines.append("largest regions of the temporaries (address ranges XLA reuses for "
                     "buffers not live at once; each named by its largest buffer):")
        lines += [f"  {b / 1e6:10.1f} MB {n:>5} buffers  {what}"
                  for what, b, n in plan.temp_regions]
    lines += ["warnings:" if plan.warnings else "warnings: none"]
    lines += [f"  - {w}" for w in plan.warnings]
    return "\n".join(lines)


FLAGS = [cli.Flag("topology", "cpu:N (fake CPU devices) or tpu:<name>, e.g. tpu:v5e:4x4",
                  "cpu:1"),
         cli.Flag("device-memory", "GB per device to fit in (default: the HBM of known TPU "
                  "and GPU kinds; none for cpu:N)", "", metavar="GB"),
         cli.Flag("top", "also list this many largest regions of the temporaries' allocation",
                  "0", metavar="N")]


def main(argv) -> Plan | None:
    # The liveness figures come from XLA's dump while it compiles; an executable from the
    # persistent compilation cache would skip that (JAX decides on the cache once per
    # process, at the first compile, so this must come first).
    jax.config.update("jax_enable_compilation_cache", False)
    args = cli.parse(argv, "jaxlm.plan", __doc__, workdir=False, flags=FLAGS)
    top = args.flags["top"]
    if not top.isdigit():
        raise ConfigError(f"--top={top}: expected a number of regions (0 = none)")
    given = memory_flag(args.flags["device-memory"])
    devices = topology_devices(args.flags["topology"])
    try:
        plan = make_plan(args.config, devices, int(top))
    except OutOfMemory as e:  # nothing compiled to print; the proposals are what helps
        plan, mesh, kind = None, e.mesh, e.device_kind
        budget = device_memory(kind, given) or math.inf
        print(f"mesh {mesh} of {kind}; strategy {args.config.mesh.strategy!r}\n"
              f"fits: NO, XLA refused to compile the step: {e.reason}; compiling the "
              "cheapest changes that keep the maths:")
    else:
        print(format_plan(plan, args.config))
        mesh, kind = plan.mesh, plan.device_kind
        budget = device_memory(kind, given)
        if budget is None:
            print(f"fits: unknown (no memory size known for {kind}; pass "
                  "--device-memory=GB)")
            return plan
        if plan.peak_bytes <= budget:
            print(f"fits: yes, {plan.peak_bytes / 1e9:.3f} of {budget / 1e9:.1f} GB per device")
            return plan
        print(f"fits: NO, {plan.peak_bytes / 1e9:.3f} GB per device > {budget / 1e9:.1f} GB; "
              "compiling the cheapest changes that keep the maths:")
    found = propose(args.config, devices, budget, mesh)
    if found:
        change, fitted = found
        print(f"proposal: {_flags(change)} (peak {fitted.peak_bytes / 1e9:.3f} GB, "
              "verified by compiling it)")
    else:
        print("proposal: none of those fits; use more devices or a smaller batch")
    return plan


if __name__ == "__main__":
    cli.run(main)
