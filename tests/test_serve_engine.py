"""The slot engine and its batcher (jaxlm.inference.engine), against the references:
batch generation (jaxlm.inference.generate) for greedy tokens, the few-shot scorer for
prompt log-probabilities, one device for a sharded engine, and itself alone for a request
among others. The batcher's bookkeeping is checked on the mock engine, whose outputs are
known by hand."""

import threading

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm.evaluate.scoring import Scorer
from jaxlm.inference.engine import (Batcher, Done, Engine, Failed, PromptScores, Request, Settings,
                                    Token, buckets)
from jaxlm.inference.generate import Generator
from jaxlm.inference.service import MockEngine
from jaxlm.setup import build

MAX_LEN = 128


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(max_len=MAX_LEN, vocab_size=264)  # a vocabulary that 4 shards divide
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(0))
    return cfg, setup, params


@pytest.fixture(scope="module")
def engine(model):
    cfg, setup, params = model
    engine = Engine(setup.model, params, setup.tokenizer, setup.mesh, cfg.mesh, slots=16)
    engine.warm_up()
    return engine


def prompts(tok, n):
    """n prompts of lengths across the buckets (1 to 100 tokens), EOS first."""
    rng = np.random.default_rng(0)
    return [[tok.eos_id] + rng.integers(0, 256, int(m)).tolist()
            for m in rng.integers(0, 100, n)]


def run(batcher, requests, max_tokens=10, start=False):
    """Submits (tokens, settings) pairs together (then starts the batcher, with start);
    returns each one's events."""
    events = [[] for _ in requests]
    done = [threading.Event() for _ in requests]

    def on_event(i):
        def take(e):
            events[i].append(e)
            if isinstance(e, (Done, Failed)):
                done[i].set()
        return take

    for i, (tokens, settings) in enumerate(requests):
        batcher.submit(Request(tokens, max_tokens, on_event(i), settings))
    if start:
        batcher.start()
    for d in done:
        assert d.wait(120), "a request did not finish"
    return events


def ids(events):
    return [e.id for e in events if isinstance(e, Token)]


def test_buckets():
    assert buckets(128) == [32, 64, 128] and buckets(100) == [32, 64, 100] and buckets(32) == [32]


def test_greedy_tokens_equal_batch_generation_and_nothing_recompiles(model, engine):
    """16 prompts of many lengths through 16 slots, then 40 through them (slots reused as
    requests finish): greedy tokens equal Generator's for every prompt. After warm_up no
    program is traced again, whatever the prompt lengths, settings and mix."""
    cfg, setup, params = model
    warm = dict(engine.traces)
    batch = prompts(setup.tokenizer, 40)
    gen = Generator(setup.model, params, setup.tokenizer, setup.mesh, cfg.mesh, batch_size=8)
    want = gen.generate_tokens(batch, 10)
    batcher = Batcher(engine, max_queue=64).start()
    try:
        got = run(batcher, [(p, Settings()) for p in batch])
        assert [ids(e) for e in got] == want
        mixed = [(p, Settings(temperature=0.7 * (i % 3), top_k=i % 5, top_p=1 - 0.1 * (i % 4), seed=i))
                 for i, p in enumerate(batch[:20])]
        run(batcher, mixed, max_tokens=7)
        scored = Request(batch[0], 0, lambda e: None, prompt_logprobs=True)
        batcher.submit(scored)
        run(batcher, [(batch[1], Settings())], max_tokens=1)
    finally:
        batcher.stop(10)
    assert dict(engine.traces) == warm


def test_a_seeded_request_draws_the_same_tokens_alone_or_among_others(model, engine):
    _, setup, _ = model
    batch = prompts(setup.tokenizer, 16)
    settings = [Settings(temperature=1.0, top_p=0.9, seed=100 + i) for i in range(16)]
    batcher = Batcher(engine).start()
    try:
        together = run(batcher, list(zip(batch, settings)), max_tokens=12)
        alone = run(batcher, [(batch[5], settings[5])], max_tokens=12)
        other_seed = run(batcher, [(batch[5], Settings(temperature=1.0, top_p=0.9, seed=7))], max_tokens=12)
    finally:
        batcher.stop(10)
    assert ids(alone[0]) == ids(together[5]) and len(ids(alone[0])) == 12
    assert ids(other_seed[0]) != ids(alone[0])


