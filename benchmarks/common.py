"""What the benchmark scripts share: `--config.FIELD=VALUE` arguments, parsed the same way
in each, and a batch of random tokens for a train step."""

from __future__ import annotations

import argparse

import numpy as np

from jaxlm.config import apply_override


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parser's own flags, plus `.overrides`: every `--config.FIELD=VALUE` argument, in
    order. Anything else unknown is the parser's usual one-line error."""
    args, rest = parser.parse_known_args()
    unknown = [a for a in rest if not (a.startswith("--config.") and "=" in a)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = rest
    return args


def apply(cfg, overrides) -> None:
    """Applies `--config.FIELD=VALUE` arguments to cfg (unknown fields: jaxlm's ConfigError)."""
    for o in overrides:
        field, value = o.removeprefix("--config.").split("=", 1)
        apply_override(cfg, field, value)


def random_batch(run, batch_size: int, vocab: int, seed: int = 0) -> dict:
    """`batch_size` rows of random token ids below `vocab`, as the train step `run`
    (jaxlm.train.build.build_train) takes them: through its objective, placed on its devices."""
    length = run.setup.cfg.data.seq_len + run.objective.extra_tokens
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch_size, length), np.int32)
    rows = [run.objective.example({"tokens": t}, i) for i, t in enumerate(tokens)]
    return run.place_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
