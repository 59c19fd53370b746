"""Hugging Face interop, proven against transformers' own Flax GPT-2 and BERT (random
weights, nothing downloaded): a folder jaxlm writes is opened by `from_pretrained` (its
converter, not ours) and gives jaxlm's logits; jaxlm reads the variants real uploads have;
tokenizers give the Hugging Face ids."""

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_bert_config, tiny_config

from jaxlm.config import base_config
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.data.tokenizers.gpt2 import byte_alphabet
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.interop import hf
from jaxlm.setup import build

transformers = pytest.importorskip("transformers", reason="transformers 4.x is in the test extra")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("Ġa", "n"), ("e", "r"))
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "un",
         "##aff", "##able", "a", "##b", "b", "c", "hello", "world", "##s", ",", ".", "!", "é",
         "naïve", "##ly", "run", "##ning", "The", "Cat"]


def gpt2_vocab(folder: pathlib.Path):
    """A tiny GPT-2 vocabulary: the 256 byte tokens, a few merges, <|endoftext|>."""
    alpha = byte_alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alpha, key=alpha.get))}
    for i, (a, b) in enumerate(MERGES):
        vocab[a + b] = 256 + i
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")


def wordpiece_vocab(folder: pathlib.Path, lower: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))


def random_params(cfg, seed=0):
    setup = build(cfg, jax.devices()[:1])
    return setup, jax.jit(setup.init_params)(jax.random.PRNGKey(seed))


def tokens_and_types(vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, vocab, (2, 24))
    types = np.zeros_like(tokens)
    types[:, 12:] = 1
    return tokens, types


GPT_SHAPES = {"two_heads_odd_vocab": dict(num_heads=2, vocab_size=301),
              "untied_four_heads": dict(num_heads=4, vocab_size=264, tie_embeddings=False)}


# ----------------------------------------------------------------------------- GPT-2

