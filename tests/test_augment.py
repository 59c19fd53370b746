"""Augmentation of labelled training examples (jaxlm.data.augment, config.finetune.augment):
each operation keeps the input layout (special tokens, token types, segments, padding),
draws are fixed by (seed, epoch, example) and differ across epochs, zero probabilities
give the unaugmented examples bitwise, an augmented fine-tuning run resumes exactly, and
bad settings are refused in one line naming the field, with nothing written."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import REPO
from test_bad_input import command
from test_finetune import ft_config
from test_main import tree_digest

from jaxlm import checkpoint
from jaxlm.config import base_config
from jaxlm.data import augment, labelled
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.runlog import read_history

BERT_TOK, GPT_TOK = get_tokenizer("byte:bert"), get_tokenizer("byte")
CLS, SEP, MASK = (BERT_TOK.bert_ids[k] for k in ("cls", "sep", "mask"))
EOS, PAD = BERT_TOK.eos_id, BERT_TOK.pad_id


def rates(**kw):
    c = base_config().finetune.augment
    c.update(**kw)
    return c


def pairs_data(n=24):
    """Sentence pairs of a few words each (the second text of a pair has its own span)."""
    words = "red green blue small tall quick dark bright old new".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 7)))) for _ in range(n)]
    pairs = [" ".join(rng.choice(words, int(rng.integers(1, 5)))) for _ in range(n)]
    return labelled.Labelled("pairs", texts, pairs, np.arange(n, dtype=np.int32) % 2,
                             [f"pairs example {i}" for i in range(n)])


def source(data, tok, seq_len=48, seed=0, **kw):
    enc = labelled.Encoder(tok, seq_len, pooled="mask" in tok.bert_ids)
    return labelled.LabelledSource(data, enc, seed, augment=rates(**kw) if kw else None)


# ----------------------------------------------------------------------------- operations


def test_each_operation_on_words():
    view = augment.Words(BERT_TOK)
    ids = np.asarray(BERT_TOK.encode("Bako lives  in Tesmor."), np.int32)
    words = view.split(ids)
    assert [BERT_TOK.decode(w) for w in words] == ["Bako", " lives", "  in", " Tesmor."]
    rng = np.random.default_rng(0)
    # delete: p = 1 leaves one word, without leading whitespace
    for seed in range(5):
        left = augment.delete(words, 1.0, np.random.default_rng(seed), view)
        assert len(left) == 1 and not BERT_TOK.decode(left[0])[0].isspace()
    # swap: the same bodies, whitespace in place
    swapped = augment.swap(words, 1.0, rng, view)
    text = BERT_TOK.decode(np.concatenate(swapped))
    assert sorted(text.split()) == sorted("Bako lives in Tesmor.".split()) and "  " in text
    # insert: only vocabulary words, after a word
    vocab = [np.asarray(BERT_TOK.encode(" zz"), np.int32)]
    grown = augment.insert(words, 1.0, rng, vocab)
    assert BERT_TOK.decode(np.concatenate(grown)) == "Bako zz lives zz  in zz Tesmor. zz"
    # mask: the same length, bodies masked, whitespace kept
    masked = np.concatenate(augment.mask(words, 1.0, rng, view, MASK))
    assert len(masked) == len(ids) and set(masked[ids == 32]) == {32}
    assert set(masked[ids != 32]) == {MASK}
    # p = 0 changes nothing (the augmenter does not even call an operation at 0)
    for op in (augment.delete, augment.swap):
        assert all(np.array_equal(a, b) for a, b in zip(op(words, 0.0, rng, view), words))
    assert np.array_equal(np.concatenate(augment.mask(words, 0.0, rng, view, MASK)), ids)


@pytest.mark.parametrize("tok", [BERT_TOK, GPT_TOK], ids=["bert", "gpt"])
def test_layout_special_tokens_types_and_padding_hold(tok):
    data = pairs_data()
    bert = tok is BERT_TOK
    kw = dict(delete=0.3, swap=0.3, insert=0.4) | (dict(mask=0.3) if bert else {})
    plain, aug = source(data, tok), source(data, tok, **kw)
    start, sep = (CLS, SEP) if bert else (EOS, EOS)
    changed = 0
    for i in range(3 * len(data)):
        e = aug.example(i)
        t, types, seg = e["tokens"], e["types"], e["segments"]
        n = int(seg.sum())
        assert t.shape == types.shape == seg.shape == (48,) and t.dtype == np.int32
        assert np.array_equal(seg, (np.arange(48) < n).astype(np.int32))
        assert (t[n:] == PAD).all() and t[0] == start
        seps = np.flatnonzero(t[:n] == sep)
        if bert:  # [CLS] a [SEP] b [SEP]
            assert list(seps) == [seps[0], n - 1] and len(seps) == 2
            assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:n] == 1).all()
        else:     # EOS a EOS b
            assert len(seps) == 2 and seps[0] == 0 and (types[:seps[1] + 1] == 0).all()
            assert (types[seps[1] + 1:n] == 1).all()
        text = t[1:n][~np.isin(t[1:n], [sep, MASK])]
        assert (text < 256).all(), "only text (and [MASK]) inside the spans"
        assert (types[n:] == 0).all() and e["label"] == plain.example(i)["label"]
        changed += not np.array_equal(t, plain.example(i)["tokens"])
    assert changed > len(data), "augmentation changed too few examples"


def test_each_text_of_a_pair_is_augmented_in_its_own_span():
    data = pairs_data()
    aug = source(data, BERT_TOK, delete=0.5)
    for i in range(2 * len(data)):
        e = aug.example(i)
        k = int(aug._perm[i // len(data)][i % len(data)])  # the example it reads
        t, types = e["tokens"], e["types"]
        a = t[(types == 0) & ~np.isin(t, [CLS, SEP])]
        b = t[(types == 1) & ~np.isin(t, [SEP, PAD])]
        for got, whole in zip((a, b), aug.parts[k]):  # words of its own text (as cut to fit)
            assert set(BERT_TOK.decode(got).split()) <= set(BERT_TOK.decode(whole).split())
            assert len(got) > 0


# ----------------------------------------------------------------------------- draws


def test_draws_are_fixed_by_seed_epoch_and_example_and_differ_across_epochs():
    data = pairs_data()
    kw = dict(delete=0.2, swap=0.2, insert=0.2, mask=0.2)
    a, b = source(data, BERT_TOK, **kw), source(data, BERT_TOK, **kw)
    N = len(data)
    forward = [a.example(i)["tokens"] for i in range(3 * N)]
    backward = [b.example(i)["tokens"] for i in reversed(range(3 * N))][::-1]  # any read order
    assert all(np.array_equal(x, y) for x, y in zip(forward, backward))
    assert a.fingerprint() == b.fingerprint()
    # the same example in two epochs: augmented differently (most of the time)
    def equal(k, e1, e2):
        x, y = a.augmenter(a.parts[k], e1, k), a.augmenter(a.parts[k], e2, k)
        return all(np.array_equal(p, q) for p, q in zip(x, y))
    assert all(equal(k, 0, 0) for k in range(N))
    same = sum(equal(k, 0, 1) for k in range(N))
    assert same < N // 3
    # another seed: other draws (and another epoch order)
    c = source(data, BERT_TOK, seed=1, **kw)
    assert any(not np.array_equal(c.augmenter(c.parts[k], 0, k)[0],
                                  a.augmenter(a.parts[k], 0, k)[0]) for k in range(N))
    # `examples`: that share of the examples is augmented, the rest read as they are
    half = source(data, BERT_TOK, delete=0.5, examples=0.5)
    touched = [half.augmenter(half.parts[k], e, k) is not None for e in range(4) for k in range(N)]
    assert 0.3 < np.mean(touched) < 0.7


def test_zero_probabilities_give_the_unaugmented_examples_bitwise():
    data = labelled.synthetic_facts("train").take(40)
    plain = source(data, BERT_TOK)
    for kw in (dict(delete=0.0), dict(delete=0.0, swap=0.0, insert=0.0, mask=0.0, examples=1.0),
               dict(delete=0.5, swap=0.5, examples=0.0)):
        zero = source(data, BERT_TOK, **kw)
        assert zero.augmenter is None and zero.fingerprint() == plain.fingerprint()
        for i in range(2 * len(data)):
            x, y = zero.example(i), plain.example(i)
            assert all(np.array_equal(x[k], y[k]) for k in x) and x.keys() == y.keys()
    # the settings are part of the fingerprint, so resuming with others is refused
    fps = {source(data, BERT_TOK, **kw).fingerprint()
           for kw in (dict(delete=0.1), dict(delete=0.2), dict(swap=0.1))}
    assert len(fps) == 3 and plain.fingerprint() not in fps


def test_a_tokenizer_without_mask_and_insertion_without_vocabulary_are_refused():
    with pytest.raises(ConfigError, match=r"^config.finetune.augment.mask=0.2: "
                                          r"config.data.tokenizer='byte' has no \[MASK\]"):
        source(pairs_data(), GPT_TOK, mask=0.2)
    one_word = labelled.Labelled("w", ["alpha", "beta"], None, np.asarray([0, 1], np.int32),
                                 ["w 0", "w 1"])
    with pytest.raises(ConfigError, match="augment.insert=0.1: the training texts have no "
                                          "second word"):
        source(one_word, BERT_TOK, insert=0.1)


# ----------------------------------------------------------------------------- the command


AUG = dict(delete=0.1, swap=0.1, insert=0.1, mask=0.15)


def run_finetune(cfg, workdir):
    from jaxlm import finetune
    return finetune.finetune(cfg, workdir)


def test_an_augmented_finetuning_run_resumes_exactly(tmp_path):
    """From random weights (what is resumed is the same as from a pretrained init): the
    straight run, then a copy cut back to step 8 and run again; losses, validation scores
    and the final params are equal bitwise. Other settings cannot resume it."""
    from jaxlm import finetune
    from jaxlm.setup import build
    cfg = ft_config(epochs=3)
    cfg.finetune.augment.update(**AUG)
    train, _ = finetune._sources(cfg, get_tokenizer(cfg.data.tokenizer))
    assert train.augmenter is not None and train.augmenter.rates["mask"] == 0.15
    run_finetune(cfg, tmp_path / "full")
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["finetune"]["augment"] == AUG | {"examples": 1.0}
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "12")
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln)["step"] <= 8]
    (tmp_path / "resumed" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    other = ft_config(epochs=3)
    other.finetune.augment.update(**AUG | dict(delete=0.2))
    before = tree_digest(tmp_path / "resumed")
    with pytest.raises(CheckpointError, match="was trained on other data"):
        run_finetune(other, tmp_path / "resumed")
    assert tree_digest(tmp_path / "resumed") == before
    run_finetune(cfg, tmp_path / "resumed")
    a, b = read_history(tmp_path / "full"), read_history(tmp_path / "resumed")
    assert [h["step"] for h in a] == [h["step"] for h in b]
    assert [h.get("loss") for h in a] == [h.get("loss") for h in b]
    assert [h.get("validation_accuracy") for h in a] == [h.get("validation_accuracy") for h in b]
    run = finetune.run_config(cfg, 32)
    setup = build(run, jax.devices()[:1])
    pa, sa = checkpoint.load_params(run, setup, tmp_path / "full")
    pb, sb = checkpoint.load_params(run, setup, tmp_path / "resumed")
    assert sa == sb == 12
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))


@pytest.mark.parametrize("config, flag, match", [
    ("bert/facts.py", "--config.finetune.augment.delete=1.5",
     "config.finetune.augment.delete=1.5 must be in [0, 1]"),
    ("bert/facts.py", "--config.finetune.augment.swap=-0.1",
     "config.finetune.augment.swap=-0.1 must be in [0, 1]"),
    ("bert/facts.py", "--config.finetune.augment.examples=2",
     "config.finetune.augment.examples=2.0 must be in [0, 1]"),
    ("gpt/debug.py", "--config.finetune.augment.mask=0.2",
     "config.finetune.augment.mask=0.2: config.data.tokenizer='byte' has no [MASK] token"),
])
def test_bad_settings_are_one_line_naming_the_field_and_write_nothing(tmp_path, config, flag,
                                                                      match):
    (tmp_path / "ft").mkdir()
    code, errors = command("finetune", f"--config={REPO}/configs/{config}",
                           f"--workdir={tmp_path / 'ft'}", "--config.model.num_classes=2", flag)
    assert code == 2 and len(errors) == 1 and match in errors[0], (code, errors)
    assert tree_digest(tmp_path / "ft") == {}
