"""A JAX profiler trace of chosen training steps (config.train.profile_steps="A:B").

The trace covers the B - A optimizer steps after the A-th (steps A+1 .. B as the log
counts them): tracing starts before step A+1 is dispatched and stops once step B has
finished on the devices, so it holds whole steps and nothing of the steps around them.
It goes to WORKDIR/tb/plugins/profile/<time>/ (one .xplane.pb per host, and a Perfetto
trace, perfetto_trace.json.gz), where TensorBoard's profile plugin finds it
(`tensorboard --logdir WORKDIR/tb`, "Profile" tab; pip install tensorboard-plugin-profile)
and https://ui.perfetto.dev opens the Perfetto file. Every process traces its own devices.
Steps before A are left alone, as a resumed run past B traces nothing. Pick A after the
first step: step 1 includes compilation.
"""

from __future__ import annotations

import logging
import pathlib

import jax

from jaxlm import files
from jaxlm.config import step_range

log = logging.getLogger("jaxlm")


class StepProfiler:
    """before(step) ahead of dispatching the step that makes `step` + 1; after(done, state)
    once it is dispatched; close() stops a trace still running (a run stopped early)."""

    def __init__(self, spec: str, workdir: pathlib.Path):
        self.steps = step_range(spec)  # validated with the config
        self.folder = files.path(workdir) / "tb"  # a local path or gs:// (jaxlm.files)
        self.active = False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(str(self.folder), create_perfetto_trace=True)
            self.active = True
            log.info("profiling steps %d..%d into %s", step + 1, self.steps[1], self.folder)

    def after(self, done: int, state) -> None:
        if self.active and done == self.steps[1]:
            jax.block_until_ready(state)  # the traced steps end when the devices are done
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile written under %s (tensorboard --logdir %s)",
                     self.folder / "plugins" / "profile", self.folder)
