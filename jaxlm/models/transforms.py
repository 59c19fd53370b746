"""Model transforms: one function wraps a model for a config, by rules over module paths.

    model = transform(model, cfg, float_params)   # jaxlm.setup.build calls this once

int8 quantization goes through google/qwix, which intercepts the matmuls (jax.lax
dot_general and einsum) that run inside the modules its rules name and quantizes them
there; the model's code does not change. The rules are made from the parameters: a module
that owns a `kernel` (every projection, the MLP, the untied output head, BERT's pooler
and heads) or the token table (whose `attend` is the tied output head) gets one, unless
config.quant.skip names it. The attention's own matmuls (queries against keys, weights
against values) multiply two activations and are left in float.

config.quant.mode:
  int8_weight  int8 weights with a float scale per output channel (absmax); the matmul's
               input stays in the compute dtype.
  int8         the same weights, and the matmul's input quantized to int8 as it runs
               (dynamic: a scale per token, from its absmax).
config.quant.train (QAT): training runs the same matmuls fake-quantized (qwix's QtProvider:
quantized in the forward pass, straight-through in the backward), on float parameters;
`python -m jaxlm.quantize` then writes the quantized export.

Post-training quantized models hold their weights as qwix `WithAux(QArray(qvalue int8,
scale))` leaves, with the float kernel's logical axis names, so they shard on any mesh as
the float model does. They run unrolled (qwix creates the quantized weights per module,
which jax.lax.scan's stacked layers do not support): jaxlm.quantize unstacks a scanned
model's blocks. The token table stays in float by default (config.quant.skip): it is also
the input lookup, a gather, which an int8 table would have to be dequantized for.
"""

from __future__ import annotations

import re

import flax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import qwix

from jaxlm.errors import ConfigError

MODES = ("int8_weight", "int8")
TOKEN_TABLE = ("embed", "tokens")  # module path of the token table (layers.Embeddings)


def is_quantized(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the model holds quantized weights (post-training quantization): not QAT,
    whose weights stay in float."""
    return cfg.quant.mode != "none" and not cfg.quant.train


def refuse_quantized(saved: ml_collections.ConfigDict, what: str) -> None:
    """A post-training quantized export (its saved config) has no float weights to train
    or to distil from."""
    if is_quantized(saved):
        raise ConfigError(f"{what} holds {saved.quant.mode}-quantized weights (python -m "
                          "jaxlm.quantize): use the float model it was made from")


def matmul_modules(params) -> list[str]:
    """Module paths ("block_0/attn/qkv") whose matmuls multiply by a weight: owners of a
    `kernel`, and the token table (its `attend` is the tied output head)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(params)))
    owners = {path[:-1] for path in flat if path[-1] == "kernel"}
    owners |= {path[:-1] for path in flat if path[:-1] == TOKEN_TABLE}
    return sorted("/".join(p) for p in owners)


def quantized_modules(cfg: ml_collections.ConfigDict, params) -> list[str]:
    """The matmul modules that config.quant.skip does not name."""
    skips = []
    for pattern in cfg.quant.skip:
        try:
            skips.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"config.quant.skip: {pattern!r} is not a regular expression "
                              f"({e})") from None
    return [m for m in matmul_modules(params) if not any(s.search(m) for s in skips)]


def rules(cfg: ml_collections.ConfigDict, params) -> list[qwix.QuantizationRule]:
    """One qwix rule naming exactly the modules to quantize (module paths match whole)."""
    modules = quantized_modules(cfg, params)
    if not modules:
        raise ConfigError(f"config.quant.skip={tuple(cfg.quant.skip)!r} leaves no matmul to "
                          "quantize")
    if is_quantized(cfg) and cfg.model.tie_embeddings and "/".join(TOKEN_TABLE) in modules:
        raise ConfigError("config.quant.skip does not skip the token table, which with "
                          "config.model.tie_embeddings is also the input lookup (a gather "
                          "that a post-training int8 table cannot serve); keep '^embed/' in "
                          "config.quant.skip (quantization-aware training may quantize it)")
    kind = qwix.QtRule if cfg.quant.train else qwix.QuantizationRule
    act = jnp.int8 if cfg.quant.mode == "int8" else None
    return [kind(module_path="|".join(re.escape(m) for m in modules),
                 weight_qtype=jnp.int8, act_qtype=act)]


def transform(model: nn.Module, cfg: ml_collections.ConfigDict, params) -> nn.Module:
    """`model` as config.quant asks (unchanged when quant.mode is "none"). `params`: the
    float model's (abstract) parameters, which the rules are made from."""
    if cfg.quant.mode == "none":
        return model
    if cfg.quant.mode not in MODES:
        raise ConfigError(f"config.quant.mode={cfg.quant.mode!r}: expected none or one of "
                          f"{MODES}")
    if is_quantized(cfg) and cfg.model.scan_layers:
        raise ConfigError("config.quant.mode: a post-training quantized model runs unrolled; "
                          "pass --config.model.scan_layers=false (python -m jaxlm.quantize "
                          "writes its export so)")
    provider = qwix.QtProvider if cfg.quant.train else qwix.PtqProvider
    return qwix.quantize_model(model, provider(rules(cfg, params)))


def quantize_params(float_params, abstract_quantized):
    """Float params -> the quantized model's (int8 kernels with their scales); jit it with
    the quantized model's shardings as out_shardings."""
    return qwix.quantize_params(float_params, nn.meta.unbox(abstract_quantized))


def quantized_paths(params) -> list[str]:
    """Paths of the quantized weights of a params tree ("block_0/attn/qkv/kernel"): qwix
    keeps each as WithAux(array=QArray), a leaf of the params' nested dicts."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return sorted("/".join(k) for k, v in flat.items()
                  if isinstance(getattr(v, "array", None), qwix.QArray))
