"""BERT: the encoder (shapes, published sizes, bidirectionality, padding), masked-LM
masking statistics, MLM pretraining through the same loop (learning, exact resume), the
classification head, and the checks that refuse what cannot work."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, fresh_step, tiny_bert_config

from jaxlm import config, models
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.models.bert import BERT
from jaxlm.runlog import read_history
from jaxlm.train import loop
from jaxlm.train.objectives import MaskedLM

TOK = get_tokenizer("byte:bert")


def tiny_bert(**model):
    return tiny_bert_config(**model)


def init(cfg_model, L=16):
    model = BERT(cfg_model)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32))["params"])
    return model, params


def tokens(B, L, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, L)), jnp.int32)


@pytest.mark.parametrize("size,millions", [("base", 110), ("large", 340)])
def test_published_sizes(size, millions):
    cfg = config.load_config(REPO / f"configs/bert/bert_{size}.py")
    assert (cfg.model.vocab_size, cfg.model.max_len, cfg.model.type_vocab_size) == (30522, 512, 2)
    assert (cfg.model.norm_position, cfg.model.activation, cfg.model.layer_norm_eps) == ("post", "gelu", 1e-12)
    shapes = jax.eval_shape(BERT(cfg.model).init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 8), "int32"))
    n = models.count_params(shapes["params"]) / 1e6
    assert abs(n - millions) / millions < 0.015, f"{size}: {n:.1f}M parameters"


def test_heads_shapes_and_names():
    cfg = tiny_bert(num_classes=3).model
    model, params = init(cfg)
    x = tokens(2, 16)
    assert model.apply({"params": params}, x).shape == (2, 16, cfg.vocab_size)
    assert model.apply({"params": params}, x, output="hidden").shape == (2, 16, 32)
    assert model.apply({"params": params}, x, output="classes").shape == (2, 3)
    assert {"embed", "ln_embed", "mlm_dense", "mlm_ln", "mlm_bias", "pooler", "classifier"} <= set(params)
    assert "types" in params["embed"] and "ln_attn" in models.block_params(params, 0)


def test_bidirectional_a_later_token_changes_earlier_outputs():
    """The opposite of GPT's causality test (test_model.py)."""
    model, params = init(tiny_bert().model)
    a = tokens(2, 16, seed=1)
    b = a.at[:, 12].set((a[:, 12] + 1) % 256)
    ha, hb = (model.apply({"params": params}, t, output="hidden") for t in (a, b))
    assert not np.allclose(ha[:, :12], hb[:, :12], atol=1e-6)


def test_extra_padding_never_changes_real_positions():
    model, params = init(tiny_bert().model, L=24)
    x = tokens(2, 10, seed=2)
    segments = jnp.ones((2, 10), jnp.int32)
    short = model.apply({"params": params}, x, None, segments, output="hidden")
    padded = jnp.concatenate([x, jnp.full((2, 14), TOK.pad_id, jnp.int32)], axis=1)
    seg24 = jnp.concatenate([segments, jnp.zeros((2, 14), jnp.int32)], axis=1)
    long = model.apply({"params": params}, padded, None, seg24, output="hidden")
    np.testing.assert_allclose(long[:, :10], short, atol=1e-5)


def test_token_types_matter():
    model, params = init(tiny_bert().model)
    x = tokens(1, 16)
    a = model.apply({"params": params}, x, output="hidden")
    b = model.apply({"params": params}, x, types_BxL=jnp.ones_like(x), output="hidden")
    assert not np.allclose(a, b)


# ----------------------------------------------------------------------------- masking