@pytest.mark.parametrize("shape", list(GPT_SHAPES))
def test_gpt2_export_opens_in_transformers_and_imports_back(tmp_path, shape):
    cfg = tiny_config(**GPT_SHAPES[shape])
    setup, params = random_params(cfg)
    hf.export_folder(cfg, params, "byte", tmp_path / "hf")
    ref = transformers.FlaxGPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"), from_pt=True)
    tokens, _ = tokens_and_types(cfg.model.vocab_size)
    ours = setup.model.apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(ours, ref(tokens).logits, atol=2e-5, rtol=0)
    gpt2_vocab(tmp_path / "hf")
    cfg_in, setup_in, back = hf.read(tmp_path / "hf", base_config(), jax.devices()[:1])
    assert cfg_in.model.tie_embeddings == cfg.model.tie_embeddings
    assert cfg_in.data.tokenizer == f"gpt2:{(tmp_path / 'hf').resolve()}"
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def _rewrite(folder: pathlib.Path, edit):
    """Applies `edit(dict of name -> array)` to the folder's model.safetensors."""
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_gpt2_variants_of_real_uploads_import_the_same(tmp_path):
    """GPT2Model files (no `transformer.` prefix), legacy causal-mask buffers, a stored
    tied lm_head: the same params; a stored head that differs: an untied model."""
    cfg = tiny_config(num_heads=2, vocab_size=301)
    setup, params = random_params(cfg)
    hf.export_folder(cfg, params, "byte", tmp_path / "hf")
    gpt2_vocab(tmp_path / "hf")
    L = cfg.model.max_len

    def variant(t):
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)
        for i in range(cfg.model.num_layers):
            t[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, L, L), np.float32))
            t[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
        t["lm_head.weight"] = t["wte.weight"].copy()

    _rewrite(tmp_path / "hf", variant)
    cfg_in, _, back = hf.read(tmp_path / "hf", base_config(), jax.devices()[:1])
    assert cfg_in.model.tie_embeddings
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    _rewrite(tmp_path / "hf", lambda t: t.update({"lm_head.weight": t["lm_head.weight"] * 2}))
    cfg_in, _, back = hf.read(tmp_path / "hf", base_config(), jax.devices()[:1])
    assert not cfg_in.model.tie_embeddings
    np.testing.assert_array_equal(back["lm_head"]["kernel"], 2 * np.asarray(params["embed"]["tokens"]["embedding"]).T)


def test_sharded_checkpoints_with_an_index(tmp_path):
    """model-0000X-of-0000Y.safetensors + model.safetensors.index.json, as large uploads
    come: the index maps every tensor of the single-file export to its shard, and jaxlm
    reads the shards back. (transformers' Flax classes cannot open sharded safetensors.)"""
    cfg = tiny_config(num_heads=2, vocab_size=301)
    setup, params = random_params(cfg)
    hf.export_folder(cfg, params, "byte", tmp_path / "hf", shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    hf.export_folder(cfg, params, "byte", tmp_path / "one")
    from safetensors.numpy import load_file
    single = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert sorted(index) == sorted(single) and set(index.values()) == set(shards)
    for name, shard in index.items():
        np.testing.assert_array_equal(load_file(str(tmp_path / "hf" / shard))[name], single[name])
    gpt2_vocab(tmp_path / "hf")
    _, _, back = hf.read(tmp_path / "hf", base_config(), jax.devices()[:1])
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_imported_gpt2_decodes_with_the_cache_as_the_reference(tmp_path):
    """KV-cache decoding of an imported GPT-2 gives the reference's logits at every step
    (transformers' own cache)."""
    cfg = tiny_config(num_heads=2, vocab_size=301)
    setup, params = random_params(cfg)
    hf.export_folder(cfg, params, "byte", tmp_path / "hf")
    gpt2_vocab(tmp_path / "hf")
    _, setup_in, imported = hf.read(tmp_path / "hf", base_config(), jax.devices()[:1])
    ref = transformers.FlaxGPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"), from_pt=True)
    tokens, _ = tokens_and_types(cfg.model.vocab_size)
    prompt, steps = 5, 4
    past = ref.init_cache(2, cfg.model.max_len)
    mask = np.ones((2, cfg.model.max_len), np.int32)
    out = ref(tokens[:, :prompt], attention_mask=mask, past_key_values=past,
              position_ids=np.broadcast_to(np.arange(prompt), (2, prompt)))
    logits, cache = setup_in.model.apply({"params": imported}, jnp.asarray(tokens[:, :prompt]),
                                         decode=True, mutable=["cache"])
    np.testing.assert_allclose(logits, out.logits, atol=2e-5, rtol=0)
    past = out.past_key_values
    for t in range(prompt, prompt + steps):
        out = ref(tokens[:, t:t + 1], attention_mask=mask, past_key_values=past,
                  position_ids=np.full((2, 1), t))
        past = out.past_key_values
        logits, cache = setup_in.model.apply({"params": imported, **cache}, jnp.asarray(tokens[:, t:t + 1]),
                                             jnp.full((2, 1), t), decode=True, mutable=["cache"])
        np.testing.assert_allclose(logits, out.logits, atol=2e-5, rtol=0)


_FLOAT64 = textwrap.dedent("""
    import sys, pathlib
    sys.path.insert(0, sys.argv[2])
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np, transformers
    from conftest import tiny_config, tiny_bert_config
    from jaxlm.setup import build
    from jaxlm.interop import hf
    out = pathlib.Path(sys.argv[1])
    worst = {}
    for name, cfg, cls in (("gpt2", tiny_config(num_heads=2, vocab_size=301, dtype="float64",
                                                param_dtype="float64"), transformers.FlaxGPT2LMHeadModel),
                           ("bert", tiny_bert_config(num_heads=2, dtype="float64", param_dtype="float64"),
                            transformers.FlaxBertForMaskedLM)):
        setup = build(cfg, jax.devices()[:1])
        params = jax.jit(setup.init_params)(jax.random.PRNGKey(0))
        hf.export_folder(cfg, params, "byte", out / name, dtype=np.float64)
        ref = cls.from_pretrained(str(out / name), from_pt=True, dtype=jnp.float64)
        ref.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), ref.params)
        tokens = np.random.default_rng(0).integers(5, 258, (2, 24))
        ours = setup.model.apply({"params": params}, jnp.asarray(tokens))
        theirs = ref(tokens).logits
        assert ours.dtype == theirs.dtype == jnp.float64, (ours.dtype, theirs.dtype)
        worst[name] = float(jnp.max(jnp.abs(ours - theirs)))
        # the cache index under x64: decoding still matches the full pass
        if name == "gpt2":
            logits, cache = setup.model.apply({"params": params}, jnp.asarray(tokens[:, :5]), decode=True, mutable=["cache"])
            for t in range(5, 9):
                step, cache = setup.model.apply({"params": params, **cache}, jnp.asarray(tokens[:, t:t + 1]),
                                                jnp.full((2, 1), t), decode=True, mutable=["cache"])
                worst["gpt2_cache"] = max(worst.get("gpt2_cache", 0.0), float(jnp.max(jnp.abs(step[:, 0] - theirs[:, t]))))
    print(worst)
    assert max(worst.values()) < 1e-6, worst
""")


def test_float64_parity_within_1e_6(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _FLOAT64, str(tmp_path), str(REPO / "tests")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


# ----------------------------------------------------------------------------- BERT

BERT_SHAPES = {"two_heads_classes": dict(num_heads=2, num_classes=3),
               "odd_vocab": dict(vocab_size=263, num_classes=0)}


@pytest.mark.parametrize("shape", list(BERT_SHAPES))
def test_bert_export_opens_in_transformers_and_imports_back(tmp_path, shape):
    """MLM logits, pooled output and classification logits equal transformers'."""
    cfg = tiny_bert_config(**BERT_SHAPES[shape])
    setup, params = random_params(cfg)
    hf.export_folder(cfg, params, "byte:bert", tmp_path / "hf")
    tokens, types = tokens_and_types(cfg.model.vocab_size)
    kw = dict(token_type_ids=types, attention_mask=np.ones_like(tokens))
    apply = lambda output: setup.model.apply({"params": params}, jnp.asarray(tokens),  # noqa: E731
                                             types_BxL=jnp.asarray(types), output=output)
    mlm = transformers.FlaxBertForMaskedLM.from_pretrained(str(tmp_path / "hf"), from_pt=True)
    np.testing.assert_allclose(apply("logits"), mlm(tokens, **kw).logits, atol=2e-5, rtol=0)
    base = transformers.FlaxBertModel.from_pretrained(str(tmp_path / "hf"), from_pt=True)
    pooled = jnp.tanh(apply("hidden")[:, 0] @ params["pooler"]["kernel"] + params["pooler"]["bias"])
    np.testing.assert_allclose(pooled, base(tokens, **kw).pooler_output, atol=2e-5, rtol=0)
    if cfg.model.num_classes:
        cls = transformers.FlaxBertForSequenceClassification.from_pretrained(str(tmp_path / "hf"), from_pt=True)
        np.testing.assert_allclose(apply("classes"), cls(tokens, **kw).logits, atol=2e-5, rtol=0)
    wordpiece_vocab(tmp_path / "hf")
    cfg_in, _, back = hf.read(tmp_path / "hf", base_config(), jax.devices()[:1])
    assert cfg_in.model.num_classes == cfg.model.num_classes
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_bert_variants_of_real_uploads(tmp_path):
    """Old gamma/beta names, the position_ids buffer and the decoder copies are read; a
    BertForMaskedLM file (no pooler) gets a fresh pooler and the same encoder."""
    cfg = tiny_bert_config(num_classes=0)
    setup, params = random_params(cfg)
    hf.export_folder(cfg, params, "byte:bert", tmp_path / "hf")
    wordpiece_vocab(tmp_path / "hf")

    def variant(t):
        for k in list(t):
            if k.endswith("LayerNorm.weight"):
                t[k.replace(".weight", ".gamma")] = t.pop(k)
            elif k.endswith("LayerNorm.bias"):
                t[k.replace(".bias", ".beta")] = t.pop(k)
        for k in ("bert.pooler.dense.weight", "bert.pooler.dense.bias",
                  "cls.seq_relationship.weight", "cls.seq_relationship.bias"):
            del t[k]
        t["bert.embeddings.position_ids"] = np.arange(cfg.model.max_len)[None].astype(np.int64)
        t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"].copy()
        t["cls.predictions.decoder.bias"] = t["cls.predictions.bias"].copy()

    _rewrite(tmp_path / "hf", variant)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "hf" / "config.json").read_text()), "architectures": ["BertForMaskedLM"]}))
    _, _, back = hf.read(tmp_path / "hf", base_config(), jax.devices()[:1])
    for name in ("embed", "block_0", "block_1", "mlm_dense", "mlm_ln", "mlm_bias"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, back[name], params[name])
    assert back["pooler"]["kernel"].shape == params["pooler"]["kernel"].shape


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_import_places_each_tensor_into_its_sharding(tmp_path):
    """On 8 devices under FSDP every imported parameter lands split as the strategy says
    (each device holds 1/8 of the large ones), with the values of the file."""
    cfg = tiny_config(num_heads=2, vocab_size=304)
    setup, params = random_params(cfg)
    hf.export_folder(cfg, params, "byte", tmp_path / "hf")
    gpt2_vocab(tmp_path / "hf")
    base = base_config()
    base.mesh.update(strategy="fsdp", data=1, fsdp=8)
    _, setup8, back = hf.read(tmp_path / "hf", base)
    kernel = back["block_0"]["mlp"]["fc_in"]["kernel"]
    assert kernel.sharding == setup8.param_shardings["block_0"]["mlp"]["fc_in"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(32 // 8, 64)}
    table = back["embed"]["tokens"]["embedding"]
    assert max(s.data.size for s in table.addressable_shards) * 8 == table.size
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), back, params)


