"""LoRA (config.lora, jaxlm.models.transforms): the first loss is the base model's exactly;
only the adapters (and a classification head) train, under every objective, the base
bitwise unchanged and without optimizer state; checkpoints hold the adapters and name the
frozen base, and resume bitwise; adapters shard as their kernels; `export --merge` folds
them in (equal outputs within 1e-5, a plain model that evaluation and quantization load);
fine-tuning starts the adapters over a pretrained base; QLoRA over an int8 export; and bad
input is one line naming the field, before anything is written."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, random_batch, tiny_bert_config, tiny_config
from flax.traverse_util import flatten_dict, unflatten_dict
from test_state import assert_trees_equal, restored

from jaxlm import checkpoint, cli, export, finetune, quantize
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.models import transforms
from jaxlm.setup import build
from jaxlm.train import loop, objectives
from jaxlm.train.build import build_train

ONE = jax.devices()[:1]
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, 250)
BLOCK_TARGETS = ("attn/qkv", "attn/out", "mlp/fc_in", "mlp/fc_out")


def flat(tree) -> dict:
    return {"/".join(k): v for k, v in flatten_dict(tree).items()}


def with_lora(cfg, rank=4, **lora):
    cfg.lora.update(rank=rank, **lora)
    return cfg


def is_adapter(path: str) -> bool:
    return path.endswith(("_lora_a", "_lora_b"))


_FORWARD = {}


def logits(setup, params, output="logits"):
    """The model's outputs on TOKENS, jitted once per setup and head."""
    key = (id(setup), output)
    if key not in _FORWARD:
        _FORWARD[key] = (setup, jax.jit(lambda p: setup.model.apply({"params": p}, TOKENS,
                                                                    output=output)))
    return np.asarray(_FORWARD[key][1](params))


def numpy_params(setup, seed=0) -> dict:
    """Random params of `setup`'s shapes made on the host (no init program to compile):
    normal(0, 0.02) weights (as the models initialise), LayerNorm scales near 1, LoRA's B
    zero (as qwix makes it)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in flat(setup.abstract_params).items():
        x = rng.normal(0, 0.02, v.shape) + (k.endswith("scale"))
        out[k] = jnp.asarray(0 * x if k.endswith("_lora_b") else x, v.dtype)
    return nested(out)  # jax arrays: qwix tells a weight only as a jax.Array (or a tracer)


def exported(cfg, folder, seed=0):
    """numpy_params of `cfg` written as a params export (a pretrained model, a teacher)."""
    setup = build(cfg, ONE)
    params = numpy_params(setup, seed)
    checkpoint.export_params(folder, params, checkpoint.make_export_meta(cfg, setup.tokenizer, 0))
    return setup, params


def random_adapters(setup, params, seed=5, std=0.3):
    """`params` with every adapter replaced by normal noise (B too): a LoRA model whose
    adapters change its outputs, for the merge to be checked on."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 1000))
    out = {k: (std * jax.random.normal(next(keys), v.shape, v.dtype) if is_adapter(k) else v)
           for k, v in flat(params).items()}
    return nested(out)


def batch(cfg, seed: int = 0) -> dict:
    """conftest.random_batch, or for classification random rows with labels."""
    if cfg.train.objective != "classification":
        return random_batch(cfg, seed)
    rng, B, L = np.random.default_rng(seed), cfg.train.batch_size, cfg.data.seq_len
    return {"inputs": rng.integers(0, 256, (B, L)).astype(np.int32),
            "types": np.zeros((B, L), np.int32), "segments": np.ones((B, L), np.int32),
            "labels": (np.arange(B) % cfg.model.num_classes).astype(np.int32),
            "weights": np.ones(B, np.float32)}


def nested(flat_dict: dict):
    return unflatten_dict({tuple(k.split("/")): v for k, v in flat_dict.items()})


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("make,scan,objective", [
    (tiny_config, False, "causal_lm"), (tiny_config, True, "causal_lm"),
    (tiny_bert_config, False, "classification")], ids=["gpt", "gpt-scanned", "bert-classes"])
