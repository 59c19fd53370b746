"""ARC (Clark et al. 2018): grade-school science questions, Easy and Challenge sets.

lm-eval tasks `arc_easy`, `arc_challenge`: "Question: {question}\\nAnswer:", choices the
answer texts, gold the position of `answerKey` among the choice labels; target delimiter
" ", demonstrations separated by "\\n\\n"; acc and acc_norm. Files: FOLDER/validation.jsonl
in AllenAI's original layout (id, question{stem, choices[{text, label}]}, answerKey;
lm-eval's copy flattens it to question, choices{text, label}); demonstrations from
FOLDER/train.jsonl when present (lm-eval: the train split).
"""

from jaxlm.evaluate.tasks.base import choice_problems, local_task


def _check(doc):
    q = doc["question"]
    if not isinstance(q, dict) or "stem" not in q or "choices" not in q:
        return "expected question{stem, choices[{text, label}]}"
    labels = [c.get("label") for c in q["choices"]]
    if doc["answerKey"] not in labels:
        return f"answerKey {doc['answerKey']!r} is none of the choice labels {labels}"
    return choice_problems([c.get("text", "") for c in q["choices"]], labels.index(doc["answerKey"]))


def load(folder, name="arc_easy"):
    level = "Challenge" if "challenge" in name else "Easy"
    return local_task(
        name, folder, "validation", ("question", "answerKey"), check=_check,
        kind="multiple_choice", text=lambda d: f"Question: {d['question']['stem']}\nAnswer:",
        choices=lambda d: [c["text"] for c in d["question"]["choices"]],
        target=lambda d: [c["label"] for c in d["question"]["choices"]].index(d["answerKey"]),
        metrics=("acc", "acc_norm"), description=f"grade-school science, ARC-{level}")
