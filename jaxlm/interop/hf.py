"""Hugging Face folder <-> jaxlm params, for either family.

Import: config.json picks the family and gives config.model; the folder's tokenizer files
give config.data.tokenizer (GPT-2: vocab.json + merges.txt or encoder.json + vocab.bpe;
BERT: vocab.txt); every tensor is checked (names, shapes, float dtypes) before any is
placed; heads the file lacks are initialised fresh (named in the log). Export: the
checkpoint's params, gathered one at a time, under the names and layouts published files
use, with a config.json and the tokenizer files, so `transformers` opens the folder with
`from_pretrained`. Both write through jaxlm.checkpoint.writing: checked for free space
first, staged beside the output and renamed into place when complete (the output appears
only then; a failure leaves nothing), files made with the user's umask.
"""

from __future__ import annotations

import copy
import functools
import logging
import pathlib
import shutil

import jax
import ml_collections
import numpy as np

from jaxlm import files, models
from jaxlm import workdir as workdir_lib
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.interop import bert, gpt2
from jaxlm.interop.convert import check_tensors, export_tensors, import_params
from jaxlm.interop.safetensors_io import TensorFolder, write_folder

log = logging.getLogger("jaxlm")

FAMILIES = {"gpt": gpt2, "bert": bert}
GPT2_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
TOKENIZER = "tokenizer"  # an import's copy of the tokenizer files


def family_of(hf: dict, where) -> object:
    arch = (hf.get("architectures") or [None])[0]
    for fam in (gpt2, bert):
        if arch in fam.ARCHITECTURES or (arch is None and hf.get("model_type") == fam.PREFIX[:-1]):
            return fam
    known = [a for fam in (gpt2, bert) for a in fam.ARCHITECTURES]
    raise CheckpointError(f"{where}/config.json: architecture {arch or hf.get('model_type')!r} "
                          f"is not one jaxlm has; it converts {', '.join(known)}")


def tokenizer_spec(src: pathlib.Path, fam) -> str:
    if fam is gpt2:
        if any((src / a).is_file() and (src / b).is_file() for a, b in GPT2_TOKENIZER_FILES):
            return f"gpt2:{src.resolve()}"
        raise CheckpointError(f"{src}: no GPT-2 tokenizer files (vocab.json + merges.txt or "
                              "encoder.json + vocab.bpe)")
    if (src / "vocab.txt").is_file():
        return f"wordpiece:{src.resolve()}"
    raise CheckpointError(f"{src}: no vocab.txt (BERT WordPiece)")


