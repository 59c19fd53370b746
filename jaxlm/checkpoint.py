"""Orbax checkpoints of a run, and params-only exports.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `state` is the train state (params,
Adam moments, step); `meta` (JSON) holds what else a run needs to continue exactly: the
config, the tokenizer description, the data position (`next_sample`, a global sample
index, so a run may resume on a different number of hosts or devices), the dropout RNG
key and the steps skipped for a non-finite loss.

Saves are asynchronous: `save` returns once the arrays are copied off the devices and the
files are written by a background thread. Orbax writes each checkpoint into a temporary
directory and renames it when complete, so a process killed mid-save leaves only finished
checkpoints behind; `latest_step` never sees a partial one (the leftover temporary
directory is removed when the workdir is next opened).

Restores go straight into the caller's shardings, whatever mesh wrote the checkpoint: a
run saved under 8-way FSDP restores on one device or under FSDP x tensor parallel.

A checkpoint that does not match the config (model shape, tokenizer) or cannot be read
(damaged files) is refused with an error that names the difference or the file; nothing
in the workdir is changed by a refused restore.

Exports (`python -m jaxlm.export`) hold the parameters only, for evaluation and inference
on any mesh: EXPORT/{params, meta}. Every folder of params or weight files (an export, a
quantized export, an import from or export to Hugging Face, fine-tuning's best params, a
run's frozen base) is written by `writing`: refused before anything is written when the
disk lacks the room, staged beside its destination and renamed into place when complete
(in a bucket: written in place, complete once its last object is there); a failure (a full
disk: one line naming the destination) leaves nothing behind.

A run that trains part of the model (config.train.trainable) keeps its frozen base once, as
an export in WORKDIR/frozen written when the run starts; each checkpoint's state holds the
trainable parameters, and its meta names the frozen export by the digest of that export's
meta (which holds a checksum of every array). Restores join the two.

Every meta carries the state layout version (`layout`, STATE_LAYOUT). One of an older
layout is refused with a line naming `python -m jaxlm.upgrade`, which converts it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxlm import config as config_lib
from jaxlm import files as files_lib
from jaxlm import models
from jaxlm.errors import (CheckpointError, ConfigError, JaxlmError, abandoned_coroutine,
                          disk_error, first_line)
from jaxlm.models import transforms
from jaxlm.trainable import Trainable

log = logging.getLogger("jaxlm")


# The layout of the saved state; bump it, with a conversion in jaxlm.upgrade, whenever a
# change of the code makes old checkpoints restore into the wrong places.
#   1 (meta without "layout"): three query/key/value parameters per attention layer, and
#     with config.optimizer.grad_clip_norm > 0 an empty first element in the optimizer state.
#   2: one fused qkv parameter; the optimizer state is AdamW's alone, or (AdamW's,
#     jaxlm.train.prune.PruneState) with config.prune on; `extra` in the state.
STATE_LAYOUT = 2
FROZEN = "frozen"  # WORKDIR/frozen: the frozen base of a run (config.train.trainable)


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read back as written (truncated, changed bytes)."""


def check_meta(meta: dict, cfg: ml_collections.ConfigDict, tokenizer, where: str) -> None:
    """Raises CheckpointError if the checkpoint described by `meta` does not fit `cfg`:
    another model family, another value of a field that fixes parameter shapes (the
    family's shape_fields), another tokenizer, or other LoRA adapters."""
    saved_cfg = config_lib.from_dict(meta["config"], where)  # defaults for older fields
    saved = saved_cfg.model
    for field in ("arch",) + models.family(cfg.model.arch).shape_fields:
        if saved[field] != cfg.model[field]:
            flag = str(saved[field]).lower() if isinstance(saved[field], bool) else saved[field]
            raise CheckpointError(
                f"{where} holds a different model: config.model.{field} is "
                f"{saved[field]!r} there and {cfg.model[field]!r} here; pass "
                f"--config.model.{field}={flag} to use it, or another --workdir")
    if meta["tokenizer"] != tokenizer.to_dict():
        raise CheckpointError(
            f"{where} was made with tokenizer {meta['tokenizer']}, but config.data.tokenizer "
            f"gives {tokenizer.to_dict()}")
    check_lora(saved_cfg.lora, cfg.lora, where)


