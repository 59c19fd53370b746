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

LoRA (config.lora, qwix's LoraProvider): every kernel W [in, *out] of a module that
config.lora.targets names gets two adapters beside it, W_lora_a [in, rank] (He-uniform)
and W_lora_b [rank, prod(out)] (zeros), and its matmul runs as
x W + (alpha/rank) (x A) B; with B = 0 the first forward pass is the base model's. The
adapters take the logical axis names of W's input axis (A) and of W's output axis (B, when
the output is one axis: the fused qkv kernel's B [rank, 3*H*K] stays whole, rank x 3D
numbers), so they shard as their kernel does. Only the adapters train, and a
classification head whole (jaxlm.trainable.lora_trainable); the base is the frozen part.
`merge_lora` folds them in: W + (alpha/rank) reshape(A @ B, W.shape). LoRA runs scanned
and unrolled. With config.quant.mode=int8_weight the frozen base is int8 (QLoRA: the
adapters and any trained head stay in float; unrolled, as every int8 model).
qwix tells a weight by its identity as a jax.Array (or, under jit, a tracer): a LoRA model
applied outside jit to numpy params runs without its adapters. jaxlm's params are always
placed jax arrays, and every forward pass is jitted.
"""

from __future__ import annotations

import dataclasses
import re
import threading

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import qwix

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.models.layers import STACKED
from jaxlm.trainable import ADAPTERS, HEAD

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
    """The matmul modules that config.quant.skip does not name (with LoRA, nor a trained
    classification head: QLoRA keeps what it trains in float)."""
    skips = [config_lib.regex(p, "quant.skip") for p in cfg.quant.skip]
    if cfg.lora.rank and cfg.model.num_classes:
        skips.append(re.compile(HEAD))
    return [m for m in matmul_modules(params) if not any(s.search(m) for s in skips)]


def rules(cfg: ml_collections.ConfigDict, params) -> list[qwix.QuantizationRule]:
    """One qwix rule naming exactly the modules to quantize (module paths match whole)."""
    modules = quantized_modules(cfg, params)
    if not modules:
        raise ConfigError(f"config.quant.skip={tuple(cfg.quant.skip)!r} leaves no matmul to "
                          "quantize")
    _check_token_table(cfg, modules)
    kind = qwix.QtRule if cfg.quant.train else qwix.QuantizationRule
    act = jnp.int8 if cfg.quant.mode == "int8" else None
    return [kind(module_path="|".join(re.escape(m) for m in modules),
                 weight_qtype=jnp.int8, act_qtype=act)]


def _check_token_table(cfg: ml_collections.ConfigDict, modules) -> None:
    if cfg.model.get("embed_lookup") == "one_hot" and "/".join(TOKEN_TABLE) in modules:
        raise ConfigError("config.model.embed_lookup='one_hot' with a quantized token "
                          "table: the lookup's matmul would read int8 rows; keep '^embed/' "
                          "in config.quant.skip, or use embed_lookup=gather")
    if is_quantized(cfg) and cfg.model.tie_embeddings and "/".join(TOKEN_TABLE) in modules:
        raise ConfigError("config.quant.skip does not skip the token table, which with "
                          "config.model.tie_embeddings is also the input lookup (a gather "
                          "that a post-training int8 table cannot serve); keep '^embed/' in "
                          "config.quant.skip (quantization-aware training may quantize it)")


def transform(model: nn.Module, cfg: ml_collections.ConfigDict, params) -> nn.Module:
    """`model` as config.quant and config.lora ask (unchanged when quant.mode is "none"
    and lora.rank 0). `params`: the plain model's (abstract) parameters, which the rules
    are made from."""
    if cfg.quant.mode == "none" and not cfg.lora.rank:
        return model
    if cfg.quant.mode not in MODES + ("none",):
        raise ConfigError(f"config.quant.mode={cfg.quant.mode!r}: expected none or one of "
                          f"{MODES}")
    if cfg.lora.rank:
        if is_quantized(cfg) and cfg.model.scan_layers:
            raise ConfigError("config.quant.mode with config.lora.rank (QLoRA): an int8 base "
                              "runs unrolled; pass --config.model.scan_layers=false (python "
                              "-m jaxlm.quantize writes its export so)")
        return qwix.quantize_model(model, _Lora(lora_rules(cfg, params)))
    if is_quantized(cfg) and cfg.model.scan_layers:
        raise ConfigError("config.quant.mode: a post-training quantized model runs unrolled; "
                          "pass --config.model.scan_layers=false (python -m jaxlm.quantize "
                          "writes its export so)")
    provider = qwix.QtProvider if cfg.quant.train else qwix.PtqProvider
    return qwix.quantize_model(model, provider(rules(cfg, params)))


def quantize_params(float_params, abstract_quantized):
    """Float params -> the quantized model's (int8 kernels with their scales), in the
    dtypes of `abstract_quantized` (the quantized model's own: with bf16 compute its
    scales are bf16, where qwix would compute them in the float params' dtype); jit it
    with the quantized model's shardings as out_shardings."""
    abstract = nn.meta.unbox(abstract_quantized)
    quantized = qwix.quantize_params(float_params, abstract)
    return jax.tree_util.tree_map(lambda x, a: x.astype(a.dtype), quantized, abstract)


def quantized_paths(params) -> list[str]:
    """Paths of the quantized weights of a params tree ("block_0/attn/qkv/kernel"): qwix
    keeps each as WithAux(array=QArray), a leaf of the params' nested dicts."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return sorted("/".join(k) for k, v in flat.items()
                  if isinstance(getattr(v, "array", None), qwix.QArray))


# ----------------------------------------------------------------------------- LoRA

def lora_modules(cfg: ml_collections.ConfigDict, params) -> list[str]:
    """The module paths config.lora.targets names, among the owners of a kernel (not the
    token table: its table is also the input lookup, which an adapter on the tied head's
    matmul would leave out, so a merge could not be exact); each target must name one,
    and config.lora.rank must not exceed a targeted kernel's smaller side."""
    candidates = [m for m in matmul_modules(params) if m != "/".join(TOKEN_TABLE)]
    chosen = set()
    for pattern in cfg.lora.targets:
        hits = [m for m in candidates if config_lib.regex(pattern, "lora.targets").search(m)]
        if not hits:
            names = sorted({re.sub(r"block_\d+", "block_<i>", m) for m in candidates})
            raise ConfigError(f"config.lora.targets: {pattern!r} matches no weight matmul of "
                              f"this model; its modules: {', '.join(names)}")
        chosen.update(hits)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(params)))
    rank = cfg.lora.rank
    for m in sorted(chosen):
        shape = flat[(*m.split("/"), "kernel")].shape
        shape = shape[1:] if m.startswith(STACKED + "/") else shape  # scanned: [layers, ...]
        sides = (shape[0], int(np.prod(shape[1:])))
        if rank > min(sides):
            raise ConfigError(f"config.lora.rank={rank} exceeds the smaller side of {m}'s "
                              f"kernel {list(shape)} ({sides[0]} in, {sides[1]} out): lower "
                              "it, or leave that module out of config.lora.targets")
    return sorted(chosen)