def test_first_loss_is_the_base_models_and_the_merge_is_exact(make, scan, objective):
    """Over the same base params (B = 0), the LoRA model's loss equals the base model's
    bitwise, dropout on the adapters included; with adapters that matter, the merged
    params give the LoRA model's outputs within 1e-5."""
    classes = 3 if objective == "classification" else 0
    base_cfg = make(scan_layers=scan, num_classes=classes)
    base_cfg.train.objective = objective
    cfg = with_lora(make(scan_layers=scan, num_classes=classes), dropout=0.2)
    cfg.train.objective = objective
    if make is tiny_bert_config:  # BERT's heads too (the pooler feeds the classifier)
        cfg.lora.targets = BLOCK_TARGETS + ("pooler",)
    base, lora = build(base_cfg, ONE), build(cfg, ONE)
    params = numpy_params(base)
    with_base = nested({**flat(numpy_params(lora, seed=1)), **flat(params)})  # fresh adapters
    assert set(flat(with_base)) - set(flat(params)) == set(transforms.adapter_paths(with_base))
    objective_fn = objectives.make_objective(cfg, get_tokenizer(cfg.data.tokenizer))
    rows = {k: jnp.asarray(v) for k, v in batch(cfg).items()}

    def loss(setup, p):
        return jax.jit(lambda p: objective_fn.loss(setup.model, p, rows, jax.random.PRNGKey(2),
                                                   deterministic=False)[0])(p)
    assert float(loss(base, params)) == float(loss(lora, with_base))

    output = "classes" if classes else "logits"
    adapted = random_adapters(lora, with_base)
    plain = build(transforms.merged_config(cfg), ONE)
    merged = transforms.merge_lora(adapted, cfg)
    assert set(flat(merged)) == set(flat(params))
    want, got = logits(lora, adapted, output), logits(plain, merged, output)
    assert np.max(np.abs(want - logits(lora, with_base, output))) > 1e-3  # the adapters matter
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["masked_lm", "distill"])
def test_only_the_adapters_train_under_every_objective(objective, tmp_path):
    """Two steps: the adapters (and a classification head) move and have Adam moments;
    every base parameter is bitwise what it was and has none; with adapter dropout, and
    scanned blocks for masked_lm. (causal_lm: the runs below; classification: through
    jaxlm.finetune.)"""
    make = tiny_bert_config if objective in ("masked_lm", "classification") else tiny_config
    cfg = with_lora(make(num_classes=2 if objective == "classification" else 0,
                         scan_layers=objective == "masked_lm"), dropout=0.1)
    cfg.train.objective = objective
    cfg.optimizer.warmup_steps = 0
    if objective == "distill":
        exported(tiny_config(), tmp_path / "teacher")
        cfg.distill.teacher = str(tmp_path / "teacher")
    step = build_train(cfg, ONE)
    state = step.init_state()
    frozen_before = jax.device_get(step.frozen)
    trained = set(flat(state.params))
    head = {k for k in trained if k.startswith("classifier/")}
    assert trained - head == {k for k in flat(step.setup.abstract_params) if is_adapter(k)}
    assert bool(head) == (objective == "classification")
    assert not any(is_adapter(k) for k in flat(frozen_before))
    assert set(flat(state.opt_state[0].mu)) == trained  # no moments for the base
    assert all(not np.any(v) for k, v in flat(state.params).items() if k.endswith("_lora_b"))
    before = jax.device_get(state.params)
    for i in range(2):
        state, metrics = step(state, step.place_batch(batch(cfg, i)), jax.random.PRNGKey(0))
        assert np.isfinite(float(metrics["loss"]))
    assert_trees_equal(step.frozen, frozen_before)
    after = flat(jax.device_get(state.params))
    assert all(not np.array_equal(v, after[k]) for k, v in flat(before).items()
               if not k.endswith("bias")), "every adapter and head kernel moved"


