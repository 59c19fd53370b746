"""Tensor-by-tensor conversion between jaxlm params and Hugging Face checkpoints.

A family's converter (gpt2.py, bert.py) is a table of `Rule`s: which jaxlm parameter is
which Hugging Face tensor, and how the layouts differ (a transpose, a fused tensor
reshaped, one of several tensors stacked into one parameter). Import reads each tensor
once, memory-mapped, and places it straight into its NamedSharding on the current mesh
(each device reads only its own slice; stacked parts are joined on the host first, one
parameter at a time), so no host holds a whole model; export gathers one parameter at a
time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator

import jax
import numpy as np

from jaxlm.errors import CheckpointError
from jaxlm.models.layers import STACKED


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str                          # "block_0/attn/qkv/kernel"
    theirs: str                        # "transformer.h.0.attn.c_attn.weight"
    transpose: bool = False            # PyTorch Linear [out, in] vs our kernel [in, out]
    fused: int = 0                     # their last axis holds this many tensors side by side,
                                       # ours stacks them on a new axis -2 (GPT-2 c_attn
                                       # [D, 3D] vs our qkv [D, 3, D]): a reshape
    part: int | None = None            # theirs is entry `part` of our axis -2 (BERT's
                                       # query, key, value: parts 0, 1, 2 of our qkv)

    def to_ours(self, theirs: np.ndarray) -> np.ndarray:
        x = theirs.T if self.transpose else theirs
        return x.reshape(*x.shape[:-1], self.fused, -1) if self.fused else x

    def to_theirs(self, ours: np.ndarray) -> np.ndarray:
        x = ours[..., self.part, :] if self.part is not None else ours
        x = x.reshape(*x.shape[:-2], -1) if self.fused else x
        return x.T if self.transpose else x

    def ours_shape(self, theirs_shape) -> tuple[int, ...] | None:
        """The shape theirs takes in our layout (one part of it, for `part`); None if it
        cannot (a fused axis that does not divide)."""
        shape = tuple(theirs_shape)[::-1] if self.transpose else tuple(theirs_shape)
        if not self.fused:
            return shape
        if not shape or shape[-1] % self.fused:
            return None
        return shape[:-1] + (self.fused, shape[-1] // self.fused)


def _path(tree, path: str):
    """The leaf at "a/b/c"; in a scanned params tree "block_3/..." is layer 3 of the stacked
    leaf (sliced when read, so an export gathers one layer of one parameter at a time)."""
    first, *rest = path.split("/")
    layer = re.fullmatch(r"block_(\d+)", first)
    if layer and first not in tree and STACKED in tree:
        return _path(tree[STACKED], "/".join(rest))[int(layer.group(1))]
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def check_tensors(folder, rules: list[Rule], ignored: Callable[[str], bool],
                  abstract_params) -> None:
    """Every rule's tensor is there with the right shape and a float dtype, and nothing
    else is (bar `ignored` buffers); otherwise one error listing every difference."""
    problems = []
    wanted = {r.theirs for r in rules}
    missing = sorted(w for w in wanted if w not in folder)
    extra = sorted(k for k in folder.keys() if k not in wanted and not ignored(k))
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for r in rules:
        name = r.theirs
        if name not in folder:
            continue
        want = tuple(_path(abstract_params, r.ours).shape)
        if r.part is not None:
            want = want[:-2] + want[-1:]
        have = folder.shape(name)
        if r.ours_shape(have) != want:
            problems.append(f"{name} has shape {list(have)}, the config needs {list(want)} for {r.ours}")
    if problems:
        raise CheckpointError(f"{folder.folder} does not match the model: " + "; ".join(problems))


def import_params(folder, rules: list[Rule], abstract_params, shardings):
    """jaxlm params from the folder's tensors, each placed into its sharding as it is read
    (the parts of one parameter stacked first)."""
    by_ours: dict[str, list[Rule]] = {}
    for r in rules:
        by_ours.setdefault(r.ours, []).append(r)
    params: dict = {}
    for ours, group in by_ours.items():
        values = []
        for r in sorted(group, key=lambda r: r.part or 0):
            source = folder.get(r.theirs)
            if not np.issubdtype(source.dtype, np.floating):
                raise CheckpointError(f"{folder.folder}: tensor {r.theirs} has dtype "
                                      f"{source.dtype}, not a float")
            values.append(r.to_ours(source))
        value = values[0] if group[0].part is None else np.stack(values, axis=-2)
        value = np.asarray(value, dtype=_path(abstract_params, ours).dtype)
        _set(params, ours, jax.make_array_from_callback(
            value.shape, _path(shardings, ours), lambda index, v=value: v[index]))
    return params


def _gathered(x) -> np.ndarray:
    """A whole parameter on this host (every process takes part when it spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def export_tensors(params, rules: list[Rule], dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array) for every tensor, gathering one parameter at a time
    (once for consecutive rules that take parts of the same one)."""
    last = (None, None)
    for r in rules:
        if last[0] != r.ours:
            last = (r.ours, np.asarray(_gathered(_path(params, r.ours)), dtype))
        yield r.theirs, r.to_theirs(last[1])
