"""Weighted mixtures: exact per-block proportions, O(1) random access that agrees with
reading in order, every component example used once, and config errors."""

import numpy as np
import pytest
from conftest import tiny_config
from data_helpers import lm_batch, memory_cache

from jaxlm.config import apply_override, validate
from jaxlm.data import sources
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import ConfigError

TOK = ByteTokenizer()


def token_source(letter: str, seed: int = 0) -> sources.TokenSource:
    docs = [letter * n for n in range(1, 30)]
    return sources.TokenSource(memory_cache(docs, TOK, name=letter), TOK, 8, False, seed)


def mixture(weights=(0.7, 0.2, 0.1), block=20, seed=0) -> sources.MixtureSource:
    parts = [token_source(c) for c in "abc"][:len(weights)]
    return sources.MixtureSource(parts, list(weights), block, seed)


def test_each_block_has_exact_counts():
    mix = mixture()
    assert mix.counts.tolist() == [14, 4, 2]
    for b in range(5):
        got = [mix.locate(b * 20 + s)[0] for s in range(20)]
        assert np.bincount(got).tolist() == [14, 4, 2]
    # largest remainders: 1/3 each of 10 -> 4, 3, 3
    assert sources.MixtureSource([token_source("a")] * 3, [1, 1, 1], 10, 0).counts.tolist() == [4, 3, 3]


def test_random_access_agrees_with_reading_in_order_and_uses_each_example_once():
    mix = mixture()
    seq = [mix.locate(i) for i in range(200)]
    fresh = mixture()
    for i in [199, 3, 150, 77, 0, 120]:  # any order, cold caches
        assert fresh.locate(i) == seq[i]
    for d in range(3):
        ns = [n for dd, n in seq if dd == d]
        assert sorted(ns) == list(range(len(ns)))  # component examples 0, 1, 2, ... once each
    ex = mix.example(57)
    d, n = mix.locate(57)
    np.testing.assert_array_equal(ex["tokens"], mix.sources[d].example(n)["tokens"])
    assert chr(int(ex["tokens"][ex["tokens"] != TOK.eos_id][0])) == "abc"[d]


def test_seed_changes_the_order_not_the_counts():
    a, b = mixture(seed=0), mixture(seed=1)
    assert [a.locate(i)[0] for i in range(20)] != [b.locate(i)[0] for i in range(20)]
    assert np.bincount([b.locate(i)[0] for i in range(20)]).tolist() == [14, 4, 2]


def test_weight_too_small_for_the_block_is_an_error():
    with pytest.raises(ConfigError, match="config.data.mixture_block=20"):
        mixture(weights=(0.98, 0.01, 0.01))


def test_mixture_config_from_the_command_line(cfg):
    apply_override(cfg, "data.name", "mixture")
    apply_override(cfg, "data.mixture", "synthetic=0.25,synthetic=0.75")
    assert cfg.data.mixture == ("synthetic=0.25", "synthetic=0.75")
    validate(cfg)
    src = sources.make_source(cfg.data, TOK)
    assert src.counts.tolist() == [250, 750]
    batch = lm_batch(src, 0, 4, TOK.vocab_size)
    assert batch["inputs"].shape == (4, cfg.data.seq_len)
    assert "mixture of 2" in sources.describe(src, 0, 100)


@pytest.mark.parametrize("entries,match", [(("synthetic",), "expected NAME=WEIGHT"),
                                           (("synthetic=-1",), "positive weight"),
                                           (("=1",), "expected NAME=WEIGHT")])
def test_bad_mixture_entries(entries, match):
    cfg = tiny_config()
    cfg.data.update(name="mixture", mixture=entries)
    with pytest.raises(ConfigError, match=match):
        sources.make_source(cfg.data, TOK)


def test_mixture_without_entries_fails_validation():
    cfg = tiny_config()
    cfg.data.name = "mixture"
    with pytest.raises(ConfigError, match="config.data.mixture"):
        validate(cfg)