def _paths(modules) -> str:
    return "|".join(re.escape(m) for m in modules)


def lora_rules(cfg: ml_collections.ConfigDict, params) -> list[qwix.QuantizationRule]:
    """LoRA rules for the targeted modules; with an int8 base (QLoRA) their kernels are
    int8 and the other quantized modules get a plain int8 rule."""
    lo = cfg.lora
    adapted = lora_modules(cfg, params)
    quantized = set(quantized_modules(cfg, params)) if is_quantized(cfg) else set()
    _check_token_table(cfg, quantized)
    lora = lambda modules, qtype: qwix.LoraRule(  # noqa: E731
        module_path=_paths(modules), rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout,
        weight_qtype=qtype)
    out = []
    if quantized & set(adapted):
        out.append(lora(sorted(quantized & set(adapted)), jnp.int8))
    if set(adapted) - quantized:
        out.append(lora(sorted(set(adapted) - quantized), None))
    if quantized - set(adapted):
        out.append(qwix.QuantizationRule(module_path=_paths(sorted(quantized - set(adapted))),
                                         weight_qtype=jnp.int8))
    return out


class _Lora(qwix.LoraProvider):
    """qwix's LoRA provider with the adapters' dropout in training forward passes only
    (the model called with deterministic=False, as the train step calls it): qwix applies
    a rule's dropout on every call, evaluation and init included. (The rule lookup,
    `_get_current_rule_and_op_id`, is qwix's hook for its providers, as of qwix 0.1.8.)"""

    def __init__(self, rules):
        super().__init__(rules)
        self._call = threading.local()  # qwix intercepts per thread, so this is per thread

    def process_model_inputs(self, model, model_args, model_kwargs):
        self._call.training = not model_kwargs.get("deterministic", True)
        return super().process_model_inputs(model, model_args, model_kwargs)

    def _get_current_rule_and_op_id(self, op_name, **kwargs):
        rule, op_id = super()._get_current_rule_and_op_id(op_name, **kwargs)
        if isinstance(rule, qwix.LoraRule) and rule.dropout and \
                not getattr(self._call, "training", False):
            rule = dataclasses.replace(rule, dropout=0.0)
        return rule, op_id


def merged_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of `merge_lora`'s result: no adapters, and float weights."""
    out = cfg.copy_and_resolve_references()
    out.lora.rank = 0
    if is_quantized(cfg):  # QLoRA: the int8 base is dequantized by the merge
        out.quant.mode = "none"
    return out


def merge_lora(params, cfg: ml_collections.ConfigDict):
    """The params of the LoRA model of `cfg` folded into those of `merged_config(cfg)`:
    every adapted kernel W becomes W + (alpha/rank) reshape(A @ B, W.shape) (qwix's
    update: A [.., in, rank] on W's input axis, B [.., rank, prod(out)] on its output
    axes in order; `..` a scanned model's layers), the adapters dropped. An int8 base
    (QLoRA) is dequantized first, so the result is float. Jit it with the merged model's
    shardings as out_shardings."""
    scale = cfg.lora.alpha / cfg.lora.rank
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    out = {}
    for path, w in flat.items():
        if re.search(ADAPTERS, path[-1]):
            continue
        if isinstance(getattr(w, "array", None), qwix.QArray):
            w = qwix.dequantize(w.array).astype(jnp.dtype(cfg.model.param_dtype))
        a = flat.get((*path[:-1], path[-1] + "_lora_a"))
        if a is not None:
            b = flat[(*path[:-1], path[-1] + "_lora_b")]
            delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
            w = (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)
        out[path] = w
    return flax.traverse_util.unflatten_dict(out)


def adapter_paths(params) -> list[str]:
    """Paths of the LoRA adapters in a params tree."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return sorted("/".join(k) for k in flat if re.search(ADAPTERS, k[-1]))
