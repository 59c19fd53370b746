"""`--config.FIELD=VALUE` arguments of the benchmark scripts, parsed the same way in each."""

from __future__ import annotations

import argparse

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
