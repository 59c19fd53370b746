"""jaxlm: GPT and BERT in JAX/Flax (README.md)."""

from jaxlm import interrupt as _interrupt

if _interrupt.started_as_command():  # before the command's imports: they take seconds
    _interrupt.install()