# ----------------------------------------------------------------------------- tokenizers

STRINGS = ["Hello world!", "the cat sat on the mat", "  leading and trailing  ", "tabs\tand\nnewlines\n\n",
           "naïve café Ünïcödé 日本語 🙂", "unaffable runningly", "a" * 300, "The Cat's 123,456.78",
           "multiple     spaces", "'s 've 're 'll 'd", ""]


def varied_strings(n=300):
    rng = np.random.default_rng(0)
    pieces = ["the", " cat", "sat", "on", " ", "  ", "\n", "Hello", "WORLD", "é", "ünï", "日本", "🙂",
              "123", ",", ".", "!", "'s", "un", "aff", "able", "running", "\t", "ß", "İ"]
    return STRINGS + ["".join(rng.choice(pieces, rng.integers(1, 12))) for _ in range(n - len(STRINGS))]


@pytest.mark.parametrize("padded", [False, True])
def test_gpt2_bpe_ids_equal_transformers(tmp_path, padded):
    """Also with a vocabulary padded past <|endoftext|> by unused tokens (as some uploads
    are, to a round size): loaded as transformers loads it, never produced by encoding."""
    gpt2_vocab(tmp_path)
    if padded:
        vocab = json.loads((tmp_path / "vocab.json").read_text())
        vocab.update({"<|pad0|>": 264, "Ġunused": 265})
        (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    ours = get_tokenizer(f"gpt2:{tmp_path}")
    theirs = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert ours.vocab_size == len(theirs) == (266 if padded else 264) and ours.eos_id == 263
    if padded:
        assert ours.decode([264, 265, 97]) == theirs.decode([264, 265, 97]) == "<|pad0|> unuseda"
    for text in varied_strings():
        assert ours.encode(text) == theirs.encode(text), repr(text)
        assert ours.decode(ours.encode(text)) == text
    # One deliberate difference: text never becomes a special token in jaxlm (Hugging Face
    # turns the characters "<|endoftext|>" into EOS).
    assert ours.eos_id not in ours.encode("<|endoftext|> is text")


@pytest.mark.parametrize("lower", [True, False])
def test_wordpiece_ids_equal_transformers(tmp_path, lower):
    wordpiece_vocab(tmp_path, lower)
    ours = get_tokenizer(f"wordpiece:{tmp_path}")
    theirs = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=lower)
    for text in varied_strings():
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), repr(text)
    assert ours.bert_ids == {"cls": 2, "sep": 3, "mask": 4} and ours.pad_id == 0
    assert ours.to_dict()["lowercase"] is lower