def _windows(n, L=128, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = rng.integers(97, 123, L).astype(np.int32)       # letters...
        t[rng.random(L) < 0.2] = 32                          # ...in words between spaces
        t[0], t[60] = TOK.eos_id, TOK.bert_ids["sep"]        # specials are never chosen
        out.append({"tokens": t})
    return out


def test_masking_statistics_over_many_draws():
    mlm = MaskedLM(128, False, TOK, seed=0)
    chosen = masked = random = kept = 0
    for i, w in enumerate(_windows(400)):
        ex = mlm.example(w, i)
        pos = np.flatnonzero(ex["weights"])
        real = 128 - 2
        assert len(pos) == round(0.15 * real)                        # 15% of the real tokens
        assert not set(pos) & {0, 60}                                # never a special one
        bert = w["tokens"].copy()        # BERT's format: [CLS] first, EOS -> [SEP]
        bert[0] = TOK.bert_ids["cls"]
        np.testing.assert_array_equal(ex["targets"], bert)            # targets: the originals
        np.testing.assert_array_equal(np.delete(ex["inputs"], pos), np.delete(bert, pos))
        chosen += len(pos)
        masked += int(np.sum(ex["inputs"][pos] == TOK.bert_ids["mask"]))
        same = ex["inputs"][pos] == bert[pos]
        kept += int(np.sum(same))
        random += int(np.sum(~same & (ex["inputs"][pos] != TOK.bert_ids["mask"])))
    # 80 / 10 / 10 within 3 standard errors (a random replacement equal to the original
    # counts as kept: 1 in 256 of the 10%)
    for share, want in ((masked, 0.8), (random, 0.1 * 255 / 256), (kept, 0.1 + 0.1 / 256)):
        se = (want * (1 - want) / chosen) ** 0.5
        assert abs(share / chosen - want) < 3 * se, (share / chosen, want)


def test_masking_is_a_function_of_seed_and_index():
    w = _windows(1)[0]
    a, b, c = MaskedLM(128, False, TOK, 0), MaskedLM(128, False, TOK, 0), MaskedLM(128, False, TOK, 1)
    np.testing.assert_array_equal(a.example(w, 7)["inputs"], b.example(w, 7)["inputs"])
    assert not np.array_equal(a.example(w, 7)["weights"], a.example(w, 8)["weights"])
    assert not np.array_equal(a.example(w, 7)["weights"], c.example(w, 7)["weights"])


def test_whole_word_masking_takes_whole_words():
    mlm = MaskedLM(128, False, TOK, seed=0, whole_word=True)
    for i, w in enumerate(_windows(50)):
        t, pos = w["tokens"], set(np.flatnonzero(mlm.example(w, i)["weights"]).tolist())
        word_starts = [0] + [j for j in range(1, 128) if t[j] == 32 or t[j - 1] == 32
                             or t[j - 1] in (TOK.eos_id, TOK.bert_ids["sep"])]
        bounds = word_starts + [128]
        for a, b in zip(bounds, bounds[1:]):
            hit = {j for j in range(a, b)} & pos
            assert not hit or hit == {j for j in range(a, b) if t[j] not in (TOK.eos_id, TOK.bert_ids["sep"])}


def test_sentence_pairs_and_next_sentence_labels():
    """[CLS] A [SEP] B [SEP] cut at a random point, types 0 then 1; B is the window's own
    continuation (label 0) or the same stretch of another example (label 1), about half
    the time each; masking never touches the added [SEP]s; all a function of (seed, index)."""
    L, windows = 128, _windows(300)
    read_calls = []

    def read(j):
        read_calls.append(j)
        return windows[j % len(windows)]

    mlm = MaskedLM(L, False, TOK, seed=0, sentence_pairs=True, next_sentence=True)
    cls, sep = TOK.bert_ids["cls"], TOK.bert_ids["sep"]
    labels, cuts = [], set()
    for i, w in enumerate(windows):
        read_calls.clear()
        ex = mlm.example(w, i, read)
        types, t = ex["types"], ex["targets"]
        cut = int(np.argmax(types)) - 2                    # A = body[:cut]
        cuts.add(cut)
        assert types[0] == 0 and np.all(types[cut + 2:] == 1) and np.all(types[:cut + 2] == 0)
        assert t[0] == cls and t[cut + 1] == sep and t[-1] == sep
        body = w["tokens"][1:L - 2].copy()
        body[body == TOK.eos_id] = sep
        np.testing.assert_array_equal(t[1:cut + 1], body[:cut])
        label = int(ex["next_sentence"])
        if label == 0:
            assert read_calls == []
            np.testing.assert_array_equal(t[cut + 2:L - 1], body[cut:])
        else:
            assert len(read_calls) == 1 and 0 < read_calls[0] - i <= 1024
            other = windows[read_calls[0] % len(windows)]["tokens"][1:L - 2].copy()
            other[other == TOK.eos_id] = sep
            np.testing.assert_array_equal(t[cut + 2:L - 1], other[cut:])
        assert not set(np.flatnonzero(ex["weights"])) & {0, cut + 1, L - 1}
        labels.append(label)
        again = mlm.example(w, i, read)
        for k in ex:
            np.testing.assert_array_equal(ex[k], again[k])
    assert abs(np.mean(labels) - 0.5) < 3 * (0.25 / len(labels)) ** 0.5
    assert len(cuts) > 50                                    # cut points spread over the window
    pairs_only = MaskedLM(L, False, TOK, seed=0, sentence_pairs=True)
    assert "next_sentence" not in pairs_only.example(windows[0], 0)
    assert set(pairs_only.batch_spec(4)) == {"inputs", "targets", "weights", "types"}


def test_sentence_pair_settings_are_checked():
    with pytest.raises(ConfigError, match="next_sentence=True needs config.train.sentence_pairs"):
        MaskedLM(128, False, TOK, 0, next_sentence=True)
    with pytest.raises(ConfigError, match="sentence_pairs=True needs config.data.packing=False"):
        MaskedLM(128, True, TOK, 0, sentence_pairs=True)


def test_a_tokenizer_without_bert_ids_is_refused():
    cfg = tiny_bert()
    cfg.data.tokenizer = "byte"
    with pytest.raises(ConfigError, match="'byte' has no cls, mask, sep token"):
        fresh_step(cfg, jax.devices()[:1])
    cfg = tiny_bert()
    cfg.train.objective = "causal_lm"
    with pytest.raises(ConfigError, match="does not fit config.model.arch='bert'"):
        fresh_step(cfg, jax.devices()[:1])


# ----------------------------------------------------------------------------- training


def test_mlm_pretraining_learns_and_resumes_exactly(tmp_path):
    """Through the same loop as GPT: masked accuracy rises; a run resumed from step 6
    logs bitwise the losses of the uninterrupted one (masks come from seed and index)."""
    cfg = tiny_bert()
    cfg.train.update(steps=12, log_every=2)
    cfg.checkpoint.every = 6
    loop.train(cfg, tmp_path / "full", jax.devices()[:1])
    cfg.train.steps = 6
    loop.train(cfg, tmp_path / "resumed", jax.devices()[:1])
    cfg.train.steps = 12
    loop.train(cfg, tmp_path / "resumed", jax.devices()[:1])
    full, resumed = read_history(tmp_path / "full"), read_history(tmp_path / "resumed")
    assert [h["loss"] for h in full] == [h["loss"] for h in resumed]
    assert full[-1]["loss"] < full[0]["loss"] - 0.5
    assert full[-1]["accuracy"] > full[0]["accuracy"]


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_classification_head_overfits_a_tiny_set(arch):
    from conftest import tiny_config
    cfg = tiny_bert(num_classes=3) if arch == "bert" else tiny_config(num_classes=3)
    cfg.train.update(objective="classification", steps=60)
    cfg.optimizer.update(warmup_steps=5, weight_decay=0.0)
    state, run = fresh_step(cfg, jax.devices()[:1])
    rng = np.random.default_rng(0)
    L = cfg.data.seq_len
    records = []
    for i in range(8):
        n = int(rng.integers(8, L))
        segments = (np.arange(L) < n).astype(np.int32)
        records.append({"tokens": np.where(segments, rng.integers(0, 256, L), TOK.pad_id),
                        "types": np.zeros(L, np.int32), "segments": segments, "label": i % 3})
    rows = [run.objective.example(r, i) for i, r in enumerate(records)]
    batch = run.place_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    for _ in range(60):
        state, m = run(state, batch, jax.random.PRNGKey(0))
    assert float(m["accuracy"]) == 1.0 and float(m["loss"]) < 0.1
