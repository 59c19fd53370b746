"""Objectives: what a model learns from the token windows the data sources give.

A source (jaxlm.data.sources) hands out examples as windows of token ids: `tokens`, of
length L + `extra_tokens`, and for packed data `segments` (document ids from 1, 0 =
padding) and `positions` for the window's first L tokens. An objective

  - turns a window into the model's inputs and the loss's targets and weights (`example`,
    numpy, on the host: it runs in the data thread, and anything random in it is drawn from
    the example's global index, so resuming stays exact);
  - declares the batch that results (`batch_spec`: keys, shapes, dtypes), the one
    description shared by the data pipeline, jaxlm.plan and the tests;
  - computes a batch's summed loss and token weight from the model (`loss`, inside the
    jitted step). Sums, not means, so that microbatches and devices add up exactly.

Objectives, by `config.train.objective`:
  causal_lm  next-token prediction: inputs are tokens[:L], targets tokens[1:L+1] (the
             window carries one extra token), weight 1 wherever the input is not padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import models
from jaxlm.errors import ConfigError


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights), both fp32 scalars."""
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_BxL * weights_BxL), jnp.sum(weights_BxL)


class CausalLM:
    """Next-token prediction (GPT). Packed windows keep their segments and positions, so
    attention stays inside each document; unpacked batches carry neither (the model
    attends causally over the whole window from position 0)."""

    name = "causal_lm"
    extra_tokens = 1  # the last target

    def __init__(self, seq_len: int, packed: bool):
        self.seq_len, self.packed = seq_len, packed

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch_size, self.seq_len)
        spec = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
        if self.packed:
            spec.update(positions=jnp.int32, segments=jnp.int32)
        return {k: jax.ShapeDtypeStruct(shape, dt) for k, dt in spec.items()}

    def example(self, window: dict) -> dict:
        L, tokens = self.seq_len, window["tokens"]
        segments = window.get("segments")
        out = {"inputs": tokens[:L], "targets": tokens[1:L + 1],
               "weights": (np.ones(L, np.float32) if segments is None
                           else (segments != 0).astype(np.float32))}
        if self.packed:  # an unpacked window in a packed batch (e.g. a mixture): one document
            out["positions"] = window.get("positions", np.arange(L, dtype=np.int32))
            out["segments"] = segments if segments is not None else np.ones(L, np.int32)
        return out

    def loss(self, model, params, batch: dict, rng: jax.Array, *, deterministic: bool):
        logits_BxLxV = model.apply({"params": params}, batch["inputs"],
                                   batch.get("positions"), batch.get("segments"),
                                   deterministic=deterministic, rngs={"dropout": rng})
        return cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])


OBJECTIVES = {"causal_lm": CausalLM}


def make_objective(cfg):
    """The objective `config.train.objective` names, checked against the model family."""
    name, arch = cfg.train.objective, cfg.model.arch
    if name not in OBJECTIVES:
        raise ConfigError(f"config.train.objective={name!r}: expected one of {sorted(OBJECTIVES)}")
    supported = models.family(arch).objectives
    if name not in supported:
        raise ConfigError(f"config.train.objective={name!r} does not fit config.model.arch="
                          f"{arch!r}, which trains with {', '.join(supported)}")
    return OBJECTIVES[name](cfg.data.seq_len, cfg.data.packing)
