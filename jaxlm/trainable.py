"""Which parameters training changes: config.train.trainable.

One params tree, and a predicate over its paths. A parameter path is its module path and
name joined by "/", e.g. `block_0/attn/qkv/kernel` (scanned models: `blocks/attn/...`).
`config.train.trainable` is a tuple of regular expressions; a parameter is trainable when
one of them is found in its path (`re.search`). Empty (the default): every parameter.

Trainable parameters are the ones the step differentiates, the optimizer keeps moments for
and each checkpoint saves. The rest, the frozen base, is a jit argument of the step that is
never donated; a run saves it once (jaxlm.checkpoint.save_frozen) and every checkpoint
refers to it. LoRA (train the adapters only), fine-tuning a head on a frozen encoder and
pruning's masks go through here: with config.lora.rank the adapters (and a classification
head) are trainable besides what config.train.trainable names (`lora_trainable`), so the
base is frozen.

    split = Trainable.of(cfg, setup.abstract_params)
    trainable, frozen = split.split(params)
    params = split.merge(trainable, frozen)
"""

from __future__ import annotations

import re

import flax

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError

# LoRA (config.lora, jaxlm.models.transforms): qwix names the adapters of a weight W
# W_lora_a and W_lora_b; they train, and so does a classification head, whole (a pretrained
# base does not hold one).
ADAPTERS = r"_lora_[ab]$"
HEAD = r"^classifier/"


def lora_trainable(cfg) -> tuple[str, ...]:
    """The parameter patterns LoRA trains: the adapters, and the classification head when
    the model has one (config.model.num_classes). () without LoRA (config.lora.rank 0)."""
    if not cfg.lora.rank:
        return ()
    return (ADAPTERS,) + ((HEAD,) if cfg.model.num_classes else ())


def path_of(keys: tuple[str, ...]) -> str:
    return "/".join(keys)


def _flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)) if tree else {}


class Trainable:
    """The split of a params tree (of `abstract_params`' structure) by `patterns`."""

    def __init__(self, patterns: tuple[str, ...], abstract_params, implied: tuple[str, ...] = ()):
        """`implied`: patterns that a feature adds (LoRA's adapters), not checked as
        config.train.trainable's are."""
        self.patterns = tuple(patterns) + tuple(implied)
        paths = [path_of(k) for k in _flat(abstract_params)]
        compiled = [re.compile(p) for p in implied]
        for p in patterns:
            compiled.append(config_lib.regex(p, "train.trainable"))
            if not any(compiled[-1].search(path) for path in paths):
                raise ConfigError(f"config.train.trainable: {p!r} matches no parameter (paths "
                                  f"look like {paths[0]!r}, {paths[-1]!r})")
        self._regexes = compiled
        self.frozen_paths = {path for path in paths if not self.is_trainable(path)}
        if self.patterns and not self.frozen_paths:
            raise ConfigError(f"config.train.trainable={self.patterns!r} matches every "
                              "parameter: leave it empty to train them all, or narrow it")

    @classmethod
    def of(cls, cfg, abstract_params) -> "Trainable":
        """The split a config asks for: config.train.trainable, plus LoRA's adapters."""
        return cls(cfg.train.trainable, abstract_params, lora_trainable(cfg))

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
