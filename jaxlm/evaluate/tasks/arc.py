"""ARC (Clark et al. 2018): grade-school science questions, Easy and Challenge sets.

lm-eval tasks `arc_easy`, `arc_challenge`: "Question: {question}\\nAnswer:", choices the
answer texts, gold the position of `answerKey` among the choice labels; target delimiter
" ", demonstrations separated by "\\n\\n"; acc and acc_norm. lm-eval scores the test split:
FOLDER/test.jsonl (FOLDER/validation.jsonl when there is no test file, marked
non-standard), in AllenAI's original layout (id, question{stem, choices[{text, label}]},
answerKey; lm-eval's copy flattens it to question, choices{text, label}); demonstrations
from FOLDER/train.jsonl (lm-eval's train split; without it, from the scored split, marked
non-standard). TFDS
(config.evaluate.source=tfds): `ai2_arc/ARC-Easy`, `ai2_arc/ARC-Challenge`, converted by
`from_tfds`.
"""

from jaxlm.evaluate.tasks.base import Splits, choice_problems, local_task


def from_tfds(example: dict, features) -> dict:
    """TFDS's ai2_arc example (question text, choices{text, label}, labels as class ids)
    in AllenAI's original layout."""
    name = features["answerKey"].int2str
    choice_name = features["choices"]["label"].int2str
    return {"id": example["id"], "answerKey": name(example["answerKey"]),
            "question": {"stem": example["question"],
                         "choices": [{"text": t, "label": choice_name(l)} for t, l in
                                     zip(example["choices"]["text"], example["choices"]["label"])]}}


# TFDS copies (config.evaluate.source=tfds): task -> (dataset, convert)
TFDS = {"arc_easy": ("ai2_arc/ARC-Easy", from_tfds), "arc_challenge": ("ai2_arc/ARC-Challenge", from_tfds)}


def _check(doc):
    q = doc["question"]
    if not isinstance(q, dict) or "stem" not in q or "choices" not in q:
        return "expected question{stem, choices[{text, label}]}"
    labels = [c.get("label") for c in q["choices"]]
    if doc["answerKey"] not in labels:
        return f"answerKey {doc['answerKey']!r} is none of the choice labels {labels}"
    return choice_problems([c.get("text", "") for c in q["choices"]], labels.index(doc["answerKey"]))


def load(reader, name="arc_easy"):
    level = "Challenge" if "challenge" in name else "Easy"
    return local_task(
        name, reader, ("question", "answerKey"), check=_check, splits=Splits(test="test"),
        kind="multiple_choice", text=lambda d: f"Question: {d['question']['stem']}\nAnswer:",
        choices=lambda d: [c["text"] for c in d["question"]["choices"]],
        target=lambda d: [c["label"] for c in d["question"]["choices"]].index(d["answerKey"]),
        metrics=("acc", "acc_norm"), description=f"grade-school science, ARC-{level}")
