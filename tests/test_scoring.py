"""The scorer compiles once per padded shape: many requests of many lengths, one program
per length bucket, and none more when the same shapes come again."""

import jax
from conftest import tiny_config

from jaxlm.evaluate import scoring
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
    buckets = {scoring._bucket(n + 1, cfg.model.max_len - 8) for n in (3, 30, 40)}
    for prompts in (["abc"] * 5, ["q" * 30, "q" * 40]):
        scorer.generate(prompts, max_new_tokens=8)
    scorer.generate(["abc", "q" * 40], max_new_tokens=8)
    assert scorer.traces["generate"] == len(buckets) == 2
