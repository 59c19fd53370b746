"""The one config schema of jaxlm, its loader and its command-line overrides.

Every field a run can set is declared (and commented) in `base_config()`. A config file
under `configs/` is a Python file whose `get_config()` starts from `base_config()` and
changes values; it cannot add fields, so a typo fails loudly instead of being ignored.

Command line (shared by `jaxlm.main`, `jaxlm.train` and `jaxlm.evaluate`):

    python -m jaxlm.main --config=configs/gpt/debug.py --workdir=runs/debug \
        --config.train.steps=50 --config.model.position=rope

Shape letters used in variable names across the code base:
  B batch, L sequence length, D model width, H heads, K head dim (D = H*K),
  F MLP hidden width, V vocabulary, M microbatches.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import pathlib

import ml_collections


class ConfigError(ValueError):
    """A user-facing config problem; the message names the offending field."""


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (a small GPT that trains on CPU in minutes)."""
    c = ml_collections.ConfigDict()

    # "jit": one program over the whole mesh, XLA inserts the collectives (all strategies).
    # "pmap": the classic data-parallel path: replicated params, psum of gradients, local
    # devices only; config.mesh is ignored.
    c.parallelism = "jit"

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 258          # V; must be >= the tokenizer's vocab (byte tokenizer: 258)
    m.max_len = 256             # longest sequence the model accepts (size of learned positions)
    m.num_layers = 4
    m.d_model = 128             # D
    m.num_heads = 4             # H; head dim K = D / H
    m.mlp_dim = 512             # F; GPT-2 uses 4*D
    m.dropout = 0.0             # on embeddings, attention output and MLP output
    m.attention_dropout = 0.0   # on attention probabilities
    m.position = "learned"      # "learned" (GPT-2) or "rope" (rotary, applied to q and k)
    m.rope_base = 10000.0       # rotary base frequency (used when position = "rope")
    m.tie_embeddings = True     # output projection reuses the token embedding (GPT-2 does)
    m.layer_norm_eps = 1e-5
    m.dtype = "float32"         # compute dtype ("bfloat16" for mixed precision)
    m.param_dtype = "float32"   # storage dtype of parameters and optimizer state
    m.attention_impl = "xla"    # seam for fused kernels (cuDNN / Pallas) behind one signature
    m.remat = False             # recompute each block's activations in the backward pass
    m.init_std = 0.02           # normal init std; residual output projections get / sqrt(2*layers)

    c.data = d = ml_collections.ConfigDict()
    # "synthetic" (built-in offline corpus, jaxlm.data.synthetic), the name of a prepared
    # TFDS text dataset (catalog or local, see jaxlm.data.prepare), or "mixture".
    d.name = "synthetic"
    d.seed = 0                  # seeds the synthetic world and the order of sequences
    d.seq_len = 128             # tokens per training sequence (<= model.max_len)
    # "byte", "sentencepiece:PATH" (model file) or "gpt2:DIR" (local vocabulary files);
    # see jaxlm.data.tokenizer.
    d.tokenizer = "byte"
    d.prefetch = 2              # batches prepared ahead on a background thread
    # TFDS datasets (jaxlm.data.lm, jaxlm.data.token_cache):
    d.split = "train"           # TFDS split (slices like "train[:90%]" work)
    d.text_key = ""             # feature holding the text; "" = the dataset's only text feature
    d.data_dir = ""             # TFDS data_dir (local or gs://); "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    # Folder with a catalog dataset's source files: a dataset not yet prepared in data_dir
    # is prepared from it (nothing is ever downloaded). "" = it must be prepared already.
    d.manual_dir = ""
    d.cache_dir = ""            # token caches; "" = <data_dir>/jaxlm_tokens (local data_dir)
    # False: the token stream cut into windows (documents cross window edges). True: whole
    # documents packed per sequence with segment ids and position resets, padded.
    d.packing = False
    # With name = "mixture": ("NAME=WEIGHT", ...), e.g. ("tiny_shakespeare=0.2", "synthetic=0.8").
    d.mixture = ()
    d.mixture_block = 1000      # each block of this many sequences has exact per-dataset counts

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000              # optimizer steps
    t.batch_size = 32           # global batch, in sequences, per optimizer step
    t.microbatches = 1          # gradient accumulation: batch_size is split into this many
    t.seed = 0                  # parameter init and dropout
    t.log_every = 25            # steps between logged metrics
    # A step whose loss or gradient norm is NaN/inf is never applied (the state stays as it
    # was, so a diverged state cannot reach a checkpoint). Then "stop" ends the run with a
    # message naming the step; "skip" goes on with the next batch and counts the step.
    t.nonfinite = "stop"
    t.max_skipped_steps = 10    # "skip" gives up after this many consecutive bad steps

    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every = 500              # steps between saves; one is also written at the end and on SIGTERM
    ck.keep = 2                 # most recent checkpoints kept on disk
    ck.archive_every = 0        # also keep, forever, checkpoints at multiples of this; 0 = none
    ck.async_save = True        # write in the background while training goes on
    ck.check_data = True        # refuse to resume on data whose order differs from the checkpoint's
    ck.step = -1                # checkpoint that jaxlm.evaluate / jaxlm.export read; -1 = latest
    # Saves, restores and cross-host barriers log a heartbeat line every heartbeat_seconds
    # while they run, and stop the process (exit code 3, stacks printed) when one exceeds
    # timeout_seconds: a hung multi-host job ends with a message instead of idling a pod.
    ck.heartbeat_seconds = 60.0
    ck.timeout_seconds = 1800.0

    c.optimizer = o = ml_collections.ConfigDict()
    o.learning_rate = 3e-3      # peak learning rate, reached after warmup
    o.warmup_steps = 100        # linear warmup from 0
    o.min_lr_ratio = 0.1        # cosine decays to learning_rate * min_lr_ratio at train.steps
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1        # decoupled (AdamW)
    # Parameters whose path contains any of these names are not decayed (biases, norms).
    o.no_decay = ("bias", "scale")
    o.grad_clip_norm = 1.0      # global-norm clipping; 0 disables

    c.mesh = me = ml_collections.ConfigDict()
    # Mesh axis sizes; -1 takes the devices left over. Product must equal the device count.
    me.data = -1
    me.fsdp = 1
    me.sequence = 1             # splits activations along their length (long sequences)
    me.tensor = 1
    # Slices (TPU slices / GPU hosts) each axis spans across the data-centre network; the
    # axis sizes above are then per slice. Only data and fsdp may span slices.
    me.dcn_data = 1
    me.dcn_fsdp = 1
    # How parameters and activations are split (jaxlm.sharding.STRATEGIES): "dp" (data
    # parallel, replicated params), "fsdp" (ZeRO-3: params, grads and Adam moments split
    # over the fsdp axis), "tp" (Megatron tensor parallel over the tensor axis), "fsdp_tp".
    me.strategy = "dp"
    # Extra (logical axis, mesh axes) rules, tried before the strategy's own.
    me.rules = ()

    c.evaluate = e = ml_collections.ConfigDict()
    # Parameters to evaluate: "" = the workdir's checkpoint (config.checkpoint.step), or the
    # path of a params-only export (python -m jaxlm.export).
    e.params = ""
    e.tasks = ("rule_mc", "rule_exact", "facts_mc", "arithmetic_mc")
    e.shots = (0, 1, 4, 8)
    e.num_examples = 200        # per task (fewer if the task has fewer)
    e.batch_size = 32           # sequences scored per forward pass
    e.seed = 0                  # which demonstrations are drawn for each example
    e.max_new_tokens = 16       # for exact-match tasks
    e.num_samples = 3           # generated samples printed after training
    e.sample_len = 96           # bytes per sample
    e.temperature = 0.8

    c.distributed = di = ml_collections.ConfigDict()
    # Multi-process runs (one process per host, jax.distributed). A lone process needs
    # nothing. On a cluster JAX recognises (SLURM, Cloud TPU, GKE, MPI) set auto_detect
    # (launch/slurm.sh and launch/tpu_pod.sh do); launch/local.py sets the other fields
    # for several processes on one machine.
    di.auto_detect = False
    di.coordinator_address = ""  # host:port of process 0
    di.num_processes = 0
    di.process_id = -1
    di.cpu_devices = 0          # CPU devices per process (testing without accelerators)

    c.hardware = h = ml_collections.ConfigDict()
    h.peak_flops = 0.0          # per-device peak FLOP/s for MFU; 0 = look up the device kind

    c.lock()
    return c