# ----------------------------------------------------------------------------- bad input

def _exported(tmp_path, **model):
    cfg = tiny_config(num_heads=2, vocab_size=301, **model)
    setup, params = random_params(cfg)
    hf.export_folder(cfg, params, "byte", tmp_path / "hf")
    gpt2_vocab(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), r"missing tensors \['transformer.h.1.mlp.c_fc.bias'\]"),
    (lambda t: t.update({"transformer.h.0.extra.weight": np.zeros(3, np.float32)}),
     r"unexpected tensors \['transformer.h.0.extra.weight'\]"),
    (lambda t: t.update({"transformer.wpe.weight": np.zeros((10, 32), np.float32)}),
     r"transformer.wpe.weight has shape \[10, 32\], the config needs \[64, 32\]"),
    (lambda t: t.update({"transformer.ln_f.bias": np.zeros(32, np.int32)}), "has dtype int32, not a float"),
])
def test_mismatched_checkpoints_are_refused_and_nothing_is_written(tmp_path, edit, message):
    folder = _exported(tmp_path)
    _rewrite(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        hf.import_folder(folder, tmp_path / "out", base_config())
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_other_architectures_pickles_and_truncated_files_are_refused(tmp_path):
    folder = _exported(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="architecture 'LlamaForCausalLM' is not one jaxlm has; "
                                              "it converts GPT2LMHeadModel"):
        hf.read(folder, base_config(), jax.devices()[:1])
    (folder / "config.json").write_text(json.dumps(config))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read|not a readable safetensors"):
        hf.read(folder, base_config(), jax.devices()[:1])
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is a pickle.*Convert it to safetensors"):
        hf.read(folder, base_config(), jax.devices()[:1])


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    folder = _exported(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    _rewrite(folder, lambda t: t.update({"transformer.wte.weight": t["transformer.wte.weight"][:200]}))
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    with pytest.raises(ConfigError, match="smaller than the gpt2 tokenizer's 264 ids"):
        hf.read(folder, base_config(), jax.devices()[:1])


# ----------------------------------------------------------------------------- commands

def test_import_then_evaluate_and_export_commands(tmp_path):
    """python -m jaxlm.interop import -> an export jaxlm.evaluate scores; export writes a
    folder transformers opens."""
    from jaxlm import cli
    from jaxlm.interop import __main__ as interop_main
    folder = _exported(tmp_path)
    cfg = cli.run(interop_main.main, ["import", f"--src={folder}", f"--out={tmp_path / 'jx'}"])
    assert (tmp_path / "jx" / "config.py").is_file() and cfg.model.num_heads == 2
    from jaxlm.config import load_config
    from jaxlm.evaluate import fewshot
    loaded = load_config(tmp_path / "jx" / "config.py")
    loaded.evaluate.update(params=str(tmp_path / "jx"), tasks=("rule_mc",), shots=(0,),
                           num_examples=4, num_samples=1, sample_len=8)
    out = fewshot.evaluate(loaded, tmp_path / "eval")
    assert out["tasks"]["rule_mc"]["num_examples"] == 4
    tokens, _ = tokens_and_types(301)
    first = transformers.FlaxGPT2LMHeadModel.from_pretrained(str(folder), from_pt=True)(tokens).logits
    # Self-contained: moved elsewhere, the import still loads (its own tokenizer files).
    shutil.rmtree(folder)  # the source of the import is gone
    (tmp_path / "jx").rename(tmp_path / "moved")
    moved = load_config(tmp_path / "moved" / "config.py")
    assert moved.data.tokenizer == f"gpt2:{(tmp_path / 'moved' / 'tokenizer').resolve()}"
    build(moved, jax.devices()[:1])
    cli.run(interop_main.main, ["export", f"--workdir={tmp_path / 'moved'}", f"--out={tmp_path / 'back'}"])
    ref = transformers.FlaxGPT2LMHeadModel.from_pretrained(str(tmp_path / "back"), from_pt=True)
    vocab = json.loads((tmp_path / "back" / "vocab.json").read_text())
    hf_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    # 264 tokens in a 301-row table: the special-token ids are the vocabulary's.
    assert hf_cfg["eos_token_id"] == hf_cfg["bos_token_id"] == vocab["<|endoftext|>"] == 263
    with pytest.raises(ConfigError, match=r"the folder .*nowhere does not exist"):
        interop_main.main(["export", f"--workdir={tmp_path / 'moved'}",
                           f"--out={tmp_path / 'nowhere' / 'hf'}"])
    np.testing.assert_array_equal(ref(tokens).logits, first)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_scanned_models_export_and_import_the_same_tensors(tmp_path, family):
    """A scanned model (config.model.scan_layers) writes the same Hugging Face tensors as
    the unrolled one, and a folder read into a scanned config holds the same parameters,
    stacked (models.stack_blocks)."""
    from jaxlm import models
    cfg = tiny_config(num_heads=2, vocab_size=301) if family == "gpt" else tiny_bert_config()
    _, params = random_params(cfg)
    stacked = models.stack_blocks(params, cfg.model.num_layers)
    scanned = cfg.copy_and_resolve_references()
    scanned.model.scan_layers = True
    spec = "byte" if family == "gpt" else "byte:bert"
    hf.export_folder(cfg, params, spec, tmp_path / "flat")
    hf.export_folder(scanned, stacked, spec, tmp_path / "scanned")
    from safetensors.numpy import load_file
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("flat", "scanned"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    if family == "gpt":
        gpt2_vocab(tmp_path / "flat")
    else:
        wordpiece_vocab(tmp_path / "flat")
    base = base_config() if family == "gpt" else tiny_bert_config()
    base.model.scan_layers = True
    got_cfg, _, back = hf.read(tmp_path / "flat", base, jax.devices()[:1])
    assert got_cfg.model.scan_layers and "blocks" in back
    jax.tree_util.tree_map(np.testing.assert_array_equal, models.unstack_blocks(back),
                           {k: v for k, v in params.items() if k in models.unstack_blocks(back)})
