"""Starting a run from a trained model's params: fine-tuning (config.finetune.init) and
continued pretraining (config.train.init) both come here.

`pretrained_params` reads a workdir (its latest checkpoint), one checkpoint folder, or a
params export (jaxlm.export, jaxlm.quantize, a Hugging Face import), checks it fits the
run's config (family, shape, tokenizer, quantization) and places it on the run's mesh. The
loop uses it only when the workdir has no checkpoint: resume > init > random
(jaxlm.train.loop.restore_or_init). The optimizer state starts fresh, and so does the
learning-rate schedule, warmup included: continued pretraining re-warms the learning rate
(Gupta et al. 2023; Ibrahim et al. 2024).
"""

from __future__ import annotations

import copy
import logging
import pathlib

from jaxlm import checkpoint, models
from jaxlm import config as config_lib
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.models import transforms

log = logging.getLogger("jaxlm")


def pretrained_params(cfg, setup, spec: str, field: str):
    """The params at `spec` (a jaxlm workdir: its latest checkpoint; one checkpoint folder;
    a params export or Hugging Face import), placed on `setup`'s mesh, after checking that
    they fit the config: family, shape and tokenizer (a classification or span head and
    LoRA's adapters, which start fresh, aside). `field` names the config field in errors, e.g.
    "config.finetune.init". With config.lora.rank they are the frozen base; QLoRA's
    (config.quant.mode too) is a python -m jaxlm.quantize export. A LoRA run's adapters
    are folded in."""
    path = pathlib.Path(spec).expanduser()
    what = f"{field}={spec!r}"
    if (path / "meta").is_dir() and (path / "params").is_dir():
        meta, step, ckpt = checkpoint.read_export_meta(path), None, None
    else:
        if path.name.isdigit() and path.parent.name == "checkpoints":
            workdir, step = path.parent.parent, int(path.name)
        elif (path / "checkpoints").is_dir():
            workdir, step = path, -1
        else:
            raise ConfigError(f"{what}: not a jaxlm workdir, checkpoint or params export")
        ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint, read_only=True)
        step = ckpt.select(step)
        if step is None:
            raise CheckpointError(f"{what}: the workdir holds no checkpoint")
        meta = ckpt.read_meta(step)
    saved = config_lib.from_dict(meta["config"], what)
    if transforms.is_quantized(cfg):  # QLoRA (config.lora.rank): its base is int8
        if saved.quant.mode != cfg.quant.mode or saved.quant.train or saved.lora.rank:
            raise ConfigError(f"{what}: config.quant.mode={cfg.quant.mode!r} with "
                              "config.lora.rank (QLoRA) trains adapters over int8 weights; "
                              "start from their export: python -m jaxlm.quantize "
                              f"--config.quant.mode={cfg.quant.mode} (--workdir= or --params=) "
                              "--out=DIR")
    else:
        transforms.refuse_quantized(saved, what)
    if saved.model.arch != cfg.model.arch:
        raise CheckpointError(f"{what} holds a {saved.model.arch.upper()} model, and this config "
                              f"fine-tunes config.model.arch={cfg.model.arch!r}")
    for shape in setup.family.shape_fields:
        if shape not in ("num_classes", "span_head") and saved.model[shape] != cfg.model[shape]:
            raise CheckpointError(f"{what} holds another model: config.model.{shape} is "
                                  f"{saved.model[shape]!r} there and {cfg.model[shape]!r} here")
    if saved.model.num_classes not in (0, cfg.model.num_classes):
        raise CheckpointError(f"{what} has a classification head of {saved.model.num_classes} "
                              f"classes, and config.model.num_classes={cfg.model.num_classes}")
    if saved.model.span_head and not cfg.model.span_head:
        raise CheckpointError(f"{what} has a span-extraction head, and config.model.span_head "
                              "is false: set it true (or start from a model without one)")
    if meta["tokenizer"] != setup.tokenizer.to_dict():
        raise CheckpointError(f"{what} was made with tokenizer {meta['tokenizer']}, but "
                              f"config.data.tokenizer gives {setup.tokenizer.to_dict()}")
    from jaxlm.setup import build
    pre_cfg = copy.deepcopy(cfg)
    pre_cfg.model, pre_cfg.lora, pre_cfg.quant = saved.model, saved.lora, saved.quant
    pre = build(pre_cfg, setup.mesh.devices.flatten())
    if ckpt is None:
        params = checkpoint.load_export(path, pre.abstract_params, pre.param_shardings, meta,
                                         cfg.checkpoint.verify)
    else:
        restore = lambda s: ckpt.restore_params(s, pre.abstract_params, pre.param_shardings)  # noqa: E731
        try:
            params = ckpt.restore_or_name_intact(
                step, restore, lambda i: f"start from it with --{field}={ckpt.directory / str(i)}")
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from None
        finally:
            ckpt.close()
    if saved.lora.rank:  # a LoRA run: its adapters folded in (as python -m jaxlm.export --merge)
        params = transforms.merge_lora(params, saved)
        log.info("%s is a LoRA run: its adapters are folded into its weights", what)
    log.info("starting from %s: %s pretrained parameters", path, f"{models.count_params(params):,}")
    return params
