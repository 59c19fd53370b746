"""Winogrande (Sakaguchi et al. 2020): fill the blank `_` with one of two names, scored
by partial evaluation (Trinh & Le 2018), as lm-eval does.

lm-eval task `winogrande`: one context per option, the sentence up to the blank with the
option in it; one continuation, " " + the rest of the sentence after the blank
(stripped); the option whose context makes that continuation most likely wins; acc.
Demonstrations show the whole sentence with the right option, separated by "\\n\\n".
Files: FOLDER/validation.jsonl (sentence, option1, option2, answer "1" or "2");
demonstrations from FOLDER/train.jsonl (lm-eval's train split; without it,
from the scored split, marked non-standard).
"""

from jaxlm.evaluate.tasks.base import local_task


def _check(doc):
    if doc["sentence"].count("_") != 1:
        return "the sentence must have exactly one blank '_'"
    if str(doc["answer"]) not in ("1", "2"):
        return f"answer {doc['answer']!r} must be \"1\" or \"2\""
    if not doc["option1"].strip() or not doc["option2"].strip():
        return "an empty option"
    return None


def _options(doc):
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + doc["option1"], doc["sentence"][:cut] + doc["option2"]]


def load(reader, name="winogrande"):
    return local_task(
        name, reader, ("sentence", "option1", "option2", "answer"), check=_check,
        kind="multiple_choice", partial=True, text=lambda d: int(d["answer"]) - 1,
        choices=_options,
        target=lambda d: d["sentence"][d["sentence"].index("_") + 1:].strip(),
        description="pronoun resolution by partial scoring, 2 options")
