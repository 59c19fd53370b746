"""Token-stream examples: concatenated windows, packing with segments and positions,
parity of packed and lone documents, determinism, per-process rows, exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from data_helpers import lm_batch, lm_example, memory_cache, next_token

from jaxlm.data import batches, packing, sources
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import ConfigError
from jaxlm.models.gpt import GPT

TOK = ByteTokenizer()
# 0..40 bytes: several share a sequence of 16; three are longer (40, 23, 16 bytes + EOS).
DOCS = ["abc", "hello world", "", "x" * 40, "the quick brown", "fox", "jumps over the lazy dog",
        "é ü", "q" * 15, "r" * 16, "end."]


def source(packing: bool, seq_len: int = 16, seed: int = 0, docs=DOCS) -> sources.TokenSource:
    return sources.TokenSource(memory_cache(docs, TOK), TOK, seq_len, packing, seed)


def stream(docs=DOCS) -> np.ndarray:
    return np.asarray(memory_cache(docs, TOK).tokens, np.int32)


def test_concat_windows_tile_the_stream_and_each_epoch_is_a_permutation():
    src, s = source(False), stream()
    W, L = src.num_windows, src.seq_len
    assert W == (len(s) - 1) // L
    assert src.stats()["unused_tokens_per_epoch"] == (len(s) - 1) % L
    seen = [src.window(i) for i in range(W)]
    assert sorted(seen) == list(range(W))
    assert [src.window(W + i) for i in range(W)] != seen  # epoch 1 has another order
    for i in range(2 * W):
        ex, w = lm_example(src, i), src.window(i)
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
        ex = lm_example(src, w)
        segs, pos, n = ex["segments"], ex["positions"], int(ex["weights"].sum())
        assert np.all(segs[:n] > 0) and np.all(segs[n:] == 0)         # padding only at the end
        assert np.all(ex["weights"][n:] == 0) and np.all(ex["inputs"][n + 1:] == TOK.pad_id)
        # The window's extra token, the last document's final target, is the first padding
        # input: segment 0 keeps it out of attention and weight 0 out of the loss.
        assert n == L or ex["inputs"][n] == TOK.eos_id
        for k in range(1, segs.max() + 1):
            idx = np.flatnonzero(segs == k)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart at 0
            found.append(tuple(ex["inputs"][idx]))
            assert lone[found[-1]] == tuple(ex["targets"][idx])
    assert sorted(found) == sorted(lone)  # every document / piece exactly once per epoch
    stats = src.stats()
    assert stats["long_documents"] == 3 and stats["empty_documents"] == 1
    assert stats["unused_tokens_per_epoch"] == 0 and 0 < stats["padding_fraction"] < 1


def test_pack_windows_next_fit():
    # documents of 3, 5, 9 and 2 pairs into windows of 8: [3+5], [8 of the 9], [1+2]
    bounds, long_docs = packing.pack_windows(np.array([0, 3, 8, 17, 19]), 8)
    assert bounds.tolist() == [0, 8, 16, 19] and long_docs == 1


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_documents_get_the_same_logits_as_alone(position):
    cfg = tiny_config(position=position)
    src = source(True, seq_len=32, docs=DOCS[:3] + DOCS[4:])  # no document cut
    model = GPT(cfg.model)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"]
    apply = jax.jit(lambda *args: model.apply({"params": params}, *args))
    batch = lm_batch(src, 0, src.num_windows, TOK.vocab_size)
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
    whole = lm_batch(src, 5, 8, TOK.vocab_size)
    for count in (2, 4, 8):
        parts = [lm_batch(src, 5, 8, TOK.vocab_size, p, count) for p in range(count)]
        for k, v in whole.items():
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)


def test_resuming_at_a_step_equals_continuing():
    src, B = source(True), 4
    ident = lambda b: b
    make = next_token(src).example
    run = batches.Batches(src, 0, B, TOK.vocab_size, make, ident, prefetch=2)
    straight = [next(run) for _ in range(9)]
    run.close()
    resumed = batches.Batches(src, 6, B, TOK.vocab_size, make, ident, prefetch=1)
    for step in range(6, 9):
        got = next(resumed)
        for k, v in straight[step].items():
            np.testing.assert_array_equal(got[k], v)
    resumed.close()


def test_token_beyond_model_vocab_is_an_error():
    with pytest.raises(ConfigError, match="beyond config.model.vocab_size=200"):
        lm_batch(source(False), 0, 4, 200)


def test_too_little_data_for_one_sequence_is_an_error():
    with pytest.raises(ConfigError, match="do not fill one sequence"):
        source(False, seq_len=64, docs=["tiny"])


def test_synthetic_windows_are_next_token_examples(cfg):
    src = sources.make_source(cfg.data, TOK)
    window = src.example(7)["tokens"]
    assert window.shape == (cfg.data.seq_len + 1,) and window[0] == TOK.eos_id
    ex = lm_example(src, 7)
    np.testing.assert_array_equal(ex["inputs"], window[:-1])
    np.testing.assert_array_equal(ex["targets"], window[1:])
    assert set(ex) == {"inputs", "targets", "weights"} and ex["weights"].sum() == cfg.data.seq_len
    assert "synthetic" in sources.describe(src, 0, 80)


def test_fingerprint_names_what_decides_the_examples():
    base = source(True).fingerprint()
    assert source(True).fingerprint() == base
    assert len({base, source(False).fingerprint(), source(True, seed=1).fingerprint(),
                source(True, seq_len=8).fingerprint()}) == 4


@pytest.mark.parametrize("packed", [False, True])
def test_windows_without_an_extra_token_tile_the_stream(packed):
    """extra_tokens=0 (an objective whose targets are the inputs themselves, e.g. masked
    LM): windows hold L tokens, do not overlap and, unpacked, start every L tokens."""
    s = stream()
    src = sources.TokenSource(memory_cache(DOCS, TOK), TOK, 16, packed, 0, extra_tokens=0)
    assert src.fingerprint() != source(packed).fingerprint()
    covered = []
    for w in range(src.num_windows):
        a, b = int(src.bounds[w]), int(src.bounds[w + 1])
        tokens = src.example(np.flatnonzero([src.window(i) == w for i in range(src.num_windows)])[0])["tokens"]
        assert len(tokens) == 16
        np.testing.assert_array_equal(tokens[:b - a], s[a:b])
        covered += list(range(a, b))
    assert covered == list(range(len(covered)))  # contiguous, no token twice
    if not packed:
        assert src.num_windows == len(s) // 16 and src.stats()["unused_tokens_per_epoch"] == len(s) % 16