# GPT-2 sizes (Radford et al. 2019) with the GPT-3 paper's learning rates for models of
# that size (Brown et al. 2020, Table 2.1). Batch: 512 x 1024 tokens (~0.5M), as GPT-3 used
# for its 125M-350M models.
GPT2_SIZES = {
    #         layers  d_model heads  peak lr
    "small":  (12,    768,    12,    6e-4),   # 124M parameters
    "medium": (24,    1024,   16,    3e-4),   # 355M
    "large":  (36,    1280,   20,    2.5e-4),  # 774M
    "xl":     (48,    1600,   25,    2e-4),   # 1.56B
}


def gpt2_config(size: str) -> ml_collections.ConfigDict:
    """A GPT-2-shaped model (50257-token vocabulary, 1024 positions, tied embeddings).

    data.tokenizer stays "byte" (no download); with GPT-2's vocabulary files on disk set
    --config.data.tokenizer=gpt2:DIR. The model keeps GPT-2's vocabulary size either way,
    so parameter counts and HF conversion line up.
    """
    layers, d_model, heads, lr = GPT2_SIZES[size]
    c = base_config()
    c.model.update(num_layers=layers, d_model=d_model, num_heads=heads, mlp_dim=4 * d_model,
                   vocab_size=50257, max_len=1024, dropout=0.0, attention_dropout=0.0)
    c.data.seq_len = 1024
    c.train.update(steps=100_000, batch_size=512, microbatches=1, log_every=50)
    c.checkpoint.update(every=1000, keep=3, archive_every=10_000)
    c.optimizer.update(learning_rate=lr, warmup_steps=2000, min_lr_ratio=0.1,
                       weight_decay=0.1)
    c.evaluate.batch_size = 16
    return c