def read(src, cfg: ml_collections.ConfigDict, devices=None):
    """(config with the folder's model and tokenizer, Setup, params placed on its mesh)."""
    from jaxlm.config import validate
    from jaxlm.setup import build
    src = pathlib.Path(src)
    folder = TensorFolder(src)
    hf = folder.config()
    fam = family_of(hf, src)
    keys = folder.keys()
    cfg = copy.deepcopy(cfg)
    cfg.model.update(fam.model_config(hf))
    prefix = fam.prefix_of(keys)
    if fam is gpt2 and "lm_head.weight" in folder and cfg.model.tie_embeddings:
        # a stored head that is not the embedding makes an untied model
        if not (folder.get("lm_head.weight") == folder.get(f"{prefix}wte.weight")).all():
            cfg.model.tie_embeddings = False
    cfg.data.tokenizer = tokenizer_spec(src, fam)
    cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_len)
    for f in ("sample_len", "max_new_tokens"):  # generation must leave room for a prompt
        cfg.evaluate[f] = min(cfg.evaluate[f], cfg.model.max_len // 2)
    validate(cfg)
    # Tensors are placed layer by layer into an unscanned model; a scanned config then
    # stacks them (for a moment the blocks are held twice).
    flat = copy.deepcopy(cfg)
    flat.model.scan_layers = False
    setup = build(flat, devices)
    if setup.tokenizer.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(f"{src}: the tokenizer has {setup.tokenizer.vocab_size} ids, the "
                              f"model's vocabulary {cfg.model.vocab_size}")
    if fam is gpt2:
        rules = gpt2.rules(cfg.model, prefix)
    else:
        rules = bert.rules(cfg.model, prefix, bert.heads_in(keys), bert.uses_old_names(keys))
    check_tensors(folder, rules, fam.ignored, setup.abstract_params)
    params = import_params(folder, rules, setup.abstract_params, setup.param_shardings)
    fresh = _fill_missing(params, setup, cfg.train.seed)
    if fresh:
        log.info("%s has no %s: initialised fresh", src, ", ".join(fresh))
    if cfg.model.scan_layers:
        setup = build(cfg, devices)
        params = jax.jit(functools.partial(models.stack_blocks, num_layers=cfg.model.num_layers),
                         out_shardings=setup.param_shardings)(params)
    return cfg, setup, params


def _fill_missing(params: dict, setup, seed: int) -> list[str]:
    """Adds the parameters the file did not have (e.g. a pooler), freshly initialised;
    returns their top-level names."""
    want = jax.tree_util.tree_flatten_with_path(setup.abstract_params)[0]
    have = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = [path for path, _ in want if "/".join(k.key for k in path) not in have]
    if not missing:
        return []
    init = jax.jit(setup.init_params, out_shardings=setup.param_shardings)(jax.random.PRNGKey(seed))
    for path in missing:
        tree, value = params, init
        for k in path[:-1]:
            tree, value = tree.setdefault(k.key, {}), value[k.key]
        tree[path[-1].key] = value[path[-1].key]
    return sorted({path[0].key for path in missing})


def import_folder(src, out, cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Writes OUT (a jaxlm params export) and OUT/config.py from the Hugging Face folder
    SRC; returns the config."""
    from jaxlm import checkpoint
    from jaxlm.config import to_dict
    out = workdir_lib.check_output(out, "--out")
    cfg, setup, params = read(src, cfg)
    kind = cfg.data.tokenizer.partition(":")[0]
    # Self-contained: the tokenizer files go inside, and config.py finds them beside
    # itself wherever the folder is moved.
    files = {f"{TOKENIZER}/{name}": path for name, path in _tokenizer_files(cfg.data.tokenizer).items()}
    files["config.py"] = _config_file(to_dict(cfg), src, kind)
    checkpoint.export_params(out, params, checkpoint.make_export_meta(cfg, setup.tokenizer, 0),
                             "the import", files)
    cfg.data.tokenizer = f"{kind}:{out.resolve() / TOKENIZER}"
    return cfg


def _config_file(values: dict, src, tokenizer_kind: str) -> str:
    lines = [f'"""The jaxlm config of the Hugging Face weights imported from {src}.',
             "", "    python -m jaxlm.evaluate --config=THIS --workdir=DIR "
             "--config.evaluate.params=THIS_FOLDER", "",
             f"The tokenizer is the folder {TOKENIZER}/ beside this file.", '"""', "",
             "import pathlib", "", "from jaxlm.config import from_dict", "", "",
             "def get_config():", f"    cfg = from_dict({values!r})",
             "    here = pathlib.Path(__file__).resolve().parent",
             f"    cfg.data.tokenizer = {tokenizer_kind + ':'!r} + str(here / {TOKENIZER!r})",
             "    return cfg", ""]
    return "\n".join(lines)


def export_folder(cfg: ml_collections.ConfigDict, params, tokenizer_spec_: str, out,
                  dtype=np.float32, shard_bytes: int = 2 << 30) -> None:
    """Writes OUT, a Hugging Face folder of `params` (config.model `cfg.model`), tensors
    in `dtype`, in safetensors files of at most `shard_bytes` (more: shards and an index)."""
    import json
    m = cfg.model
    if m.arch not in FAMILIES:
        raise ConfigError(f"config.model.arch={m.arch!r} has no Hugging Face export")
    fam = FAMILIES[m.arch]
    fam.check_model(m)
    from jaxlm import checkpoint
    out = workdir_lib.check_output(out, "--out")
    rules = gpt2.rules(m) if fam is gpt2 else bert.rules(
        m, heads=bert.HEADS if m.num_classes else bert.HEADS[:3])
    # The end-of-text id is the vocabulary's, which a padded table puts below its end.
    eos = get_tokenizer(tokenizer_spec_).eos_id if tokenizer_spec_.startswith("gpt2:") else None
    hf_config = json.dumps(fam.hf_config(m, eos), indent=2)
    files = _tokenizer_files(tokenizer_spec_)
    nbytes = (sum(x.size for x in jax.tree_util.tree_leaves(params)) * np.dtype(dtype).itemsize
              + len(hf_config) + sum(path.stat().st_size for path in files.values()))
    with checkpoint.writing(out, "the Hugging Face folder", nbytes) as folder:
        tensors = export_tensors(params, rules, dtype)
        if jax.process_index() == 0:
            folder.mkdir()
            write_folder(folder, tensors, shard_bytes)
            (folder / "config.json").write_text(hf_config)
            for name, path in files.items():  # copyfile: modes from the umask
                shutil.copyfile(path, folder / name)
        else:
            for _ in tensors:  # every process takes part in gathering sharded params
                pass
    if not files:
        log.warning("tokenizer %s has no Hugging Face files; %s holds weights only",
                    tokenizer_spec_, out)


def _tokenizer_files(spec: str) -> dict[str, pathlib.Path]:
    """{name: path} of the Hugging Face files of tokenizer `spec` (none for a kind that
    has no such files)."""
    kind, _, where = spec.partition(":")
    names = {"gpt2": [n for pair in GPT2_TOKENIZER_FILES for n in pair],
             "wordpiece": ["vocab.txt", "tokenizer_config.json"]}.get(kind, [])
    return {name: pathlib.Path(where) / name for name in names
            if (pathlib.Path(where) / name).is_file()}


def load_jaxlm(path: pathlib.Path, devices=None):
    """(config, params) of a jaxlm workdir's latest checkpoint or of a params export, with
    the config stored beside them, on a default mesh."""
    from jaxlm import checkpoint
    from jaxlm.config import base_config, from_dict
    from jaxlm.setup import build
    path = files.path(path)
    meta = checkpoint.latest_meta(path, f"--workdir={path}")
    cfg = from_dict(meta["config"], f"{path}")
    # an import's own tokenizer files, wherever it is now (imports are local folders)
    if not files.is_remote(path) and (path / TOKENIZER).is_dir():
        cfg.data.tokenizer = f"{cfg.data.tokenizer.partition(':')[0]}:{path.resolve() / TOKENIZER}"
    cfg.mesh = base_config().mesh  # whatever mesh wrote it: load on this machine's default
    cfg.evaluate.params = str(path) if (path / "meta").is_dir() else ""
    cfg.checkpoint.step = -1
    setup = build(cfg, devices)
    params, _ = checkpoint.load_params(cfg, setup, path)
    return cfg, params
