"""Which parameters training changes: config.train.trainable.

One params tree, and a predicate over its paths. A parameter path is its module path and
name joined by "/", e.g. `block_0/attn/qkv/kernel` (scanned models: `blocks/attn/...`).
`config.train.trainable` is a tuple of regular expressions; a parameter is trainable when
one of them is found in its path (`re.search`). Empty (the default): every parameter.

Trainable parameters are the ones the step differentiates, the optimizer keeps moments for
and each checkpoint saves. The rest, the frozen base, is a jit argument of the step that is
never donated; a run saves it once (jaxlm.checkpoint.save_frozen) and every checkpoint
refers to it. LoRA (train the adapters only), fine-tuning a head on a frozen encoder and
pruning's masks go through here.

    split = Trainable(cfg.train.trainable, setup.abstract_params)
    trainable, frozen = split.split(params)
    params = split.merge(trainable, frozen)
"""

from __future__ import annotations

import re

import flax

from jaxlm.errors import ConfigError


def path_of(keys: tuple[str, ...]) -> str:
    return "/".join(keys)


def _flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)) if tree else {}


class Trainable:
    """The split of a params tree (of `abstract_params`' structure) by `patterns`."""

    def __init__(self, patterns: tuple[str, ...], abstract_params):
        self.patterns = tuple(patterns)
        paths = [path_of(k) for k in _flat(abstract_params)]
        compiled = []
        for p in self.patterns:
            try:
                compiled.append(re.compile(p))
            except re.error as e:
                raise ConfigError(f"config.train.trainable: {p!r} is not a regular "
                                  f"expression ({e})") from None
            if not any(compiled[-1].search(path) for path in paths):
                raise ConfigError(f"config.train.trainable: {p!r} matches no parameter (paths "
                                  f"look like {paths[0]!r}, {paths[-1]!r})")
        self._regexes = compiled
        self.frozen_paths = {path for path in paths if not self.is_trainable(path)}
        if self.patterns and not self.frozen_paths:
            raise ConfigError(f"config.train.trainable={self.patterns!r} matches every "
                              "parameter: leave it empty to train them all, or narrow it")

    @property
    def everything(self) -> bool:
        """No frozen parameters: the state holds the whole params tree, as before."""
        return not self.frozen_paths

    def is_trainable(self, path: str) -> bool:
        return not self.patterns or any(r.search(path) for r in self._regexes)

    def split(self, params) -> tuple[dict, dict]:
        """(trainable, frozen): two trees of the same nesting; frozen is {} when nothing is."""
        if self.everything:
            return params, {}
        flat = _flat(params)
        trainable = {k: v for k, v in flat.items() if path_of(k) not in self.frozen_paths}
        frozen = {k: v for k, v in flat.items() if path_of(k) in self.frozen_paths}
        unflat = flax.traverse_util.unflatten_dict
        return unflat(trainable), unflat(frozen)

    def merge(self, trainable, frozen):
        """The whole params tree again (no copies: only the nesting is rebuilt)."""
        if not frozen:
            return trainable
        return flax.traverse_util.unflatten_dict({**_flat(trainable), **_flat(frozen)})
