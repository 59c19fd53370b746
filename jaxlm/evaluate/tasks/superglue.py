"""Two SuperGLUE tasks as lm-eval runs them (its `super-glue-lm-eval-v1` prompts).

copa (Roemmele et al. 2011): the premise without its final period, then " because" (a
cause is asked) or " therefore" (an effect); the choices are " " + each alternative with
its first letter lower-cased, and the gold is written as that string, so (as in lm-eval)
requests and demonstrations carry the " " delimiter and the choice's own space. acc.
Files: FOLDER/validation.jsonl (premise, choice1, choice2, question, label).

boolq (Clark et al. 2019): "{passage}\\nQuestion: {question}?\\nAnswer:", choices
["no", "yes"], gold 1 for a true answer; acc. Files: FOLDER/validation.jsonl (question,
passage, answer: a JSON boolean, or label 0/1).

Demonstrations come from FOLDER/train.jsonl (lm-eval's train split; without it, from
the scored split, marked non-standard).
TFDS (config.evaluate.source=tfds): `super_glue/copa`, `super_glue/boolq`.
"""

from jaxlm.evaluate.tasks.base import local_task

# TFDS copies in the original fields (config.evaluate.source=tfds; BoolQ's gold is `label`)
TFDS = {"copa": ("super_glue/copa", None), "boolq": ("super_glue/boolq", None)}


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _copa_check(doc):
    if doc["question"] not in ("cause", "effect"):
        return f"question {doc['question']!r} must be 'cause' or 'effect'"
    if int(doc["label"]) not in (0, 1):
        return f"label {doc['label']!r} must be 0 or 1"
    if not doc["choice1"].strip() or not doc["choice2"].strip():
        return "an empty choice"
    return None


def _copa_choices(doc):
    return [" " + _lower_first(doc["choice1"]), " " + _lower_first(doc["choice2"])]


def load_copa(reader, name="copa"):
    connector = {"cause": "because", "effect": "therefore"}
    return local_task(
        name, reader, ("premise", "choice1", "choice2", "question", "label"),
        check=_copa_check, kind="multiple_choice",
        text=lambda d: d["premise"].strip()[:-1] + " " + connector[d["question"]],
        choices=_copa_choices, target=lambda d: _copa_choices(d)[int(d["label"])],
        description="cause or effect, 2 alternatives")


def _boolq_label(doc) -> int:
    return int(doc["answer"]) if "answer" in doc else int(doc["label"])


def _boolq_check(doc):
    if "answer" not in doc and "label" not in doc:
        return "missing field 'answer' (or 'label')"
    value = doc.get("answer", doc.get("label"))
    if value not in (True, False, 0, 1):
        return f"answer {value!r} must be true/false or 0/1"
    return None


def load_boolq(reader, name="boolq"):
    return local_task(
        name, reader, ("question", "passage"), check=_boolq_check,
        kind="multiple_choice",
        text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
        choices=lambda d: ["no", "yes"], target=_boolq_label,
        description="yes/no questions about a passage")
