"""HellaSwag (Zellers et al. 2019): pick the most plausible ending of an activity.

lm-eval task `hellaswag`: the query is `activity_label: ctx_a Ctx_b` (ctx_b with its first
letter upper-cased and the rest lower-cased, as Python's str.capitalize does) and the
choices are the four endings, both cleaned the same way (stripped, " [title]" becomes
". ", other bracketed tags removed, double spaces made single); gold `label`; target
delimiter " ", demonstrations separated by "\\n\\n"; acc and acc_norm. Files:
FOLDER/validation.jsonl in the original fields (activity_label, ctx_a, ctx_b, endings,
label); demonstrations from FOLDER/train.jsonl (lm-eval's train split; without it,
from the scored split, marked non-standard).
"""

import re

from jaxlm.evaluate.tasks.base import choice_problems, local_task


def clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def query(doc) -> str:
    return clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


def load(reader, name="hellaswag"):
    fields = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
    return local_task(
        name, reader, fields,
        check=lambda d: choice_problems([clean(e) for e in d["endings"]], int(d["label"])),
        kind="multiple_choice", text=query, choices=lambda d: [clean(e) for e in d["endings"]],
        target=lambda d: int(d["label"]), metrics=("acc", "acc_norm"),
        description="plausible ending of an activity, 4 choices")
