"""GLUE's metrics, its score and its test-server files.

Each task is scored by its official metrics (jaxlm.data.glue.TASKS): Matthews correlation
(CoLA), accuracy (SST-2, MNLI matched and mismatched, QNLI, RTE, WNLI), F1 of the positive
class and accuracy (MRPC, QQP), Pearson and Spearman correlation (STS-B). A task's score
("glue") is the mean of its metrics; the GLUE score is the mean of the nine task scores,
MNLI's being the mean of matched and mismatched, as the leaderboard computes it (checked
on BERT-large's published test row: 80.5). The diagnostic AX is not part of the score.

The metrics are written here in numpy (tests check them against scikit-learn and scipy):
a correlation with a constant side, which has no defined value, is 0 (scikit-learn's
convention for MCC), so that an epoch predicting one value ranks below any that tracks
the labels and the results stay valid JSON.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data.glue import STS_RANGE, TASKS, Task


def accuracy(labels, predicted) -> float:
    return float(np.mean(np.asarray(labels) == np.asarray(predicted)))


def f1(labels, predicted) -> float:
    """F1 of class 1 (MRPC's "equivalent", QQP's "duplicate"); 0 when it is never
    predicted nor present."""
    labels, predicted = np.asarray(labels) == 1, np.asarray(predicted) == 1
    tp = np.sum(labels & predicted)
    denominator = np.sum(labels) + np.sum(predicted)
    return float(2 * tp / denominator) if denominator else 0.0


def mcc(labels, predicted) -> float:
    """Matthews correlation of two classes (Pearson's correlation of the 0/1 vectors)."""
    return pearson(np.asarray(labels) == 1, np.asarray(predicted) == 1)


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    norm = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return float(np.sum(dx * dy) / norm) if norm > 0 else 0.0


def ranks(x) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (what Spearman's correlation needs)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]  # a run of ties: positions starts..ends-1
    mean_rank = (starts + ends + 1) / 2.0
    out = np.empty(len(x))
    out[order] = np.repeat(mean_rank, ends - starts)
    return out


def spearman(x, y) -> float:
    return pearson(ranks(x), ranks(y))


def predictions(t: Task, outputs_NxC: np.ndarray) -> np.ndarray:
    """Class numbers (argmax) or, for a score, the single output."""
    return outputs_NxC[:, 0] if t.regression else outputs_NxC.argmax(axis=1)


def task_metrics(t: Task, labels: np.ndarray, outputs_NxC: np.ndarray) -> dict:
    """The task's official metrics and their mean, "glue" (the task's GLUE score)."""
    predicted = predictions(t, outputs_NxC)
    fns = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}
    out = {m: fns[m](labels, predicted) for m in t.metrics}
    out["glue"] = float(np.mean([out[m] for m in t.metrics]))
    return out


def regression_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    """A single-output head's scores against real-valued labels."""
    labels, scores = np.asarray(labels, np.float64), np.asarray(scores, np.float64)
    return {"examples": int(len(labels)), "mse": float(np.mean((scores - labels) ** 2)),
            "pearson": pearson(labels, scores), "spearman": spearman(labels, scores)}


def glue_score(task_scores: dict[str, float]) -> tuple[float, list[str]]:
    """(the GLUE score, the tasks missing from it) of {row: score} with rows the task names
    and "mnli-m", "mnli-mm": the mean over tasks, MNLI counted once as mean(m, mm)."""
    per_task = {}
    for name in TASKS:
        if name == "mnli":
            if "mnli-m" in task_scores and "mnli-mm" in task_scores:
                per_task[name] = (task_scores["mnli-m"] + task_scores["mnli-mm"]) / 2
        elif name in task_scores:
            per_task[name] = task_scores[name]
    missing = [n for n in TASKS if n not in per_task]
    return (float(np.mean(list(per_task.values()))) if per_task else float("nan")), missing


def submission_lines(t: Task, ids: list[str], outputs_NxC: np.ndarray) -> str:
    """A GLUE server file: `index<TAB>prediction` per example, the label as the files write
    it (0/1, entailment, ...) or the STS-B score clipped to [0, 5]."""
    predicted = predictions(t, outputs_NxC)
    if t.regression:
        values = [f"{min(max(float(v), STS_RANGE[0]), STS_RANGE[1]):.3f}" for v in predicted]
    else:
        values = [t.labels[int(c)] for c in predicted]
    return "index\tprediction\n" + "".join(f"{i}\t{v}\n" for i, v in zip(ids, values))
