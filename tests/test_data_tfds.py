"""TFDS datasets offline: a local corpus through jaxlm's text builder, tiny Shakespeare
prepared from shared/data (manual_dir), the token cache, and every bad-input error."""

import json

import numpy as np
import pytest
from conftest import tiny_config
from data_helpers import (lm_batch, lm_example, memory_cache, require_shakespeare,
                          require_tensorflow)

from jaxlm.data import sources, text_dataset, text_files, token_cache
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import ConfigError, DataError

TOK = ByteTokenizer()
PARAGRAPHS = ["First paragraph,\ntwo lines.\n", "Second one.\n", "Third: ünïcödé.\n"]
RECORDS = [{"text": "a json document"}, {"text": ""}, {"text": "another, longer json document"}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Local files prepared as TFDS dataset `my_corpus` (train: 3 paragraphs + 3 JSONL
    lines, one of them empty; validation: one file)."""
    require_tensorflow()
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text("\n\n".join(p.rstrip("\n") for p in PARAGRAPHS) + "\n\n\n")
    (d / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n")
    (d / "c.txt").write_text("held out text\n")
    counts = text_dataset.prepare_text("my_corpus", {"train": [str(d / "a.txt"), str(d / "b.jsonl")],
                                                "validation": [str(d / "c.txt")]},
                                  str(d / "tfds"), unit="paragraph")
    assert counts == {"train": 6, "validation": 1}
    return d


def data_cfg(corpus, **kw):
    cfg = tiny_config()
    cfg.data.update(name="my_corpus", data_dir=str(corpus / "tfds"), seq_len=16)
    cfg.data.update(**kw)
    return cfg


def test_local_corpus_round_trips_through_tfds_and_the_token_cache(corpus):
    src = sources.make_source(data_cfg(corpus, packing=True).data, TOK)
    stats = src.stats()
    assert (stats["documents"], stats["empty_documents"]) == (5, 1)
    expected = PARAGRAPHS + [r["text"] for r in RECORDS if r["text"]]
    assert stats["tokens"] == sum(len(x.encode()) for x in expected)
    cache = src.cache
    docs = [TOK.decode(cache.tokens[a + 1:b]) for a, b in zip(cache.doc_starts, cache.doc_starts[1:])]
    assert sorted(docs) == sorted(expected)  # TFDS fixes its own (deterministic) order
    assert cache.path.parent == corpus / "tfds" / "jaxlm_tokens"
    assert not list(cache.path.parent.glob(".tmp-*"))
    val = sources.make_source(data_cfg(corpus, split="validation", seq_len=8).data, TOK)
    assert val.stats()["documents"] == 1 and val.cache.path != cache.path


def test_cache_is_built_once_and_keyed_by_tokenizer(corpus):
    cfg = data_cfg(corpus)
    a = sources.make_source(cfg.data, TOK)
    stamp = (a.cache.path / "tokens.bin").stat().st_mtime_ns
    b = sources.make_source(cfg.data, TOK)
    assert b.cache.path == a.cache.path
    assert (b.cache.path / "tokens.bin").stat().st_mtime_ns == stamp  # reused, not rebuilt

    class OtherByte(ByteTokenizer):
        name = "other_byte"
    c = sources.make_source(cfg.data, OtherByte())
    assert c.cache.path != a.cache.path
    np.testing.assert_array_equal(c.cache.tokens, a.cache.tokens)


def test_packed_mixture_of_a_tfds_corpus_and_synthetic_trains(corpus):
    import jax

    from jaxlm.train.build import build_train
    cfg = data_cfg(corpus, name="mixture", mixture=("my_corpus=1", "synthetic=3"),
                   mixture_block=8, packing=True)
    src = sources.make_source(cfg.data, TOK)
    assert [c["per_block"] for c in src.stats()["components"]] == [2, 6]
    run = build_train(cfg, jax.devices()[:1])
    state = run.place_state(run.init_state())
    spec = run.objective.batch_spec(cfg.train.batch_size)
    for step in range(2):
        batch = lm_batch(src, step, cfg.train.batch_size, cfg.model.vocab_size, packed=True)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == \
            {k: (v.shape, v.dtype) for k, v in spec.items()}   # synthetic rows: one segment
        state, metrics = run(state, run.place_batch(batch), jax.random.PRNGKey(0))
        assert np.isfinite(float(metrics["loss"]))


@pytest.mark.skipif(__import__("jax").device_count() != 8, reason="needs 8 (fake) devices")
def test_packed_mixture_resumes_elastically(corpus, tmp_path):
    """A packed mixture run resumed on 2 devices (from 8) sees the samples, hence the
    losses, of the uninterrupted run: the data position is one global sample index."""
    import jax

    from jaxlm.runlog import read_history
    from jaxlm.train import loop
    cfg = data_cfg(corpus, name="mixture", mixture=("my_corpus=1", "synthetic=3"),
                   mixture_block=8, packing=True)
    cfg.train.update(steps=4, log_every=1)
    cfg.checkpoint.every = 2
    loop.train(cfg, tmp_path / "full")
    cfg.train.steps = 2
    loop.train(cfg, tmp_path / "elastic")
    cfg.train.steps = 4
    loop.train(cfg, tmp_path / "elastic", jax.devices()[:2])
    a, b = read_history(tmp_path / "full"), read_history(tmp_path / "elastic")
    assert [h["step"] for h in a] == [h["step"] for h in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["loss"] for h in a], [h["loss"] for h in b], rtol=1e-5)


def test_tiny_shakespeare_prepared_offline_from_manual_dir(tmp_path):
    require_tensorflow()
    manual = require_shakespeare()
    cfg = tiny_config()
    cfg.data.update(name="tiny_shakespeare", data_dir=str(tmp_path / "tfds"),
                    manual_dir=str(manual), seq_len=64)
    src = sources.make_source(cfg.data, TOK)
    stats = src.stats()
    assert (stats["documents"], stats["tokens"]) == (1, 1_003_854)  # TFDS's 90% train split
    assert src.cache.tokens[0] == TOK.eos_id
    assert TOK.decode(src.cache.tokens[1:16]) == "First Citizen:\n"
    assert stats["sequences_per_epoch"] == 1_003_854 // 64
    ex = lm_example(src, 0)
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,value,match", [
    ("name", "no_such_dataset_xyz", r"config.data.name='no_such_dataset_xyz': no TFDS dataset"),
    ("split", "nope", r"config.data.split='nope': my_corpus has splits \['train', 'validation'\]"),
    ("text_key", "body", r"config.data.text_key='body': my_corpus has features \['text'\]"),
    ("name", "tiny_shakespeare", r"config.data.name='tiny_shakespeare' is not prepared"),
])
def test_bad_dataset_fields_name_the_field(corpus, field, value, match):
    with pytest.raises(ConfigError, match=match):
        sources.make_source(data_cfg(corpus, **{field: value}).data, TOK)


def test_missing_data_dir_and_manual_dir(tmp_path):
    cfg = tiny_config()
    cfg.data.update(name="tiny_shakespeare", data_dir=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"config.data.data_dir='.*absent' does not exist"):
        sources.make_source(cfg.data, TOK)
    require_tensorflow()
    cfg.data.manual_dir = str(tmp_path / "no_files_here")
    with pytest.raises(ConfigError, match=r"config.data.manual_dir='.*no_files_here': no such"):
        sources.make_source(cfg.data, TOK)


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"  \n", r"empty.txt: the file is empty"),
    ("latin1.txt", b"ok line\nna\xefve caf\xe9\n", r"latin1.txt:2: not UTF-8 \(byte 0xef\)"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": broken}\n', r"bad.jsonl:2: not valid JSON"),
    ("nokey.jsonl", b'{"text": "fine"}\n{"body": "x"}\n', r"nokey.jsonl:2: no string field 'text'"),
])
def test_bad_local_files_are_named_with_their_line(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        text_files.read_text_file(tmp_path / name, "file")


def test_preparing_other_files_under_an_existing_name_is_refused(corpus, tmp_path):
    (tmp_path / "new.txt").write_text("different text\n")
    with pytest.raises(ConfigError, match="already holds a dataset 'my_corpus'"):
        text_dataset.prepare_text("my_corpus", {"train": [str(tmp_path / "new.txt")]},
                             str(corpus / "tfds"))


def test_split_with_no_text_is_an_error(tmp_path):
    require_tensorflow()
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    text_dataset.prepare_text("blank_corpus", {"train": [str(tmp_path / "blank.jsonl")]},
                         str(tmp_path / "tfds"))
    cfg = tiny_config()
    cfg.data.update(name="blank_corpus", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(DataError, match=r"holds no text \(1 empty documents\)"):
        sources.make_source(cfg.data, TOK)


def test_default_cache_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert token_cache.cache_root("", "") == tmp_path / "jaxlm_tokens"
    assert token_cache.cache_root("", "gs://bucket/tfds").name == "tokens"
    assert token_cache.cache_root(str(tmp_path / "c"), "gs://b") == tmp_path / "c"


def test_shakespeare_paragraphs_as_documents():
    paragraphs = text_files.read_text_file(require_shakespeare() / "input.txt", "paragraph")
    assert len(paragraphs) > 7000 and paragraphs[0].startswith("First Citizen:\nBefore we proceed")
    assert all(p.endswith("\n") and "\n\n" not in p for p in paragraphs)
    src = sources.TokenSource(memory_cache(paragraphs[:400], TOK), TOK, 128, True, 0)
    assert src.stats()["padding_fraction"] < 0.5
