"""PIQA (Bisk et al. 2020): physical commonsense, two solutions to a goal.

lm-eval task `piqa`: "Question: {goal}\\nAnswer:", choices [sol1, sol2], gold `label`;
target delimiter " ", demonstrations separated by "\\n\\n"; acc and acc_norm. Files:
FOLDER/validation.jsonl in the original fields (goal, sol1, sol2, label); demonstrations
from FOLDER/train.jsonl (lm-eval's train split; without it, from the scored split, marked
non-standard).
TFDS (config.evaluate.source=tfds): `piqa`, the same fields.
"""

from jaxlm.evaluate.tasks.base import choice_problems, local_task

# TFDS copy in the original fields (config.evaluate.source=tfds): task -> (dataset, convert)
TFDS = {"piqa": ("piqa", None)}


def load(reader, name="piqa"):
    return local_task(
        name, reader, ("goal", "sol1", "sol2", "label"),
        check=lambda d: choice_problems([d["sol1"], d["sol2"]], int(d["label"])),
        kind="multiple_choice", text=lambda d: f"Question: {d['goal']}\nAnswer:",
        choices=lambda d: [d["sol1"], d["sol2"]], target=lambda d: int(d["label"]),
        metrics=("acc", "acc_norm"), description="physical commonsense, 2 solutions")
