"""python -m jaxlm.upgrade --src=PATH --output=NEW: a workdir or params export written by an
older jaxlm, converted to this jaxlm's state layout (jaxlm.checkpoint.STATE_LAYOUT).

PATH is a workdir (every checkpoint in it is converted; its other files, metrics and
results, are copied) or a params export. NEW must not exist; PATH is only read. Layout 1
-> 2: the three query/key/value parameters of every attention layer become one fused qkv
parameter (and so do their Adam moments), and the optimizer state loses the empty element
that stood where gradient clipping used to be. Values are moved, never recomputed: a run
resumed from the converted workdir continues exactly as the old jaxlm would have.
"""

from __future__ import annotations

import logging
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlm import checkpoint, cli
from jaxlm import config as config_lib
from jaxlm import workdir as workdir_lib
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.models.upgrade import upgrade_tree

log = logging.getLogger("jaxlm")

SRC = cli.Flag("src", "a workdir or params export of an older jaxlm (only read)", None,
               metavar="PATH")
OUTPUT = cli.Flag("output", "where the converted copy goes (must not exist)", None,
                  metavar="NEW")


def read_raw(path: pathlib.Path) -> dict:
    """An Orbax tree as saved, as numpy arrays on the host (no target structure needed)."""
    with ocp.PyTreeCheckpointer() as reader:
        tree = reader.metadata(path).item_metadata.tree
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _fill(abstract, old_leaves: list, where: str):
    """`abstract`'s structure with `old_leaves` (same order), after checking every shape."""
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    if len(leaves) != len(old_leaves) or any(
            np.shape(o) != a.shape for o, a in zip(old_leaves, leaves)):
        raise CheckpointError(f"{where} does not convert to this jaxlm's layout (its arrays "
                              "do not match the model its config describes)")
    return jax.tree_util.tree_unflatten(
        treedef, [np.asarray(o, a.dtype) for o, a in zip(old_leaves, leaves)])


def upgrade_state(raw: dict, saved_cfg, abstract_state, where: str):
    """A layout-1 train state (as read_raw returns it) -> this jaxlm's TrainState."""
    opt = raw["opt_state"]
    if saved_cfg.optimizer.grad_clip_norm > 0:  # chain(identity, adamw): drop the identity
        opt = opt[1]
    adam = dict(opt[0])
    adam["mu"], adam["nu"] = upgrade_tree(adam["mu"]), upgrade_tree(adam["nu"])
    opt = [adam] + list(opt[1:])
    leaves = ([raw["step"]] + jax.tree_util.tree_leaves(upgrade_tree(raw["params"]))
              + jax.tree_util.tree_leaves(opt))
    return _fill(abstract_state, leaves, where)


def upgrade(src: pathlib.Path, output: pathlib.Path) -> list:
    """Converts `src` (a workdir or an export) into `output`; returns the steps converted
    (for an export: [its step])."""
    from jaxlm.setup import build  # JAX and friends: after the flags are known good
    from jaxlm.train.build import build_train
    src, output = pathlib.Path(src).absolute(), pathlib.Path(output).absolute()
    workdir_lib.check_output(output)
    if (src / "meta").is_dir() and (src / "params").is_dir():  # a params export
        meta = checkpoint.read_export_meta(src, any_layout=True)
        _check_old(meta, f"export {src}")
        cfg = config_lib.from_dict(meta["config"], f"export {src}")
        setup = build(cfg, jax.devices()[:1])
        params = _fill(setup.abstract_params, jax.tree_util.tree_leaves(
            upgrade_tree(read_raw(src / "params"))), f"export {src}")
        new = {k: v for k, v in meta.items() if k not in ("sha256", "checksums")}
        checkpoint.export_params(output, params, {**new, "layout": checkpoint.STATE_LAYOUT})
        return [meta["step"]]
    if not (src / "checkpoints").is_dir():
        raise ConfigError(f"--src={src} is neither a jaxlm workdir nor a params export")
    reader = checkpoint.Checkpointer(src, read_only=True)
    steps = reader.steps()
    if not steps:
        raise ConfigError(f"--src={src} holds no checkpoint")
    metas = {s: reader.read_meta(s, any_layout=True) for s in steps}
    for s, meta in metas.items():
        _check_old(meta, f"checkpoint {src / 'checkpoints' / str(s)}")
    shutil.copytree(src, output, ignore=lambda d, names: ["checkpoints", ".lock"] if d == str(src) else [])
    cfg = config_lib.from_dict(metas[steps[-1]]["config"], f"checkpoint {steps[-1]}")
    run = build_train(cfg, jax.devices()[:1])
    cfg_ckpt = config_lib.base_config().checkpoint
    cfg_ckpt.keep = len(steps)  # keep every converted step
    writer = checkpoint.Checkpointer(output, cfg_ckpt)
    try:
        for s in steps:
            where = f"checkpoint {src / 'checkpoints' / str(s)}"
            saved_cfg = config_lib.from_dict(metas[s]["config"], where)
            state = upgrade_state(read_raw(src / "checkpoints" / str(s) / "state"), saved_cfg,
                                  run.abstract_state, where)
            state = jax.device_put(state, run.state_shardings)
            meta = {k: v for k, v in metas[s].items() if k not in ("sha256", "checksums")}
            writer.save(s, state, {**meta, "layout": checkpoint.STATE_LAYOUT})
            log.info("converted %s", where)
        writer.wait()
    finally:
        writer.close()
    return steps


def _check_old(meta: dict, where: str) -> None:
    layout = meta.get("layout", 1)
    if layout != 1:
        raise ConfigError(f"{where} has state layout {layout}: nothing to convert (this "
                          f"jaxlm reads layout {checkpoint.STATE_LAYOUT})")


def main(argv):
    args = cli.parse(argv, "jaxlm.upgrade", __doc__, config=False, workdir=False,
                     flags=[SRC, OUTPUT])
    steps = upgrade(pathlib.Path(args.flags["src"]), pathlib.Path(args.flags["output"]))
    print(f"wrote {args.flags['output']} (layout {checkpoint.STATE_LAYOUT}; steps {steps})")
    return steps


if __name__ == "__main__":
    cli.run(main)
