"""Tensor-by-tensor conversion between jaxlm params and Hugging Face checkpoints.

A family's converter (gpt2.py, bert.py) is a table of `Rule`s: which jaxlm parameter is
which Hugging Face tensor, and how the layouts differ (a transpose, a slice of a fused
tensor). Import reads each tensor once, memory-mapped, and places it straight into its
NamedSharding on the current mesh (each device reads only its own slice), so no host holds
a whole model; export gathers one parameter at a time.
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
    ours: str                          # "block_0/attn/query/kernel"
    theirs: str                        # "transformer.h.0.attn.c_attn.weight"
    transpose: bool = False            # PyTorch Linear [out, in] vs our kernel [in, out]
    cols: tuple[int, int] | None = None  # a slice of a fused tensor's last axis (GPT-2 c_attn)

    def to_ours(self, theirs: np.ndarray) -> np.ndarray:
        if self.cols is not None:
            theirs = theirs[..., self.cols[0]:self.cols[1]]
        return theirs.T if self.transpose else theirs


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
        want = _path(abstract_params, r.ours).shape
        have = folder.shape(name)
        got = have if r.cols is None else have[:-1] + (r.cols[1] - r.cols[0],)
        got = got[::-1] if r.transpose else got
        if tuple(got) != tuple(want):
            problems.append(f"{name} has shape {list(have)}, the config needs {list(want)} for {r.ours}")
    if problems:
        raise CheckpointError(f"{folder.folder} does not match the model: " + "; ".join(problems))


def import_params(folder, rules: list[Rule], abstract_params, shardings):
    """jaxlm params from the folder's tensors, each placed into its sharding as it is read."""
    params: dict = {}
    for r in rules:
        source = folder.get(r.theirs)
        if not np.issubdtype(source.dtype, np.floating):
            raise CheckpointError(f"{folder.folder}: tensor {r.theirs} has dtype "
                                  f"{source.dtype}, not a float")
        value = r.to_ours(source)
        target = _path(abstract_params, r.ours)
        value = np.asarray(value, dtype=target.dtype)
        sharding = _path(shardings, r.ours)
        _set(params, r.ours, jax.make_array_from_callback(
            value.shape, sharding, lambda index, v=value: v[index]))
    return params


def _gathered(x) -> np.ndarray:
    """A whole parameter on this host (every process takes part when it spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def export_tensors(params, rules: list[Rule], dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array) for every tensor, gathering one parameter at a time;
    rules sharing a tensor (a fused c_attn) are joined along its last axis."""
    by_name: dict[str, list[Rule]] = {}
    for r in rules:
        by_name.setdefault(r.theirs, []).append(r)
    for name, group in by_name.items():
        parts = []
        for r in sorted(group, key=lambda r: r.cols or (0, 0)):
            value = np.asarray(_gathered(_path(params, r.ours)), dtype)
            parts.append(value.T if r.transpose else value)
        yield name, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
