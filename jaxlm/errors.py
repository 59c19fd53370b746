"""The errors a user can act on, as opposed to bugs.

Every `python -m jaxlm.*` command (jaxlm.cli) prints a `JaxlmError` as one line,
`error: <message>`, and exits with its `exit_code`; anything else is a bug and keeps its
traceback. A message names what to fix: the config field, the file (and line), or the
checkpoint, and the value found there.

This module imports nothing from jaxlm, so every module may import it.
"""

from __future__ import annotations


class JaxlmError(Exception):
    """Base of the user errors; printed as one line, exit code 2."""
    exit_code = 2


class ConfigError(JaxlmError, ValueError):
    """A config field, command-line flag or name that cannot work; names the field."""


class CheckpointError(JaxlmError):
    """A checkpoint or export that is missing, damaged or does not match the config."""


class DataError(JaxlmError):
    """Input data that cannot be used as it is: names the file and line, or the dataset."""


class Diverged(JaxlmError):
    """The loss or gradient norm became NaN/inf (config.train.nonfinite); exit code 1."""
    exit_code = 1


class Interrupted(JaxlmError):
    """Ctrl-C: the run saved a checkpoint at the next step boundary and stopped; exit 130."""
    exit_code = 130