def test_prompt_log_probabilities_equal_the_scorer(model, engine):
    """Summed over a continuation, the prefill's prompt log-probabilities are the scorer's
    log-likelihood of (context, continuation); the top alternative's is the largest."""
    cfg, setup, params = model
    tok = setup.tokenizer
    scorer = Scorer(setup.model, params, tok, setup.mesh, cfg.mesh, batch_size=8)
    pairs = [("Question: what is two and two?\nAnswer:", " four"), ("a", " b c d e f"),
             ("The cat sat on the", " mat, and then it slept for a long while.")]
    want = [ll for ll, _ in scorer.loglikelihood(pairs)]
    for (context, continuation), ll in zip(pairs, want):
        ctx = scorer.prefix + tok.encode(context)
        p = engine.prefill(ctx + tok.encode(continuation), prompt_logprobs=True)
        scores = p.prompt[len(ctx) - 1:]
        assert [s.id for s in scores] == tok.encode(continuation)
        assert sum(s.logprob for s in scores) == pytest.approx(ll, rel=1e-5)
        assert all(s.top[0][1] >= s.logprob and s.top[0][1] == max(v for _, v in s.top) for s in scores)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("case", ["fsdp_tp"])
def test_sharded_engine_generates_what_one_device_does(model, engine, case):
    from test_sharding import sharded_config
    _, setup, params = model
    cfg = sharded_config(case)
    cfg.model.max_len = MAX_LEN
    sharded = build(cfg)
    placed = jax.device_put(jax.device_get(params), sharded.param_shardings)
    other = Engine(sharded.model, placed, sharded.tokenizer, sharded.mesh, cfg.mesh, slots=16)
    batch = prompts(setup.tokenizer, 6)
    want, got = [], []
    for eng, out in ((engine, want), (other, got)):
        batcher = Batcher(eng).start()
        try:
            out += [ids(e) for e in run(batcher, [(p, Settings()) for p in batch], max_tokens=8)]
        finally:
            batcher.stop(10)
    assert got == want


# ----------------------------------------------------------------------------- batcher (mock)


def mock(**kw):
    return MockEngine(vocab_size=258, slots=2, max_len=64, **kw)


def test_batcher_frees_slots_at_once_and_serves_in_order():
    """Two slots, five requests: each gets the mock's tokens (last prompt token + 1, + 2,
    ...); a request that ends frees its slot for the next waiting one at the next step."""
    batcher = Batcher(mock(), eos_id=256)
    try:
        got = run(batcher, [([1, 10 * i], Settings()) for i in range(5)], max_tokens=3, start=True)
    finally:
        batcher.stop(5)
    for i, events in enumerate(got):
        assert ids(events) == [10 * i + 1, 10 * i + 2, 10 * i + 3] and events[-1] == Done("length")
    assert batcher.steps == 6  # the first token comes from prefill: 2 steps per pair of requests


def test_batcher_ends_at_eos_and_on_request():
    engine = mock()
    batcher = Batcher(engine, eos_id=256).start()
    stop_after_two = []

    def take(e):
        stop_after_two.append(e)
        return len(stop_after_two) < 2

    try:
        batcher.submit(Request([1, 2], 50, take))
        eos = run(batcher, [([1, 253], Settings())], max_tokens=50)[0]
        assert not batcher.running and not batcher.waiting
    finally:
        batcher.stop(5)
    assert ids(eos) == [254, 255, 256] and eos[-1] == Done("eos")  # EOS given, then the end
    assert ids(stop_after_two) == [3, 4]


def test_a_failing_request_fails_alone():
    """A prompt the (mock) engine cannot prefill fails that request; the others complete."""
    engine = mock(fail_on=99)
    batcher = Batcher(engine, eos_id=256).start()
    try:
        got = run(batcher, [([1, 5], Settings()), ([1, 99], Settings()), ([1, 7], Settings())],
                  max_tokens=2)
    finally:
        batcher.stop(5)
    assert ids(got[0]) == [6, 7] and ids(got[2]) == [8, 9]
    assert isinstance(got[1][-1], Failed) and "breaks the engine" in str(got[1][-1].error)


def test_prompt_scores_come_first_and_max_tokens_zero_scores_only():
    engine = mock()
    batcher = Batcher(engine, eos_id=256).start()
    events = []
    done = threading.Event()
    try:
        batcher.submit(Request([1, 2, 3], 0, lambda e: (events.append(e), done.set() if isinstance(e, Done) else None),
                               prompt_logprobs=True))
        assert done.wait(10)
    finally:
        batcher.stop(5)
    assert isinstance(events[0], PromptScores) and [t.logprob for t in events[0].tokens] == [-1.0, -2.0]
    assert events[1:] == [Done("length")]