# ----------------------------------------------------------------------------- loading


def load_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()`, locked."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"jaxlm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} defines no get_config()")
    cfg = module.get_config()
    cfg.lock()
    return cfg


def _leaf_paths(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out += _leaf_paths(value, name + ".")
        else:
            out.append(name)
    return out


def _parse_value(field: str, text: str, current):
    """Parses `text` into the type of the field's current value."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"config.{field}: expected a bool (true/false), got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(current, tuple) and all(isinstance(x, str) for x in current):
            return tuple(x.strip() for x in text.split(",") if x.strip())  # a,b,c
        raise ConfigError(
            f"config.{field}: expected {type(current).__name__}, got {text!r}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
        value = (value,)
    if type(value) is not type(current):
        raise ConfigError(
            f"config.{field}: expected {type(current).__name__}, got {text!r} "
            f"({type(value).__name__})")
    return value


def apply_override(cfg: ml_collections.ConfigDict, field: str, text: str) -> None:
    """Sets `cfg.<field>` from its command-line text, checking name and type."""
    known = _leaf_paths(cfg)
    if field not in known:
        close = difflib.get_close_matches(field, known, n=1)
        hint = f" (did you mean config.{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config field config.{field}{hint}")
    *parents, leaf = field.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = _parse_value(field, text, node[leaf])


@dataclasses.dataclass
class Args:
    config: ml_collections.ConfigDict
    workdir: pathlib.Path | None
    config_path: str
    flags: dict[str, str]  # the command's own flags (see `parse_args(flags=...)`)


def parse_args(argv: list[str], *, workdir: bool = True,
               flags: dict[str, str] | None = None) -> Args:
    """`--config=FILE --workdir=DIR [--config.a.b=VALUE ...]` -> Args, all checked.

    `flags` names a command's own extra flags with their defaults (e.g. jaxlm.plan's
    --topology); `workdir=False` for commands that write nothing.
    """
    config_path, workdir_value, overrides = None, None, []
    extra = dict(flags or {})
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"unrecognised argument {arg!r}; expected --name=value")
        name, value = arg[2:].split("=", 1)
        if name == "config":
            config_path = value
        elif name == "workdir" and workdir:
            workdir_value = value
        elif name.startswith("config."):
            overrides.append((name[len("config."):], value))
        elif name in extra:
            extra[name] = value
        else:
            known = ["--config", "--workdir"][:1 + workdir] + [f"--{f}" for f in extra]
            raise ConfigError(f"unknown flag --{name}; known: {', '.join(known)}, --config.<field>")
    if config_path is None or (workdir and workdir_value is None):
        raise ConfigError("--config=FILE " + ("and --workdir=DIR are" if workdir else "is")
                          + " required")
    cfg = load_config(config_path)
    for field, value in overrides:
        apply_override(cfg, field, value)
    validate(cfg)
    return Args(config=cfg, workdir=pathlib.Path(workdir_value) if workdir else None,
                config_path=config_path, flags=extra)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks the relations between fields that types alone cannot; raises ConfigError."""
    m, d, t = cfg.model, cfg.data, cfg.train

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    need(m.d_model % m.num_heads == 0,
         f"config.model.d_model={m.d_model} is not divisible by config.model.num_heads={m.num_heads}")
    need(m.position in ("learned", "rope"),
         f"config.model.position={m.position!r}: expected 'learned' or 'rope'")
    need(m.position != "rope" or (m.d_model // m.num_heads) % 2 == 0,
         "config.model.position='rope' needs an even head dim (d_model / num_heads)")
    for f in ("dtype", "param_dtype"):
        need(m[f] in ("float32", "bfloat16", "float16"),
             f"config.model.{f}={m[f]!r}: expected float32, bfloat16 or float16")
    from jaxlm.sharding import STRATEGIES  # here: the table lives with the mesh code
    need(cfg.mesh.strategy in STRATEGIES,
         f"config.mesh.strategy={cfg.mesh.strategy!r}: expected one of {sorted(STRATEGIES)}")
    need(m.attention_impl in ("xla",),
         f"config.model.attention_impl={m.attention_impl!r}: only 'xla' exists so far")
    need(cfg.parallelism in ("jit", "pmap"),
         f"config.parallelism={cfg.parallelism!r}: expected 'jit' or 'pmap'")
    need(d.seq_len <= m.max_len,
         f"config.data.seq_len={d.seq_len} exceeds config.model.max_len={m.max_len}")
    need(d.name != "mixture" or len(d.mixture) > 0,
         "config.data.name='mixture' needs config.data.mixture=NAME=WEIGHT,...")
    need(d.mixture_block > 0, f"config.data.mixture_block={d.mixture_block} must be positive")
    for f in ("steps", "batch_size", "microbatches", "log_every"):
        need(t[f] > 0, f"config.train.{f}={t[f]} must be positive")
    need(t.nonfinite in ("stop", "skip"),
         f"config.train.nonfinite={t.nonfinite!r}: expected 'stop' or 'skip'")
    ck = cfg.checkpoint
    for f in ("every", "keep", "heartbeat_seconds", "timeout_seconds"):
        need(ck[f] > 0, f"config.checkpoint.{f}={ck[f]} must be positive")
    need(ck.archive_every >= 0, f"config.checkpoint.archive_every={ck.archive_every} must be >= 0")
    need(t.batch_size % t.microbatches == 0,
         f"config.train.batch_size={t.batch_size} is not divisible by "
         f"config.train.microbatches={t.microbatches}")
    need(0 <= cfg.optimizer.warmup_steps <= t.steps,
         f"config.optimizer.warmup_steps={cfg.optimizer.warmup_steps} must be in [0, train.steps]")
    need(all(k >= 0 for k in cfg.evaluate.shots), "config.evaluate.shots must be >= 0")


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)
