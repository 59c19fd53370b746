"""Token-stream examples: concatenated windows, packing with segments and positions,
parity of packed and lone documents, determinism, per-process rows, exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from data_helpers import memory_cache

from jaxlm.config import ConfigError
from jaxlm.data import lm
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.models.gpt import GPT

TOK = ByteTokenizer()
# 0..40 bytes: several share a sequence of 16; three are longer (40, 23, 16 bytes + EOS).
DOCS = ["abc", "hello world", "", "x" * 40, "the quick brown", "fox", "jumps over the lazy dog",
        "é ü", "q" * 15, "r" * 16, "end."]


def source(packing: bool, seq_len: int = 16, seed: int = 0, docs=DOCS) -> lm.TokenSource:
    return lm.TokenSource(memory_cache(docs, TOK), TOK, seq_len, packing, seed)


def stream(docs=DOCS) -> np.ndarray:
    return np.asarray(memory_cache(docs, TOK).tokens, np.int32)


def test_concat_windows_tile_the_stream_and_each_epoch_is_a_permutation():
    src, s = source(False), stream()
    W, L = src.num_windows, src.seq_len
    assert W == (len(s) - 1) // L
    assert src.stats()["unused_pairs_per_epoch"] == (len(s) - 1) % L
    seen = [src.window(i) for i in range(W)]
    assert sorted(seen) == list(range(W))
    assert [src.window(W + i) for i in range(W)] != seen  # epoch 1 has another order
    for i in range(2 * W):
        ex, w = src.example(i), src.window(i)
        np.testing.assert_array_equal(ex["inputs"], s[w * L:(w + 1) * L])
        np.testing.assert_array_equal(ex["targets"], s[w * L + 1:(w + 1) * L + 1])
        assert ex["weights"].sum() == L and "segments" not in ex


def test_packing_keeps_documents_whole_with_segments_positions_and_padding():
    src = source(True)
    L, starts = src.seq_len, memory_cache(DOCS, TOK).doc_starts
    lone = {}  # document (or piece) inputs, keyed by its tokens, to find each exactly once
    for d in range(len(starts) - 1):
        doc = stream()[starts[d]:starts[d + 1] + 1]
        for p in range(0, len(doc) - 1, L):
            piece = doc[p:p + L + 1]
            lone[tuple(piece[:-1])] = tuple(piece[1:])
    found = []
    for w in range(src.num_windows):
        ex = src.example(w)
        segs, pos, n = ex["segments"], ex["positions"], int(ex["weights"].sum())
        assert np.all(segs[:n] > 0) and np.all(segs[n:] == 0)         # padding only at the end
        assert np.all(ex["weights"][n:] == 0) and np.all(ex["inputs"][n:] == TOK.pad_id)
        for k in range(1, segs.max() + 1):
            idx = np.flatnonzero(segs == k)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart at 0
            found.append(tuple(ex["inputs"][idx]))
            assert lone[found[-1]] == tuple(ex["targets"][idx])
    assert sorted(found) == sorted(lone)  # every document / piece exactly once per epoch
    stats = src.stats()
    assert stats["long_documents"] == 3 and stats["empty_documents"] == 1
    assert stats["unused_pairs_per_epoch"] == 0 and 0 < stats["padding_fraction"] < 1


def test_pack_windows_next_fit():
    # documents of 3, 5, 9 and 2 pairs into windows of 8: [3+5], [8 of the 9], [1+2]
    bounds, long_docs = lm.pack_windows(np.array([0, 3, 8, 17, 19]), 8)
    assert bounds.tolist() == [0, 8, 16, 19] and long_docs == 1


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_documents_get_the_same_logits_as_alone(position):
    cfg = tiny_config(position=position)
    src = source(True, seq_len=32, docs=DOCS[:3] + DOCS[4:])  # no document cut
    model = GPT(cfg.model)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"]
    apply = jax.jit(lambda *args: model.apply({"params": params}, *args))
    batch = lm.local_batch(src, 0, src.num_windows, TOK.vocab_size)
    packed = apply(batch["inputs"], batch["positions"], batch["segments"])
    # Each document alone: [EOS doc] from position 0, no segments. Causal attention means
    # the padding after it cannot change its logits, so all go through one call.
    spans = [(r, np.flatnonzero(batch["segments"][r] == k))
             for r in range(len(batch["inputs"])) for k in range(1, batch["segments"][r].max() + 1)]
    alone_in = np.full((len(spans), 32), TOK.pad_id, np.int32)
    for i, (r, idx) in enumerate(spans):
        alone_in[i, :len(idx)] = batch["inputs"][r, idx]
    alone = apply(alone_in, None, None)
    for i, (r, idx) in enumerate(spans):
        np.testing.assert_allclose(packed[r, idx], alone[i, :len(idx)], atol=2e-5, rtol=2e-5)
    assert len(spans) == 9
    unmasked = apply(batch["inputs"], None, None)  # without segments documents see each other
    assert not np.allclose(unmasked, packed, atol=1e-3)


def test_same_seed_same_examples_other_seed_other_order():
    a, b, c = source(True, seed=3), source(True, seed=3), source(True, seed=4)
    for i in range(20):
        for k, v in a.example(i).items():
            np.testing.assert_array_equal(v, b.example(i)[k])
    assert [a.window(i) for i in range(8)] != [c.window(i) for i in range(8)]


@pytest.mark.parametrize("packing", [False, True])
def test_process_rows_cover_the_global_batch_exactly_once(packing):
    src = source(packing)
    whole = lm.local_batch(src, 5, 8, TOK.vocab_size)
    for count in (2, 4, 8):
        parts = [lm.local_batch(src, 5, 8, TOK.vocab_size, p, count) for p in range(count)]
        for k, v in whole.items():
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)


def test_resuming_at_a_step_equals_continuing():
    src, B = source(True), 4
    ident = lambda b: b
    run = lm.Batches(src, 0, B, TOK.vocab_size, ident, prefetch=2)
    straight = [next(run) for _ in range(9)]
    run.close()
    resumed = lm.Batches(src, 6, B, TOK.vocab_size, ident, prefetch=1)
    for step in range(6, 9):
        got = next(resumed)
        for k, v in straight[step].items():
            np.testing.assert_array_equal(got[k], v)
    resumed.close()


def test_token_beyond_model_vocab_is_an_error():
    with pytest.raises(ConfigError, match="beyond config.model.vocab_size=200"):
        lm.local_batch(source(False), 0, 4, 200)


def test_too_little_data_for_one_sequence_is_an_error():
    with pytest.raises(ConfigError, match="do not fill one sequence"):
        source(False, seq_len=64, docs=["tiny"])


def test_synthetic_source_examples_match_its_sequences(cfg):
    src = lm.make_source(cfg.data, TOK)
    ex, seq = src.example(7), src.sequence(7)
    np.testing.assert_array_equal(ex["inputs"], seq[:-1])
    np.testing.assert_array_equal(ex["targets"], seq[1:])
    assert set(ex) == {"inputs", "targets", "weights"}
    assert "synthetic" in lm.describe(src, 0, 80)


def test_fingerprint_names_what_decides_the_examples():
    base = source(True).fingerprint()
    assert source(True).fingerprint() == base
    assert len({base, source(False).fingerprint(), source(True, seed=1).fingerprint(),
                source(True, seq_len=8).fingerprint()}) == 4