def test_adapters_shard_as_their_kernels_on_eight_devices():
    """FSDP x tensor parallel over 8 fake devices: A takes its kernel's input-axis sharding,
    B its output axis's (the fused qkv's B stays whole); outputs equal one device's."""
    cfg = with_lora(tiny_config(tie_embeddings=False), targets=BLOCK_TARGETS + ("lm_head",))
    one = build(cfg, ONE)
    cfg.mesh.update(strategy="fsdp_tp", data=2, fsdp=2, tensor=2)
    eight = build(cfg)
    shapes = flat(eight.abstract_params)

    def spec(name):  # padded to the array's rank (a PartitionSpec may stop early)
        s = tuple(flat(eight.param_shardings)[name].spec)
        return s + (None,) * (len(shapes[name].shape) - len(s))
    adapters = [k for k in shapes if is_adapter(k)]
    assert len(adapters) == 2 * (4 * cfg.model.num_layers + 1)
    for name in adapters:
        kernel = spec(name.rpartition("_lora_")[0])
        if name.endswith("_lora_a"):  # [in, rank]
            assert spec(name) == (kernel[0], None), name
        else:                         # [rank, out]: qkv's out is two axes, kept whole
            assert spec(name) == (None, kernel[1] if len(kernel) == 2 else None), name
    assert spec("block_0/mlp/fc_in/kernel_lora_a") == ("fsdp", None)
    assert spec("block_0/mlp/fc_in/kernel_lora_b") == (None, "tensor")
    assert spec("block_0/attn/out/kernel_lora_b") == (None, "fsdp")
    params = random_adapters(one, numpy_params(one))
    want = logits(one, params)  # equal up to the meshes' float summation orders
    got = logits(eight, jax.device_put(params, eight.param_shardings))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))


# ----------------------------------------------------------------------------- runs


def lora_run_config(base, steps):
    cfg = with_lora(tiny_config())
    cfg.train.steps, cfg.checkpoint.every = steps, 2
    # Steps 0-3 in the warmup, whatever train.steps: the 2 + 2 run sees the same rates.
    cfg.optimizer.update(learning_rate=1e-2, warmup_steps=4)
    cfg.finetune.init = str(base)
    return cfg


