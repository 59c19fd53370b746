"""python -m jaxlm.interop import --src=HF_DIR --out=DIR: Hugging Face GPT-2 / BERT weights
(safetensors + config.json + tokenizer files) -> a jaxlm params export DIR with DIR/config.py,
for --config=DIR/config.py --config.evaluate.params=DIR or --config.finetune.init=DIR.

python -m jaxlm.interop export --workdir=DIR --out=HF_DIR: the latest checkpoint of a jaxlm
workdir (or a params export) -> a folder transformers opens with from_pretrained."""

import pathlib

from jaxlm import cli

FLAGS = {
    "import": [cli.Flag("src", "Hugging Face folder (model.safetensors or shards, config.json)",
                        None, metavar="HF_DIR"),
               cli.Flag("out", "the jaxlm params export to write (must not exist)", None,
                        metavar="DIR")],
    "export": [cli.Flag("workdir", "a jaxlm workdir (its latest checkpoint) or a params export",
                        None, metavar="DIR"),
               cli.Flag("out", "the Hugging Face folder to write (must not exist)", None,
                        metavar="HF_DIR")],
}


def main(argv):
    args = cli.parse(argv, "jaxlm.interop", __doc__, config=False, workdir=False, commands=FLAGS)
    from jaxlm.interop import hf  # JAX and friends: after the flags are known good
    f = args.flags
    if args.command == "import":
        from jaxlm.config import base_config
        cfg = hf.import_folder(pathlib.Path(f["src"]), pathlib.Path(f["out"]), base_config())
        print(f"wrote {f['out']} ({cfg.model.arch}, {cfg.model.num_layers} layers, d_model "
              f"{cfg.model.d_model}); evaluate it with --config={f['out']}/config.py "
              f"--config.evaluate.params={f['out']}")
        return cfg
    from jaxlm.workdir import check_output
    check_output(f["out"], "--out")  # before the restore; a bucket is refused here
    cfg, params = hf.load_jaxlm(f["workdir"])
    hf.export_folder(cfg, params, cfg.data.tokenizer, pathlib.Path(f["out"]))
    print(f"wrote {f['out']}: open it with transformers' from_pretrained")
    return cfg


if __name__ == "__main__":
    cli.run(main)
