"""The scorer compiles once per padded shape: many requests of many lengths, one program
per length bucket, and none more when the same shapes come again."""

import jax
from conftest import tiny_config

from jaxlm.inference import generate
from jaxlm.evaluate.scoring import Scorer
from jaxlm.setup import build


def test_scorer_compiles_once_per_length_bucket():
    cfg = tiny_config()
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(0))
    scorer = Scorer(setup.model, params, setup.tokenizer, setup.mesh, cfg.mesh, batch_size=4)
    # Contexts of 1..40 bytes: two length buckets of 32 (max_len 64); 13 batches of 4.
    requests = [("x" * n, " y") for n in range(1, 41)] + [("ab", " cd")] * 12
    scores = scorer.loglikelihood(requests)
    assert len(scores) == len(requests) and scorer.traces["score"] == 2
    scorer.loglikelihood(requests[::-1])
    assert scorer.traces["score"] == 2  # the same shapes again: no new compilation
    buckets = {generate.bucket(n + 1, cfg.model.max_len - 8) for n in (3, 30, 40)}
    for prompts in (["abc"] * 5, ["q" * 30, "q" * 40]):
        scorer.generate(prompts, max_new_tokens=8)
    scorer.generate(["abc", "q" * 40], max_new_tokens=8)
    assert scorer.generator.traces["generate"] == len(buckets) == 2


def test_cached_greedy_decoding_equals_full_recomputation():
    """Prefill + one-token steps against the KV cache give the tokens that recomputing the
    whole forward pass at every step gives (greedy), for prompts of different lengths in
    one left-padded batch."""
    import jax.numpy as jnp
    cfg = tiny_config()
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(3))
    gen = generate.Generator(setup.model, params, setup.tokenizer, setup.mesh, cfg.mesh, 4)
    prompts = [[setup.tokenizer.eos_id] + setup.tokenizer.encode(p) for p in ("ab", "hello there", "x")]
    got = gen.generate_tokens(prompts, 10)
    full = jax.jit(lambda tokens: setup.model.apply({"params": params}, tokens))
    for ids, new in zip(prompts, got):
        seq = list(ids)
        for _ in range(10):  # causal: padding after the sequence changes nothing before it
            logits = full(jnp.asarray([seq + [0] * (32 - len(seq))]))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert new == seq[len(ids):]


def test_sampling_settings():
    import jax.numpy as jnp
    import numpy as np
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.PRNGKey(0), 1)[0]

    def draw(t, k, p):
        return np.asarray(generate.next_token(logits, keys, jnp.float32(t), jnp.int32(k), jnp.float32(p)))

    assert set(draw(0.0, 0, 1.0)) == {0}                     # greedy
    assert set(draw(1.0, 1, 1.0)) == {0}                     # top-1 is greedy
    assert set(draw(1.0, 2, 1.0)) == {0, 1}                  # only the two most likely
    assert set(draw(1.0, 0, 0.7)) == {0, 1}                  # 0.5 < 0.7 <= 0.5 + 0.3
    counts = np.bincount(draw(1.0, 0, 1.0), minlength=4) / 2000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    assert generate.cut_at_stops("a\nb.c", ("." , "\n")) == "a"
    assert generate.cut_at_stops("abc", ("",)) == "abc"


def test_a_shorter_kv_cache_decodes_the_same_tokens():
    """config.model.cache_len below max_len: a smaller cache, the same greedy tokens for
    prompts that fit; prompts that do not are cut on the left to fit (and counted)."""
    cfg = tiny_config()
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(3))
    short_cfg = tiny_config(cache_len=32)
    short = build(short_cfg, jax.devices()[:1])
    full = generate.Generator(setup.model, params, setup.tokenizer, setup.mesh, cfg.mesh, 4)
    small = generate.Generator(short.model, params, short.tokenizer, short.mesh, cfg.mesh, 4)
    prompts = ["ab", "hello there"]
    assert small.generate(prompts, 8) == full.generate(prompts, 8)
    assert small.max_len == 32 and small.truncated == 0
    small.generate(["x" * 40], 8)
    assert small.truncated == 1