def train_lora(cfg, workdir):
    """A LoRA run of a causal LM over the pretrained base config.finetune.init."""
    hooks = loop.Hooks(init_params=lambda setup: finetune.load_pretrained(cfg, setup))
    return loop.train(cfg, workdir, ONE, hooks=hooks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretrained GPT (an export), and LoRA runs over it: 4 steps at once and 2 + 2."""
    root = tmp_path_factory.mktemp("lora")
    _, base_params = exported(tiny_config(), root / "base", seed=3)
    train_lora(lora_run_config(root / "base", 4), root / "whole")
    train_lora(lora_run_config(root / "base", 2), root / "halves")
    train_lora(lora_run_config(root / "base", 4), root / "halves")
    return {"root": root, "base": root / "base", "base_params": base_params,
            "cfg": lora_run_config(root / "base", 4), "run": root / "halves"}


def test_checkpoints_hold_the_adapters_name_the_base_and_resume_bitwise(runs):
    cfg, run = runs["cfg"], runs["run"]
    step = build_train(cfg, ONE)
    whole, halves = restored(step, [runs["root"] / "whole", run], 4)
    assert_trees_equal(whole, halves)
    assert all(is_adapter(k) for k in flat(halves.params))
    assert set(flat(halves.opt_state[0].mu)) == set(flat(halves.params))
    meta = checkpoint.Checkpointer(run, read_only=True).read_meta(4)
    assert meta["frozen"] == checkpoint.read_export_meta(run / "frozen")["sha256"]
    # The frozen base is the pretrained model, bitwise; evaluation reads base + adapters.
    setup = build(cfg, ONE)
    params, at = checkpoint.load_params(cfg, setup, run)
    assert at == 4
    trained, frozen = step.split.split(params)
    assert_trees_equal(trained, halves.params)
    assert_trees_equal(frozen, runs["base_params"])


def test_merged_export_is_a_plain_model_with_the_lora_models_outputs(runs, tmp_path):
    """export --merge: lora.rank 0 in its meta, the LoRA workdir's outputs within 1e-5,
    loaded by evaluation with a plain config and quantized as any export; without --merge
    the export keeps the adapters and evaluation adopts its config.lora."""
    cfg, run = runs["cfg"], runs["run"]
    setup = build(cfg, ONE)
    params = checkpoint.load_params(cfg, setup, run)[0]
    want = logits(setup, params)
    no_b = {k: 0 * v if k.endswith("_lora_b") else v for k, v in flat(params).items()}
    assert np.max(np.abs(want - logits(setup, nested(no_b)))) > 1e-3  # the adapters moved
    config = tmp_path / "lora.py"  # the run's config as a file, for the command line
    config.write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
                      "from conftest import tiny_config\n\n\ndef get_config():\n"
                      "    c = tiny_config()\n    c.lora.rank = 4\n    return c\n")
    argv = [f"--config={config}", f"--workdir={run}"]
    assert cli.run(export.main, argv + [f"--output={tmp_path / 'merged'}", "--merge"]) == 4
    assert cli.run(export.main, argv + [f"--output={tmp_path / 'adapters'}"]) == 4
    meta = checkpoint.read_export_meta(tmp_path / "merged")
    assert meta["config"]["lora"]["rank"] == 0
    for name in ("merged", "adapters"):
        plain = tiny_config()
        plain.evaluate.params = str(tmp_path / name)
        setup = build(plain, ONE)
        params, _ = checkpoint.load_params(plain, setup, None)
        assert bool(transforms.adapter_paths(params)) == (name == "adapters")
        np.testing.assert_allclose(logits(setup, params), want, atol=1e-5, rtol=1e-5)
    sizes = cli.run(quantize.main, [f"--params={tmp_path / 'merged'}",
                                    f"--out={tmp_path / 'q'}", "--config.quant.mode=int8_weight"])
    assert sizes["bytes"] < 0.6 * sizes["float_bytes"]


def test_classifier_through_finetune_trains_adapters_and_head_over_the_base(tmp_path):
    """jaxlm.finetune with LoRA over a pretrained BERT: the checkpoints hold the adapters
    and the fresh head, the frozen base is the pretrained model bitwise, and --evaluate
    scores the best params (adapters included)."""
    _, pre = exported(tiny_bert_config(), tmp_path / "bert", seed=4)
    cfg = with_lora(tiny_bert_config(num_classes=2))
    cfg.finetune.update(train_examples=32, epochs=2, batch_size=8, learning_rate=1e-2,
                        class_names=("false", "true"), init=str(tmp_path / "bert"))
    cfg.evaluate.batch_size = 25
    out = finetune.finetune(cfg, tmp_path / "ft")
    assert len(out["epochs"]) == 2 and 0 <= out["validation"]["accuracy"] <= 1
    ckpt = checkpoint.Checkpointer(tmp_path / "ft", read_only=True)
    last = ckpt.latest_step()
    state = ckpt.restore(last, *_state_target(cfg))[0]
    ckpt.close()
    saved = flat(state.params)
    assert {k for k in saved if not is_adapter(k)} == {"classifier/out/kernel",
                                                       "classifier/out/bias"}
    assert set(flat(state.opt_state[0].mu)) == set(saved)
    frozen = checkpoint.read_export_meta(tmp_path / "ft" / "frozen")
    assert frozen["config"]["lora"]["rank"] == 4
    run = finetune.run_config(cfg, 32)
    setup = build(run, ONE)
    params, _ = checkpoint.load_params(run, setup, tmp_path / "ft")
    assert_trees_equal({k: v for k, v in flat(params).items() if k in flat(pre)}, flat(pre))
    got = finetune.evaluate_file(cfg, tmp_path / "ft", "synthetic:facts:validation")
    assert got["accuracy"] == pytest.approx(out["validation"]["accuracy"])


def _state_target(cfg):
    step = build_train(finetune.run_config(cfg, 32), ONE)
    return step.abstract_state, step.state_shardings


def test_qlora_trains_adapters_over_an_int8_export_and_merges_to_float(runs, tmp_path):
    """config.quant.mode=int8_weight with LoRA: the base is a python -m jaxlm.quantize
    export, frozen in int8; the adapters train; --merge dequantizes it into a float model
    with the QLoRA model's outputs."""
    cli.run(quantize.main, [f"--params={runs['base']}", f"--out={tmp_path / 'q'}",
                            "--config.quant.mode=int8_weight"])
    cfg = lora_run_config(tmp_path / "q", 2)
    cfg.quant.mode = "int8_weight"
    summary = train_lora(cfg, tmp_path / "run")
    assert np.isfinite(summary["loss"])
    setup = build(cfg, ONE)
    params, _ = checkpoint.load_params(cfg, setup, tmp_path / "run")
    assert transforms.quantized_paths(params)  # the base stays int8
    assert any(np.any(v) for k, v in flat(params).items() if k.endswith("_lora_b"))
    plain = build(transforms.merged_config(cfg), ONE)
    merged = jax.jit(lambda p: transforms.merge_lora(p, cfg))(params)
    assert not transforms.quantized_paths(merged) and not transforms.adapter_paths(merged)
    np.testing.assert_allclose(logits(plain, merged), logits(setup, params), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,value,match", [
    ("lora.rank", "-1", r"config\.lora\.rank=-1 must be >= 0"),
    ("lora.dropout", "1.0", r"config\.lora\.dropout=1\.0 must be in \[0, 1\)"),
    ("lora.alpha", "0", r"config\.lora\.alpha=0\.0 must be positive"),
])
def test_bad_values_are_refused_by_the_schema(field, value, match):
    with pytest.raises(ConfigError, match=match):
        cli.with_overrides(tiny_config(), [(field, value)])


