"""SST-2 (Socher et al. 2013), as lm-eval's GLUE task `sst2` prompts it:
"{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:", choices
["negative", "positive"], gold `label`; acc. Files: FOLDER/validation.jsonl (sentence,
label); demonstrations from FOLDER/train.jsonl (lm-eval's train split; without it,
from the scored split, marked non-standard).
TFDS (config.evaluate.source=tfds): `glue/sst2`.
"""

from jaxlm.evaluate.tasks.base import local_task

# TFDS copy in the original fields (config.evaluate.source=tfds): task -> (dataset, convert)
TFDS = {"sst2": ("glue/sst2", None)}


def load(reader, name="sst2"):
    return local_task(
        name, reader, ("sentence", "label"),
        check=lambda d: None if d["label"] in (0, 1) else f"label {d['label']!r} must be 0 or 1",
        kind="multiple_choice",
        text=lambda d: f"{d['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
        choices=lambda d: ["negative", "positive"], target=lambda d: int(d["label"]),
        description="sentiment of a movie-review sentence")