def check_lora(saved, here, where: str) -> None:
    """Refuses params whose LoRA adapters (config.lora: rank, alpha, targets) differ from
    the config's: other shapes, or the same shapes scaled or placed otherwise."""
    if not (saved.rank or here.rank):
        return
    for field in ("rank", "alpha", "targets"):
        if saved[field] != here[field]:
            shown = lambda v: ",".join(v) if isinstance(v, tuple) else v  # noqa: E731
            raise CheckpointError(
                f"{where} holds {'a LoRA model' if saved.rank else 'no LoRA adapters'}: "
                f"config.lora.{field} is {saved[field]!r} there and {here[field]!r} here; "
                f"pass --config.lora.{field}={shown(saved[field])} to use it"
                + ("" if saved.rank else ", or start a LoRA run from it with "
                   "--config.finetune.init"))


def check_layout(meta: dict, where: str, source) -> None:
    """Refuses a checkpoint or export whose state layout is not STATE_LAYOUT, naming the
    command that converts it (`source`: its workdir or export folder)."""
    layout = meta.get("layout", 1)
    if layout > STATE_LAYOUT:
        raise CheckpointError(f"{where} has state layout {layout}, newer than this jaxlm's "
                              f"({STATE_LAYOUT}): read it with the jaxlm that wrote it")
    if layout < STATE_LAYOUT:
        raise CheckpointError(f"{where} has state layout {layout}, from an older jaxlm (this one "
                              f"reads {STATE_LAYOUT}): convert it with python -m jaxlm.upgrade "
                              f"--src={source} --output=NEW_FOLDER")


def check_data(meta: dict, fingerprint: str, cfg_ckpt, step: int) -> None:
    """Refuses to resume on data that differs from the checkpoint's (the fingerprint of a
    source covers what decides which sequence comes at each index: dataset files, split,
    tokenizer, seq_len, packing, seed, mixture), unless config.checkpoint.check_data is off."""
    saved = meta["data"].get("fingerprint")
    if saved != fingerprint and cfg_ckpt.check_data:
        raise CheckpointError(
            f"checkpoint {step} was trained on other data (fingerprint {saved}, now "
            f"{fingerprint}): config.data (dataset, split, seq_len, packing, seed, mixture) or "
            "the prepared dataset changed, so resuming would not see the samples the run "
            "would have seen. Use another --workdir, or --config.checkpoint.check_data=false "
            "to continue on the new data anyway")


def _watch(watchdog, what: str):
    return watchdog.watch(what) if watchdog is not None else contextlib.nullcontext()


def _unreadable(what: str, error: Exception) -> CheckpointError:
    """The error for a failed Orbax read of `what`, once the rest of the read has ended."""
    _settle(error=error)
    while "See full TensorStore details" in str(error) and error.__cause__ is not None:
        error = error.__cause__  # Orbax's wrapper; the cause names the array and file
    first_line = (str(error).strip().splitlines() or [""])[0][:500]
    if "tree structures do not match" in first_line:
        return CheckpointError(
            f"{what} holds a train state of another structure than this config builds: "
            "config.optimizer (e.g. grad_clip_norm on/off), config.prune (pruning on/off, "
            "prune.params) or the model code differs from the run that wrote it")
    if "not compatible with the stored shape" in first_line:  # same config, other model code
        return CheckpointError(
            f"{what} holds arrays of other shapes than this config builds ({first_line.split('. ')[0]}): "
            "the model code differs from the jaxlm that wrote it (a parameter stored in "
            "another layout); evaluate or resume it with that version")
    return DamagedCheckpoint(f"{what} cannot be read ({type(error).__name__}: {first_line}); "
                             "it is damaged or incomplete")


# ----------------------------------------------------------------------------- checksums


def _checksum(x: jax.Array) -> jax.Array:
    """A uint32 that changes when any element's bits or position change: the sum (mod 2^32)
    of a hash of (bits, flat index) per element. A sum is the same over any split into
    shards, so every process checks its own shards and XLA adds them up, and integer sums
    are exact, so the result does not depend on the mesh."""
    if x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:  # bool, int8: the value is the bits
        bits = x.astype(jnp.uint32)
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for d in reversed(range(x.ndim)):  # row-major flat index, built per dimension (no reshape)
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
        stride *= x.shape[d]
    h = bits ^ (index * jnp.uint32(0x9E3779B9))
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)  # murmur3's finaliser: every input bit
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)  # flips about half the output bits
    return jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)


