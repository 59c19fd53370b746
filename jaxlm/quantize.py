"""Post-training int8 quantization of a model, written as a params export.

    python -m jaxlm.quantize (--workdir=DIR | --params=EXPORT) --out=DIR
        --config.quant.mode=int8_weight|int8 [--config=FILE] [--config.FIELD=VALUE ...]

Reads the latest checkpoint of a training run (config.checkpoint.step picks another) or a
float params export, quantizes every weight matmul as jaxlm.models.transforms describes
(int8 weights with a float scale per output channel; `int8` also quantizes the matmuls'
inputs as they run), and writes OUT, an export that jaxlm.evaluate, jaxlm.finetune
--evaluate and jaxlm.serve load with --config.evaluate.params=OUT on any mesh (they read
its quantization from it). A run trained with config.quant.train (QAT) is quantized the
same way, and a LoRA run with its adapters folded into the weights first (as python -m
jaxlm.export --merge does). The config is the one saved with the source unless --config
gives one; the export's blocks are unrolled (config.model.scan_layers=false), as quantized
models run.
"""

from __future__ import annotations

import copy
import logging
import pathlib

from jaxlm import checkpoint, cli, files
from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.workdir import check_output

log = logging.getLogger("jaxlm")

FLAGS = [
    cli.Flag("workdir", "a training run to quantize (its latest checkpoint)", "",
             metavar="DIR"),
    cli.Flag("params", "a float params export to quantize (python -m jaxlm.export, or an "
             "import)", "", metavar="EXPORT"),
    cli.Flag("out", "where the quantized export goes (must not exist)", None, metavar="DIR"),
]


def source_of(workdir: str, params: str) -> pathlib.Path:
    if bool(workdir) == bool(params):
        raise ConfigError("give one of --workdir=DIR (a training run) or --params=EXPORT")
    path = files.path(workdir or params, "--workdir" if workdir else "--params")
    if params and not checkpoint.is_export(path):
        raise ConfigError(f"--params={params}: not a jaxlm params export (no meta and params "
                          "inside)")
    if workdir and not (path / "checkpoints").is_dir():
        raise ConfigError(f"--workdir={workdir}: not a training run (no checkpoints inside)")
    return path


def quantize(cfg, source: pathlib.Path, out: pathlib.Path) -> dict:
    """Writes the int8 export of `source` (a workdir or a float export) to `out`; returns
    {"step", "float_bytes", "bytes"} (the params' bytes before and after)."""
    import jax

    from jaxlm import models
    from jaxlm.models import transforms
    from jaxlm.setup import build
    out = check_output(out, "--out", bucket=True)
    if cfg.quant.mode == "none":
        raise ConfigError("config.quant.mode: give int8_weight or int8 (what to quantize to)")
    is_export = checkpoint.is_export(source)
    what = f"--params={source}" if is_export else f"--workdir={source}"
    saved = config_lib.from_dict(checkpoint.latest_meta(source, what)["config"], what)
    if transforms.is_quantized(saved):
        raise ConfigError(f"{what} is already quantized ({saved.quant.mode}); quantize its "
                          "float source instead")
    float_cfg = copy.deepcopy(cfg)
    float_cfg.quant.mode, float_cfg.quant.train = "none", False
    float_cfg.evaluate.params = str(source) if is_export else ""
    float_setup = build(float_cfg)
    params, step = checkpoint.load_params(float_cfg, float_setup, source)
    if float_setup.cfg.lora.rank:  # a LoRA run: adapters folded in (jaxlm.export --merge)
        params = transforms.merge_lora(params, float_setup.cfg)
    params = models.unstack_blocks(params)  # quantized models run unrolled

    qcfg = copy.deepcopy(cfg)
    qcfg.quant.train, qcfg.model.scan_layers, qcfg.evaluate.params = False, False, ""
    qcfg.lora.rank = 0
    qsetup = build(qcfg, float_setup.mesh.devices.flatten())
    quantized = jax.jit(lambda p: transforms.quantize_params(p, qsetup.boxed_params),
                        out_shardings=qsetup.param_shardings)(params)
    sizes = {"float_bytes": checkpoint.tree_bytes(params),
             "bytes": checkpoint.tree_bytes(quantized)}
    meta = {**checkpoint.make_export_meta(qcfg, qsetup.tokenizer, step),
            "quantized_from": str(files.absolute(source)), **sizes}
    checkpoint.export_params(out, quantized, meta)
    log.info("quantized step %d of %s to %s (%s): %d quantized weights; %.2f MB of params, "
             "were %.2f MB", step, source, out, qcfg.quant.mode,
             len(transforms.quantized_paths(quantized)), sizes["bytes"] / 1e6,
             sizes["float_bytes"] / 1e6)
    return {"step": step, **sizes}


def main(argv):
    args = cli.parse(argv, "jaxlm.quantize", __doc__, config="saved", workdir=False,
                     flags=FLAGS)
    source = source_of(args.flags["workdir"], args.flags["params"])
    meta = checkpoint.latest_meta(source, str(source))
    cfg = args.saved_config(meta["config"], f"the config saved in {source}")
    cli.start(cfg)
    return quantize(cfg, source, args.flags["out"])


if __name__ == "__main__":
    cli.run(main)