@pytest.mark.parametrize("change,match", [
    ({"rank": 40}, r"config\.lora\.rank=40 exceeds the smaller side of block_0/attn/out's "
                   r"kernel \[32, 32\]"),
    ({"targets": ("attn/qkv", "mlp/gate")}, r"config\.lora\.targets: 'mlp/gate' matches no "
                                            r"weight matmul.*block_<i>/mlp/fc_in"),
    ({"targets": ("embed",)}, r"'embed' matches no weight matmul"),
    ({"targets": ("attn/(",)}, r"config\.lora\.targets: 'attn/\(' is not a regular"),
    ({"targets": ()}, r"config\.lora\.rank=4 needs config\.lora\.targets"),
])
def test_bad_lora_configs_are_one_line_naming_the_field(tmp_path, change, match):
    cfg = with_lora(tiny_config(), **change)
    with pytest.raises(ConfigError, match=match):
        cli.with_overrides(cfg, [])
        loop.train(cfg, tmp_path / "run", ONE)
    assert not (tmp_path / "run").exists()


def test_bad_combinations_and_mismatched_checkpoints_are_refused(runs, tmp_path):
    for change, match in [
        ({"quant.mode": "int8_weight", "quant.train": "true"}, r"config\.quant\.train .* with "
                                                                r"config\.lora\.rank"),
        ({"quant.mode": "int8"}, r"config\.quant\.mode='int8' with config\.lora\.rank"),
        ({"prune.sparsity": "0.5"}, r"config\.prune with config\.lora\.rank"),
    ]:
        with pytest.raises(ConfigError, match=match):
            cli.with_overrides(with_lora(tiny_config()), list(change.items()))
    # QLoRA needs an unrolled model and an int8 base
    cfg = lora_run_config(runs["base"], 2)
    cfg.quant.mode = "int8_weight"
    with pytest.raises(ConfigError, match=r"QLoRA\) trains adapters over int8 weights"):
        train_lora(cfg, tmp_path / "q")
    cfg.model.scan_layers = True
    with pytest.raises(ConfigError, match=r"scan_layers=false"):
        build(cfg, ONE)
    # a LoRA run resumed, evaluated or exported without (or with other) adapters
    plain = tiny_config()
    with pytest.raises(CheckpointError, match=r"config\.lora\.rank is 4 there and 0 here; "
                                              r"pass --config\.lora\.rank=4"):
        checkpoint.load_params(plain, build(plain, ONE), runs["run"])
    other = lora_run_config(runs["base"], 6)
    other.lora.targets = ("attn/qkv",)
    with pytest.raises(CheckpointError, match=r"config\.lora\.targets is \("):
        train_lora(other, runs["run"])
    with pytest.raises(ConfigError, match=r"--merge folds LoRA adapters"):
        export.export(tiny_config(), runs["run"], tmp_path / "m", merge=True)
    # a checkpoint of another shape: the existing shape checks name it
    small = lora_run_config(runs["base"], 2)
    small.model.d_model = 64
    with pytest.raises(CheckpointError, match=r"config\.model\.d_model is 32 there and 64 here"):
        train_lora(small, tmp_path / "small")
    assert not any((tmp_path / d).exists() for d in ("q", "m", "small"))