# One small program per array shape (not one over the whole tree: a 1,000-array state
# takes seconds to compile), run one at a time: programs with cross-device reductions in
# flight together can deadlock XLA:CPU's collectives.
_checksum_jit = jax.jit(_checksum)


def _name(path) -> str:
    """A tree path as "params/block_0/attn/query/kernel" (the same for a dict or a state)."""
    keys = []
    for k in path:
        keys.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(keys)


def checksums(tree) -> dict[str, int]:
    """{array name: checksum} of a tree of (possibly sharded) arrays."""
    return {_name(path): int(np.asarray(_checksum_jit(x).addressable_data(0)))
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def verify(tree, expected: dict[str, int], where: str, prefix: str = "") -> None:
    """CheckpointError naming the first array of `tree` whose checksum is not the one saved
    (names in `expected` carry `prefix`, e.g. "params/" for a params-only restore)."""
    if not expected:
        log.info("%s holds no checksums (saved with config.checkpoint.verify=false or by an "
                 "older jaxlm): not verified", where)
        return
    for name, value in checksums(tree).items():
        saved = expected.get(prefix + name)
        if saved is not None and saved != value:
            raise DamagedCheckpoint(f"{where} is damaged: array {prefix + name} does not match the "
                                  f"checksum saved with it (the file was changed after it was "
                                  "written)")


def _sealed(meta: dict) -> dict:
    """`meta` with the sha256 of its own canonical JSON, to detect a changed meta file."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return {**body, "sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def _check_seal(meta: dict, where: str) -> dict:
    if "sha256" in meta and _sealed(meta)["sha256"] != meta["sha256"]:
        raise DamagedCheckpoint(f"{where} is damaged: its contents do not match the checksum "
                              "saved with them")
    return meta


def _settle(threads_before=None, error: BaseException | None = None,
            timeout: float = 120.0) -> None:
    """Lets the rest of a failed Orbax read or write end (at most `timeout` seconds), so
    that nothing of it happens after the failure is reported.

    When one array fails, Orbax raises at once and closes the event loop it ran the others
    in: their TensorStore operations go on in TensorStore's threads, and a save's in
    Orbax's own threads too, awaited by nobody. Left alone, a write would recreate its file
    and folders after the failed save's folder is removed, and the coroutines of both,
    never to be resumed, would be collected whenever Python's garbage collector next ran,
    each printing its failure (jaxlm.cli drops those). So: Orbax's threads started since
    `threads_before` (a write) are joined, every TensorStore operation still in flight (a
    live tensorstore.Future) is waited for, the frames of the failure `error` (which
    reach the abandoned coroutines) are cleared, and the coroutines collected now, quietly."""
    import gc
    import traceback

    import tensorstore as ts
    deadline = time.monotonic() + timeout
    left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
    with _failures_reported_once():  # each of them may log the failure again
        for thread in threading.enumerate() if threads_before is not None else ():
            if thread not in threads_before and type(thread).__module__.startswith("orbax."):
                try:
                    thread.join(left())
                except Exception:  # noqa: BLE001 (Orbax's join re-raises the thread's failure)
                    pass
        for future in [o for o in gc.get_objects() if isinstance(o, ts.Future)]:
            try:
                future.exception(timeout=left())
            except Exception:  # noqa: BLE001 (cancelled or timed out: nothing to wait for)
                pass
        seen = set()
        while error is not None and id(error) not in seen:  # the traceback keeps its lines
            seen.add(id(error))
            traceback.clear_frames(error.__traceback__)
            error = error.__cause__ or error.__context__
        hook = sys.unraisablehook  # what each prints as it is closed was reported already
        sys.unraisablehook = lambda u: None if abandoned_coroutine(u) else hook(u)
        try:
            with warnings.catch_warnings():  # and those Orbax made but never started
                warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
                gc.collect()
        finally:
            sys.unraisablehook = hook


def _disk_advice(number: int, elsewhere: str) -> str:
    """What to do about a write the disk refused with errno `number`; `elsewhere`: the
    other place to write to (e.g. "use another --workdir")."""
    return {errno.ENOSPC: f"free space on that disk, or {elsewhere}",
            errno.EDQUOT: f"free space within your quota, or {elsewhere}",
            errno.EFBIG: "a file-size limit (ulimit -f) or the filesystem refused it",
            errno.EACCES: "check the folder's permissions",
            errno.EROFS: f"the filesystem is read-only; {elsewhere}",
            }.get(number, "check that disk")


class Checkpointer:
    """The checkpoints of one workdir. `cfg_ckpt` is config.checkpoint (None: defaults,
    for reading); `watchdog` (jaxlm.watchdog.Watchdog) guards saves and restores.
    `read_only`: nothing is created or cleaned up (evaluation, export, and a training run
    until it has passed its checks)."""

    def __init__(self, workdir: pathlib.Path, cfg_ckpt=None, watchdog=None, *,
                 read_only: bool = False):
        self.directory = files_lib.absolute(files_lib.path(workdir) / "checkpoints")
        self.watchdog = watchdog
        cfg_ckpt = cfg_ckpt if cfg_ckpt is not None else config_lib.base_config().checkpoint
        self.verify = cfg_ckpt.verify
        self._last_saved = None  # the step of the save in flight, for error messages
        policy = ocp.checkpoint_managers.LatestN(cfg_ckpt.keep)
        if cfg_ckpt.archive_every:
            policy = ocp.checkpoint_managers.AnyPreservationPolicy(
                [policy, ocp.checkpoint_managers.EveryNSteps(cfg_ckpt.archive_every)])
        with _quiet_orbax():  # read_only makes Orbax warn that it will not save
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    preservation_policy=policy,
                    enable_async_checkpointing=cfg_ckpt.async_save,
                    async_options=ocp.AsyncOptions(timeout_secs=int(cfg_ckpt.timeout_seconds)),
                    cleanup_tmp_directories=not read_only,
                    create=not read_only, read_only=read_only))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def select(self, step: int = -1) -> int | None:
        """`step` if it exists (-1: the latest; None if there is none)."""
        if step == -1:
            return self.latest_step()
        if step not in self.steps():
            raise CheckpointError(f"config.checkpoint.step={step}: {self.directory} has no "
                                  f"checkpoint at that step (it has {self.steps()})")
        return step

    def read_meta(self, step: int, any_layout: bool = False) -> dict:
        """The meta of checkpoint `step`, checked against its seal and (unless `any_layout`)
        refused if its state layout is not this jaxlm's."""
        where = f"checkpoint {self.directory / str(step)}"
        try:
            with _watch(self.watchdog, f"reading {where}"):
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # any failure to read is reported the same way
            raise _unreadable(f"{where}/meta", e) from e
        meta = _check_seal(restored["meta"], f"{where}/meta")
        if not any_layout:
            check_layout(meta, where, self.directory.parent)
        return meta

    def check_compatible(self, cfg: ml_collections.ConfigDict, tokenizer,
                         step: int = -1) -> dict | None:
        """Meta of checkpoint `step` (default: the latest; None if the workdir has none),
        after checking it matches `cfg` and `tokenizer`."""
        step = self.select(step)
        if step is None:
            return None
        meta = self.read_meta(step)
        check_meta(meta, cfg, tokenizer, f"{self.directory} (step {step})")
        return meta

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an asynchronous save (waiting first for the previous one to finish). The
        meta holds a checksum of every array (config.checkpoint.verify) and of itself."""
        self._check_space(step, state)
        self._last_saved = step
        if self.verify:
            meta = {**meta, "checksums": checksums(state)}
        with _watch(self.watchdog, f"saving checkpoint {step}"), self._saving(step):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_sealed(meta))),
                force=True)

    @contextlib.contextmanager
    def _saving(self, step: int | None):
        """A save that fails on the disk (full, no permission) is a CheckpointError naming
        the directory; the checkpoints before it stay (Orbax renames a finished one into
        place, and only then deletes old ones)."""
        try:
            yield
        except Exception as e:
            cause = disk_error(e)
            if cause is None:
                raise
            what = f"checkpoint {step if step is not None else self._last_saved}"
            advice = _disk_advice(cause.errno, "use another --workdir")
            raise CheckpointError(
                f"saving {what} to {self.directory} failed: {cause.strerror or cause}; "
                f"{advice}. Finished checkpoints there are intact: {self.finished_steps()}") from None

    def _check_space(self, step: int, state) -> None:
        """Refuses a save that cannot fit: the previous save must finish first (it may be
        what fills the disk), then the free space must hold the state's raw bytes (an upper
        bound: Orbax compresses). Checked, not attempted, so nothing half-written is left."""
        self.wait()
        if files_lib.is_remote(self.directory):
            return  # a bucket has no free-space figure (jaxlm.files)
        needed = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
        self.directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointError(
                f"saving checkpoint {step} needs about {_size(needed)}, and "
                f"{self.directory} has {_size(free)} free: free space on that disk, or "
                f"use another --workdir. Finished checkpoints there are intact: "
                f"{self.finished_steps()}")

    def finished_steps(self) -> list[int]:
        """Steps with a finished checkpoint on disk (re-read, not Orbax's cached list). In a
        bucket Orbax writes a checkpoint in place and marks it finished with a last object,
        commit_success.txt (objects cannot be renamed at once)."""
        if not self.directory.is_dir():
            return []
        done = "commit_success.txt" if files_lib.is_remote(self.directory) else "meta"
        return sorted(int(p.name) for p in self.directory.iterdir()
                      if p.name.isdigit() and (p / done).exists())

    def restore(self, step: int, abstract_state, shardings):
        """(state, meta) of `step`, the state placed straight into `shardings` and checked
        against its checksums."""
        where = f"checkpoint {self.directory / str(step)}"
        try:
            with _watch(self.watchdog, f"restoring {where}"):
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_target(abstract_state, shardings)),
                    meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise _unreadable(where, e) from e
        meta = _check_seal(restored["meta"], f"{where}/meta")
        if self.verify:
            verify(restored["state"], meta.get("checksums", {}), where)
        return restored["state"], meta

    def intact_before(self, step: int, restore) -> int | None:
        """The newest checkpoint before `step` that `restore(step)` reads without a
        CheckpointError (it verifies the checksums), if any: what to offer when `step` is
        damaged. Each one tried is restored in full, one at a time."""
        for older in reversed([s for s in self.steps() if s < step]):
            try:
                restore(older)
            except CheckpointError:
                continue
            return older
        return None

    def restore_or_name_intact(self, step: int, restore, advice):
        """restore(step); a damaged checkpoint is refused in one line that names the newest
        intact one before it, with `advice(intact)` (what to do with it)."""
        try:
            return restore(step)
        except DamagedCheckpoint as e:
            intact = self.intact_before(step, restore)
            hint = (f"; checkpoint {intact} is intact: {advice(intact)}" if intact is not None
                    else "; no older checkpoint there is intact either")
            raise CheckpointError(f"{e}{hint}") from None

    def restore_params(self, step: int, abstract_params, shardings):
        """Only the parameters of `step`, placed into `shardings`: the optimizer state is
        not read, so evaluation and export need a third of the memory of a full restore.
        A run that trained part of the model gets its frozen base joined in."""
        meta = self.read_meta(step)
        if meta.get("frozen"):
            saved = config_lib.from_dict(meta["config"], f"checkpoint {self.directory / str(step)}")
            split = Trainable.of(saved, abstract_params)
            (abstract_t, abstract_f), (shard_t, shard_f) = (split.split(abstract_params),
                                                            split.split(shardings))
            frozen = load_frozen(self.directory.parent, meta, abstract_f, shard_f, self.verify)
            return split.merge(self._restore_params(step, abstract_t, shard_t), frozen)
        return self._restore_params(step, abstract_params, shardings)

    def _restore_params(self, step: int, abstract_params, shardings):
        where = f"checkpoint {self.directory / str(step)}"
        target = {"params": _target(abstract_params, shardings)}
        try:
            with _watch(self.watchdog, f"restoring the params of {where}"), \
                    ocp.PyTreeCheckpointer() as reader:
                restored = reader.restore(self.directory / str(step) / "state",
                                          args=ocp.args.PyTreeRestore(
                                              item=target, partial_restore=True,
                                              restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
        except Exception as e:
            raise _unreadable(where, e) from e
        if self.verify:
            verify(restored["params"], self.read_meta(step).get("checksums", {}), where, "params/")
        return restored["params"]

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        with _watch(self.watchdog, "finishing the last checkpoint save"), self._saving(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


@contextlib.contextmanager
def _quiet_orbax(below: int = logging.ERROR, loggers=("absl",)):
    """Orbax's log records (and those of the other `loggers`, e.g. "asyncio") below level
    `below` are not shown meanwhile."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(below)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _failures_reported_once():
    """A window in which an Orbax failure is reported by jaxlm only (one line, raised by
    the caller): Orbax's own log records of it (absl), and asyncio's of the tasks Orbax
    leaves behind, are not shown. Orbax runs the arrays of a read or write as tasks of an
    event loop that it closes as soon as one fails (orbax asyncio_utils.run_sync); a task
    that fails in the loop's last turn is never looked at, and asyncio prints "Task
    exception was never retrieved" whenever the garbage collector frees it, which may be
    before the caller has caught the first failure. So a write is inside this window from
    its start until its error is raised."""
    return _quiet_orbax(logging.CRITICAL, ("absl", "asyncio"))


def _target(abstract_tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def make_meta(cfg: ml_collections.ConfigDict, tokenizer, next_sample: int, data_fingerprint: str,
              rng: jax.Array, skipped_steps: list[int], frozen: str | None = None) -> dict:
    """`frozen`: the digest of the run's frozen base (save_frozen), if it has one."""
    return {"config": config_lib.to_dict(cfg), "tokenizer": tokenizer.to_dict(),
            "layout": STATE_LAYOUT,
            "data": {"next_sample": int(next_sample), "fingerprint": data_fingerprint},
            "rng": [int(x) for x in np.asarray(rng).reshape(-1)],  # raw uint32 key
            "skipped_steps": [int(s) for s in skipped_steps],
            **({"frozen": frozen} if frozen else {})}


# ----------------------------------------------------------------------------- frozen base


def save_frozen(workdir: pathlib.Path, frozen, cfg: ml_collections.ConfigDict, tokenizer) -> str:
    """Writes the frozen base of a run to WORKDIR/frozen (all processes call this) and
    returns its digest, which every checkpoint's meta then names. A leftover from a run
    that never saved a checkpoint is replaced (it is made again from the same init)."""
    path = files_lib.absolute(files_lib.path(workdir)) / FROZEN
    if path.exists() and jax.process_index() == 0:
        files_lib.remove_tree(path)
    sync("jaxlm: old frozen base removed")
    export_params(path, frozen, make_export_meta(cfg, tokenizer, 0), "the frozen base")
    return read_export_meta(path)["sha256"]


def load_frozen(workdir: pathlib.Path, meta: dict, abstract, shardings, check: bool):
    """The frozen base that checkpoint `meta` names, placed into `shardings`; refused if
    WORKDIR/frozen is missing or is not the export the checkpoint was saved with."""
    path = files_lib.absolute(files_lib.path(workdir)) / FROZEN
    if not is_export(path):
        raise CheckpointError(f"{path} is missing: the checkpoints of {workdir} train part of "
                              "the model (config.train.trainable) and keep the frozen rest there")
    frozen_meta = read_export_meta(path)
    if frozen_meta["sha256"] != meta["frozen"]:
        raise CheckpointError(f"{path} is not the frozen base the checkpoints of {workdir} were "
                              "saved with (its digest differs)")
    return load_export(path, abstract, shardings, frozen_meta, check)


# ----------------------------------------------------------------------------- exports


def make_export_meta(cfg: ml_collections.ConfigDict, tokenizer, step: int) -> dict:
    return {"config": config_lib.to_dict(cfg), "tokenizer": tokenizer.to_dict(),
            "layout": STATE_LAYOUT, "step": int(step)}


def tree_bytes(tree) -> int:
    """The raw bytes of a tree's arrays (each sharded array whole)."""
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


@contextlib.contextmanager
def writing(path: pathlib.Path, what: str, nbytes: int):
    """Writes `what` (e.g. "the export") as the folder `path`, which must not exist, in one
    piece; every command that writes params or weight files goes through here.

    Refused before anything is written if the disk has less than `nbytes` free (the raw
    bytes to write: an upper bound for Orbax, which compresses). Yields the folder to
    write, `path`'s name inside a staging folder beside it (.NAME.partial-XXXXXXXX, on the
    same filesystem), and renames it into place when the block completes: `path` appears
    only complete. On any failure (Ctrl-C included) the staging folder is removed, and a
    disk error (full, quota, file-size limit, permission, read-only) becomes one
    CheckpointError naming `path`. Folders and files are made with the user's umask (the
    staging folder itself is never seen). A process killed meanwhile leaves its staging
    folder, which may be deleted.

    All processes call it: the check and the staging name are the same on each (a shared
    filesystem), process 0 renames, and all return once `path` is there.

    In a bucket (gs://) there is no rename: the folder is written in place and is complete
    once its last object, jaxlm.files.COMPLETE, is there; a failure removes its objects."""
    if files_lib.is_remote(path):
        yield from _writing_to_bucket(path, what)
        return
    path = pathlib.Path(path).absolute()
    if path.exists():
        raise CheckpointError(f"{path} already exists; not overwriting it")
    free = shutil.disk_usage(path.parent).free
    if free < nbytes:
        raise CheckpointError(
            f"writing {what} to {path} needs about {_size(nbytes)}, and {path.parent} has "
            f"{_size(free)} free: free space on that disk, or write it elsewhere")
    token = np.frombuffer(os.urandom(4), np.uint32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        token = multihost_utils.broadcast_one_to_all(token)
    staging = path.parent / f".{path.name}.partial-{int(token[0]):08x}"
    threads_before = set(threading.enumerate())
    with _failures_reported_once():
        try:
            if jax.process_index() == 0:
                staging.mkdir(mode=0o700)
            yield staging / path.name
            if jax.process_index() == 0:
                os.rename(staging / path.name, path)
        except BaseException as e:
            cause = disk_error(e) if isinstance(e, Exception) and not isinstance(e, JaxlmError) else None
            _settle(threads_before, e if cause else None)  # else writes going on remake the folder
            shutil.rmtree(staging, ignore_errors=True)
            if cause is None:
                raise
            named = cause.filename and str(staging) not in str(cause.filename)
            where = f"{cause.filename}: " if named else ""
            raise CheckpointError(
                f"writing {what} to {path} failed: {where}{cause.strerror or cause}; "
                f"{_disk_advice(cause.errno, 'write it elsewhere')}; nothing was left there") from e
    shutil.rmtree(staging, ignore_errors=True)
    sync(f"jaxlm: wrote {path}")


def _writing_to_bucket(path, what: str):
    """`writing`'s body for a gs:// `path` (a generator: `writing` yields from it)."""
    if path.exists():
        raise CheckpointError(f"{path} already exists; not overwriting it")
    threads_before = set(threading.enumerate())
    with _failures_reported_once():
        try:
            yield path
            sync(f"jaxlm: wrote the objects of {path}")
            if jax.process_index() == 0:
                (path / files_lib.COMPLETE).write_text(f"{what}\n")
        except BaseException as e:
            _settle(threads_before, e)  # no write still going on may remake an object
            if jax.process_index() == 0:
                try:
                    files_lib.remove_tree(path)
                except Exception:  # the bucket refuses deletes too: say what may be left
                    raise CheckpointError(f"writing {what} to {path} failed, and removing "
                                          f"what was written failed too: {first_line(e)}") from e
            if isinstance(e, (JaxlmError, KeyboardInterrupt)) or not isinstance(e, Exception):
                raise
            raise CheckpointError(f"writing {what} to {path} failed: {first_line(e)}; nothing "
                                  "was left there") from e
    sync(f"jaxlm: wrote {path}")


def sync(name: str) -> None:
    """Waits until every process got here (one process: returns)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def export_params(path: pathlib.Path, params, meta: dict, what: str = "the export",
                  files: dict | None = None) -> None:
    """Writes params and meta to the folder `path`, which must not exist, through `writing`
    (all processes call this). `files`: {name inside: text, or a file to copy} that
    process 0 adds beside them (e.g. an import's tokenizer files and config.py)."""
    files = files or {}
    nbytes = tree_bytes(params) + sum(len(v.encode()) if isinstance(v, str) else
                                      pathlib.Path(v).stat().st_size for v in files.values())
    with writing(path, what, nbytes) as folder:
        meta = _sealed({**meta, "checksums": checksums(params)})
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(folder, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                       meta=ocp.args.JsonSave(meta)))
        if jax.process_index() == 0:
            for name, value in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                if isinstance(value, str):
                    (folder / name).write_text(value)
                else:  # written, not copied: the file's mode comes from the umask
                    (folder / name).write_bytes(pathlib.Path(value).read_bytes())


def is_export(path: pathlib.Path) -> bool:
    return ((path / "meta").is_dir() and (path / "params").is_dir()
            and files_lib.complete(path))


def latest_meta(path: pathlib.Path, what: str) -> dict:
    """The metadata (config, tokenizer, ...) of a params export, or of a workdir's latest
    checkpoint; `what` names the path in errors."""
    if is_export(path):
        return read_export_meta(path)
    ckpt = Checkpointer(path, read_only=True)
    try:
        step = ckpt.select(-1)
        if step is None:
            raise CheckpointError(f"{what}: no checkpoint and not a params export")
        return ckpt.read_meta(step)
    finally:
        ckpt.close()


def read_export_meta(path: pathlib.Path, any_layout: bool = False) -> dict:
    path = files_lib.absolute(files_lib.path(path, "config.evaluate.params"))
    if not (path / "meta").is_dir():
        raise CheckpointError(f"config.evaluate.params={str(path)!r} is not a jaxlm export "
                              "(no meta inside; make one with python -m jaxlm.export)")
    if not files_lib.complete(path):
        raise CheckpointError(f"config.evaluate.params={str(path)!r} is an incomplete export "
                              f"(no {files_lib.COMPLETE} object: its writer failed or is still "
                              "writing)")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            meta = ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise _unreadable(f"export {path}/meta", e) from e
    meta = _check_seal(meta, f"export {path}/meta")
    if not any_layout:
        check_layout(meta, f"export {path}", path)
    return meta


def load_export(path: pathlib.Path, abstract_params, shardings, meta: dict, check: bool):
    """The exported params, placed into `shardings` (any mesh) and, with `check`, verified
    against the checksums in the export's `meta`."""
    path = files_lib.absolute(files_lib.path(path, "config.evaluate.params"))
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(path, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_target(abstract_params, shardings))))
    except Exception as e:
        raise _unreadable(f"export {path}", e) from e
    if check:
        verify(restored["params"], meta.get("checksums", {}), f"export {path}")
    return restored["params"]


# ----------------------------------------------------------------------------- params to use


def load_params(cfg: ml_collections.ConfigDict, setup, workdir: pathlib.Path):
    """(params, step) that evaluation and export read: the export config.evaluate.params,
    or checkpoint config.checkpoint.step (default: the latest) of `workdir`, checked
    against the config and against their checksums. Creates nothing."""
    quant = setup.cfg.quant.mode if transforms.is_quantized(setup.cfg) else "none"
    if cfg.evaluate.params:
        path = files_lib.path(cfg.evaluate.params, "config.evaluate.params")
        meta = read_export_meta(path)
        check_meta(meta, setup.cfg, setup.tokenizer, f"export {path}")
        saved = config_lib.from_dict(meta["config"], f"export {path}")
        saved_quant = saved.quant.mode if transforms.is_quantized(saved) else "none"
        if saved_quant != quant:
            raise ConfigError(
                f"config.quant.mode={quant!r}, but config.evaluate.params={str(path)!r} holds "
                + (f"{saved_quant} weights: drop --config.quant.mode to run it as made"
                   if saved_quant != "none" else "float weights: quantize them first with "
                   f"python -m jaxlm.quantize --params={path} --out=DIR "
                   f"--config.quant.mode={quant}"))
        params = load_export(path, setup.abstract_params, setup.param_shardings, meta,
                              cfg.checkpoint.verify)
        return params, meta["step"]
    if quant != "none" and not setup.cfg.lora.rank:  # QLoRA: WORKDIR/frozen holds them
        raise ConfigError(f"config.quant.mode={quant!r} runs quantized weights, which a "
                          "training checkpoint does not hold: make them with python -m "
                          f"jaxlm.quantize --workdir={workdir} --out=DIR "
                          f"--config.quant.mode={quant} and pass --config.evaluate.params=DIR")
    ckpt = Checkpointer(workdir, cfg.checkpoint, read_only=True)
    try:
        step = ckpt.select(cfg.checkpoint.step)
        if step is None:
            raise CheckpointError(f"--workdir={workdir}: no checkpoint to evaluate (run "
                                  "jaxlm.train first)")
        ckpt.check_compatible(cfg, setup.tokenizer, step)
        restore = lambda s: ckpt.restore_params(s, setup.abstract_params, setup.param_shardings)
        params = ckpt.restore_or_name_intact(
            step, restore, lambda i: f"evaluate it with --config.checkpoint.step={i}")
    finally:
        ckpt.close()
    return params, step
