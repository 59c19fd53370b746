"""What a run does when a step's loss or gradient norm is NaN or inf.

The step itself never applies such an update (jaxlm.train.step.apply_gradients keeps the
old params and optimizer state and sets metrics["nonfinite"]), so a diverged state can
never reach a checkpoint. `NonfiniteGuard` reads that flag on the host and applies
config.train.nonfinite: "stop" ends the run naming the step, "skip" goes on with the next
batch and counts the step (stored in the checkpoint), up to max_skipped_steps in a row.
"""

from __future__ import annotations

import logging

from jaxlm.errors import Diverged

log = logging.getLogger("jaxlm")

class NonfiniteGuard:
    """Applies config.train.nonfinite to each step's `nonfinite` flag. The step itself
    never applies a non-finite update (step.apply_gradients); this decides whether the
    run stops or goes on, and keeps the list of skipped steps for the checkpoint."""

    def __init__(self, cfg_train, skipped: list[int]):
        self.policy, self.limit = cfg_train.nonfinite, cfg_train.max_skipped_steps
        self.skipped = list(skipped)
        self.checked = 0   # last step checked
        self.in_a_row = 0

    def check(self, step: int, metrics: dict, last_saved: int | None) -> None:
        if step <= self.checked:
            return
        self.checked = step
        if not bool(metrics["nonfinite"]):
            self.in_a_row = 0
            return
        what = (f"step {step}: loss {float(metrics['loss'])}, grad norm "
                f"{float(metrics['grad_norm'])}; its update was not applied")
        if self.policy == "stop":
            raise Diverged(f"{what}. Stopping (config.train.nonfinite='stop'); the last "
                           f"checkpoint is step {last_saved}")
        self.skipped.append(step)
        self.in_a_row += 1
        log.warning("%s; skipped (%d so far, config.train.nonfinite='skip')", what, len(self.skipped))
        if self.in_a_row > self.limit:
            raise Diverged(f"{self.in_a_row} steps in a row up to step {step} were not finite "
                           f"(config.train.max_skipped_steps={self.limit}); stopping")
