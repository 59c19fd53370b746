"""Orbax checkpoints of a run: train state plus the metadata needed to continue exactly.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `meta` (JSON) holds the config, the
tokenizer description and the data position (`next_sample`, a global sample index).

Where a run's state comes from, in order: resume from the latest checkpoint in the workdir
> start from scratch. (Initialising from another run's weights will slot in between.)
A checkpoint whose model shape or tokenizer differs from the config is refused before
anything is compiled or written, with the differing field named.
"""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxlm.config import ConfigError

# Fields of config.model that change parameter shapes or meaning; resuming across a
# difference in any of them is refused.
SHAPE_FIELDS = ("vocab_size", "max_len", "num_layers", "d_model", "num_heads", "mlp_dim",
                "position", "tie_embeddings", "param_dtype")


class Checkpointer:
    def __init__(self, workdir: pathlib.Path, *, keep: int = 2, async_save: bool = True):
        self.directory = (pathlib.Path(workdir) / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(keep),
                enable_async_checkpointing=async_save,
                create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def check_compatible(self, cfg: ml_collections.ConfigDict, tokenizer) -> dict | None:
        """Meta of the latest checkpoint, after checking it matches `cfg` and `tokenizer`."""
        step = self.latest_step()
        if step is None:
            return None
        meta = self.read_meta(step)
        saved = meta["config"]["model"]
        for field in SHAPE_FIELDS:
            if saved.get(field) != cfg.model[field]:
                raise ConfigError(
                    f"{self.directory} holds a checkpoint (step {step}) of a different model: "
                    f"config.model.{field} is {saved.get(field)!r} there and "
                    f"{cfg.model[field]!r} here; use another --workdir or the same config")
        if meta["tokenizer"] != tokenizer.to_dict():
            raise ConfigError(
                f"{self.directory} holds a checkpoint (step {step}) made with tokenizer "
                f"{meta['tokenizer']}, but config.data.tokenizer gives {tokenizer.to_dict()}")
        return meta

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> None:
        """Starts an asynchronous save; training continues while it is written."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state, shardings):
        """Restores the train state of `step` straight into the given shardings."""
        target = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_state, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def make_meta(cfg: ml_collections.ConfigDict, tokenizer, next_sample: int) -> dict:
    return {"config": json.loads(json.dumps(cfg.to_dict(), default=list)),
            "tokenizer": tokenizer.to_dict(),
            "data": {"next_sample": int(next_sample)}}
