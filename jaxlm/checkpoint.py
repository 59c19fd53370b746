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
on any mesh: EXPORT/{params, meta}.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxlm import config as config_lib
from jaxlm import models
from jaxlm.errors import CheckpointError

log = logging.getLogger("jaxlm")


def check_meta(meta: dict, cfg: ml_collections.ConfigDict, tokenizer, where: str) -> None:
    """Raises CheckpointError if the checkpoint described by `meta` does not fit `cfg`:
    another model family, another value of a field that fixes parameter shapes (the
    family's shape_fields), or another tokenizer."""
    saved = {"arch": "gpt", **meta["config"]["model"]}  # older checkpoints: all GPT
    for field in ("arch",) + models.family(cfg.model.arch).shape_fields:
        if saved.get(field) != cfg.model[field]:
            raise CheckpointError(
                f"{where} holds a different model: config.model.{field} is "
                f"{saved.get(field)!r} there and {cfg.model[field]!r} here; use another "
                "--workdir or the same config")
    if meta["tokenizer"] != tokenizer.to_dict():
        raise CheckpointError(
            f"{where} was made with tokenizer {meta['tokenizer']}, but config.data.tokenizer "
            f"gives {tokenizer.to_dict()}")


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
    first_line = (str(error).strip().splitlines() or [""])[0][:500]
    if "tree structures do not match" in first_line:
        return CheckpointError(
            f"{what} holds a train state of another structure than this config builds: "
            "config.optimizer (e.g. grad_clip_norm on/off) or the model code differs from "
            "the run that wrote it")
    if "not compatible with the stored shape" in first_line:  # same config, other model code
        return CheckpointError(
            f"{what} holds arrays of other shapes than this config builds ({first_line.split('. ')[0]}): "
            "the model code differs from the jaxlm that wrote it (a parameter stored in "
            "another layout); evaluate or resume it with that version")
    return CheckpointError(f"{what} cannot be read ({type(error).__name__}: {first_line}); "
                           "it is damaged or incomplete")


class Checkpointer:
    """The checkpoints of one workdir. `cfg_ckpt` is config.checkpoint (None: defaults,
    for reading); `watchdog` (jaxlm.watchdog.Watchdog) guards saves and restores."""

    def __init__(self, workdir: pathlib.Path, cfg_ckpt=None, watchdog=None):
        self.directory = (pathlib.Path(workdir) / "checkpoints").absolute()
        self.watchdog = watchdog
        cfg_ckpt = cfg_ckpt if cfg_ckpt is not None else config_lib.base_config().checkpoint
        policy = ocp.checkpoint_managers.LatestN(cfg_ckpt.keep)
        if cfg_ckpt.archive_every:
            policy = ocp.checkpoint_managers.AnyPreservationPolicy(
                [policy, ocp.checkpoint_managers.EveryNSteps(cfg_ckpt.archive_every)])
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy,
                enable_async_checkpointing=cfg_ckpt.async_save,
                async_options=ocp.AsyncOptions(timeout_secs=int(cfg_ckpt.timeout_seconds)),
                cleanup_tmp_directories=True,
                create=True))

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

    def read_meta(self, step: int) -> dict:
        where = f"checkpoint {self.directory / str(step)}"
        try:
            with _watch(self.watchdog, f"reading {where}"):
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # any failure to read is reported the same way
            raise _unreadable(f"{where}/meta", e) from e
        return restored["meta"]

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
        """Starts an asynchronous save (waiting first for the previous one to finish)."""
        with _watch(self.watchdog, f"saving checkpoint {step}"):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state, shardings):
        """(state, meta) of `step`, the state placed straight into `shardings`."""
        where = f"checkpoint {self.directory / str(step)}"
        try:
            with _watch(self.watchdog, f"restoring {where}"):
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_target(abstract_state, shardings)),
                    meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise _unreadable(where, e) from e
        return restored["state"], restored["meta"]

    def restore_params(self, step: int, abstract_params, shardings):
        """Only the parameters of `step`, placed into `shardings`: the optimizer state is
        not read, so evaluation and export need a third of the memory of a full restore."""
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
        return restored["params"]

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        with _watch(self.watchdog, "finishing the last checkpoint save"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _target(abstract_tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def make_meta(cfg: ml_collections.ConfigDict, tokenizer, next_sample: int, data_fingerprint: str,
              rng: jax.Array, skipped_steps: list[int]) -> dict:
    return {"config": config_lib.to_dict(cfg), "tokenizer": tokenizer.to_dict(),
            "data": {"next_sample": int(next_sample), "fingerprint": data_fingerprint},
            "rng": [int(x) for x in np.asarray(rng).reshape(-1)],  # raw uint32 key
            "skipped_steps": [int(s) for s in skipped_steps]}


# ----------------------------------------------------------------------------- exports


def make_export_meta(cfg: ml_collections.ConfigDict, tokenizer, step: int) -> dict:
    return {"config": config_lib.to_dict(cfg), "tokenizer": tokenizer.to_dict(),
            "step": int(step)}


def export_params(path: pathlib.Path, params, meta: dict) -> None:
    """Writes params and meta to `path` (all processes call this; it must not exist)."""
    path = pathlib.Path(path).absolute()
    if path.exists():
        raise CheckpointError(f"--output={path} already exists; not overwriting it")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                 meta=ocp.args.JsonSave(meta)))


def read_export_meta(path: pathlib.Path) -> dict:
    path = pathlib.Path(path).absolute()
    if not (path / "meta").is_dir():
        raise CheckpointError(f"config.evaluate.params={str(path)!r} is not a jaxlm export "
                              "(no meta inside; make one with python -m jaxlm.export)")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            return ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise _unreadable(f"export {path}/meta", e) from e


def load_params(path: pathlib.Path, abstract_params, shardings):
    """The exported params, placed into `shardings` (any mesh)."""
    path = pathlib.Path(path).absolute()
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(path, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_target(abstract_params, shardings))))
    except Exception as e:
        raise _unreadable(f"export {path}", e) from e
    return restored["params"]
