"""What every command builds from a config before it touches data or checkpoints.

    setup = build(cfg)   # tokenizer, model, mesh, parameter shapes and shardings

Evaluation, export, inference and training all start here; training adds its objective,
optimizer and step on top (jaxlm.train.build.build_train), and nothing here imports
jaxlm.train: a server or an exporter builds a model without importing training. Every
name in the config that this needs (model family, tokenizer, mesh strategy and rules) is
parsed here, so a bad one stops the command before it writes anything.
Nothing here allocates a full model: shapes come from `jax.eval_shape`, and parameters are
created or restored straight into their shardings.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import models, sharding
from jaxlm.data.tokenizers import Tokenizer, get_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.models import attention, transforms

log = logging.getLogger("jaxlm")


@dataclasses.dataclass
class Setup:
    cfg: ml_collections.ConfigDict
    tokenizer: Tokenizer
    family: models.Family
    model: nn.Module
    mesh: jax.sharding.Mesh
    boxed_params: object       # abstract params with their logical axis names
    abstract_params: object    # the same, unboxed: ShapeDtypeStructs
    param_shardings: object    # NamedShardings of the params on `mesh`

    def init_params(self, rng: jax.Array):
        """Freshly initialised params (unboxed); jit this with out_shardings to place them."""
        tokens = jnp.zeros((1, self.cfg.data.seq_len), jnp.int32)
        return nn.meta.unbox(self.model.init(rng, tokens)["params"])


def build(cfg: ml_collections.ConfigDict, devices=None) -> Setup:
    """Tokenizer, model, mesh (over `devices`, default all) and parameter shardings.

    With config.quant or config.lora the model is wrapped (jaxlm.models.transforms):
    after post-training quantization its params are the quantized ones, with LoRA they
    include the adapters. An int8 or LoRA export as config.evaluate.params brings its
    quantization and adapters along (`adopt_export`), so Setup.cfg may differ from `cfg`
    there."""
    cfg = adopt_export(cfg)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"config.model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"{tokenizer.name} tokenizer's {tokenizer.vocab_size} ids")
    family = models.family(cfg.model.arch)
    sharding.rules(cfg.mesh)  # a bad strategy or rule is named before any device work
    mesh = sharding.make_mesh(cfg.mesh, devices)
    platform = mesh.devices.flat[0].platform
    # The attention kernel for the devices the model will run on (maybe a TPU topology
    # compiled for from this host): checked, and "auto" chosen, before anything compiles.
    model_cfg = cfg.model.copy_and_resolve_references()
    model_cfg.attention_impl = attention.resolve(cfg.model, platform, log=log)
    with model_cfg.unlocked():  # layers.kernel_dot picks its matmul for this platform
        model_cfg.platform = platform
        if sharding.stage_count(mesh) > 1:  # layers.apply_blocks pipelines the blocks
            model_cfg.pipeline_stages = sharding.stage_count(mesh)
            # config.train.microbatches flow through the stages (and do not accumulate)
            model_cfg.pipeline_microbatches = cfg.train.microbatches
            model_cfg.pipeline_repeats = cfg.mesh.pipeline_repeats  # circular schedule
    attention.check_seq_len(model_cfg.attention_impl, cfg.data.seq_len)
    if cfg.model.remat and cfg.model.remat_policy == "offload_dots" and platform == "cpu":
        raise ConfigError("config.model.remat_policy='offload_dots' moves saved activations "
                          "to host memory, which a CPU backend does not have apart from its "
                          "own; use 'save_dots_no_batch' (the same activations, kept)")
    model = family.module(model_cfg)
    if cfg.data.seq_len % mesh.shape["sequence"]:
        raise ConfigError(f"config.data.seq_len={cfg.data.seq_len} is not divisible by the "
                          f"sequence axis ({mesh.shape['sequence']})")
    heads = sharding.split_count(mesh, cfg.mesh, "heads")
    if cfg.model.num_heads % heads:  # kernels are [D, H*K]: a split must not cut a head
        raise ConfigError(f"config.model.num_heads={cfg.model.num_heads} is not divisible "
                          f"by the {heads} parts config.mesh.strategy={cfg.mesh.strategy!r} "
                          "splits heads into")
    tokens = jax.ShapeDtypeStruct((1, cfg.data.seq_len), jnp.int32)
    init = lambda model: jax.eval_shape(  # noqa: E731
        lambda rng, t: model.init(rng, t)["params"], jax.random.PRNGKey(0), tokens)
    boxed = init(model)
    if cfg.quant.mode != "none" or cfg.lora.rank:
        model = transforms.transform(model, cfg, boxed)
        boxed = init(model)
    sharding.check_divisible(boxed, mesh, cfg.mesh)
    return Setup(cfg, tokenizer, family, model, mesh, boxed, nn.meta.unbox(boxed),
                 sharding.logical_shardings(boxed, mesh, cfg.mesh))


def adopt_export(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg`, or a copy that evaluates config.evaluate.params as it was made: a quantized
    export (python -m jaxlm.quantize), when config.quant.mode is unset or the export's,
    brings its config.quant and unrolled blocks (quantized models run unrolled); an export
    with LoRA adapters (python -m jaxlm.export without --merge, jaxlm.finetune's best),
    when config.lora.rank is 0, its config.lora. Anything else that differs from the
    export is refused when the params load."""
    if not cfg.evaluate.params:
        return cfg
    from jaxlm import checkpoint
    from jaxlm import config as config_lib
    path = pathlib.Path(cfg.evaluate.params)
    if not checkpoint.is_export(path):
        return cfg  # named by whatever reads it
    meta = checkpoint.read_export_meta(path)
    saved = config_lib.from_dict(meta["config"], f"export {path}")
    quant = transforms.is_quantized(saved) and cfg.quant.mode in ("none", saved.quant.mode)
    lora = saved.lora.rank and not cfg.lora.rank
    if not (quant or lora):
        return cfg
    cfg = copy.deepcopy(cfg)
    if quant:
        cfg.quant = saved.quant
        cfg.model.scan_layers = False
        log.info("config.evaluate.params=%s holds %s-quantized weights: the model runs so "
                 "(config.quant.mode=%s, unrolled blocks)", path, saved.quant.mode,
                 saved.quant.mode)
    if lora:
        cfg.lora = saved.lora
        log.info("config.evaluate.params=%s holds LoRA adapters: the model runs with them "
                 "(config.lora.rank=%d)", path, saved.lora.rank)
    return cfg
