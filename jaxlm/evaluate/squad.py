"""SQuAD scoring: answers from a span head's logits, and the official exact match and F1.

Decoding (as BERT's reference SQuAD code): in every window of a question, the `n_best`
highest start and end logits form candidate spans that lie in the window's context, end at
or after their start, are at most `max_answer_len` tokens long, and start at a token for
which this window has the most context on both sides (a token seen by several overlapping
windows is judged in the one where it is most central). The best candidate by start + end
logit over all windows is the answer, its text the context characters its tokens cover.
SQuAD v2.0 adds "no answer": the score of position 0 ([CLS]) in both heads, the smallest
over the question's windows; the prediction is "" when that null score exceeds the best
span's by more than `null_threshold`.

Metrics (as the official evaluation scripts of v1.1 and v2.0): answers are normalised
(lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed);
exact match is 1 when the normalised prediction equals a normalised gold answer, F1 the
token-overlap F1 against it, each the maximum over the gold answers; a question without
answers (v2.0) has the one gold answer "", which only "" matches. Scores are percentages,
averaged over questions; for v2.0 also over the answerable (HasAns) and unanswerable
(NoAns) ones separately.
"""

from __future__ import annotations

import collections
import functools
import re
import string

import jax
import numpy as np

from jaxlm import sharding

from jaxlm.data.squad import Question, Windows

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    """The official scripts' answer normalisation."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised texts; two empty answers agree (1), one does not (0)."""
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(questions: list[Question], predictions: dict[str, str]) -> dict[str, float]:
    """{"exact", "f1", "total"} in percent, and HasAns_/NoAns_ splits when both kinds occur.
    A question without a prediction scores 0 (the official scripts count it as missing)."""
    per = {"exact": [], "f1": [], "has": []}
    for q in questions:
        golds = q.answers or [""]
        pred = predictions.get(q.id)
        per["exact"].append(0.0 if pred is None else max(exact(pred, g) for g in golds))
        per["f1"].append(0.0 if pred is None else max(f1(pred, g) for g in golds))
        per["has"].append(not q.impossible)
    has = np.array(per["has"])
    out = {"exact": 100 * float(np.mean(per["exact"])), "f1": 100 * float(np.mean(per["f1"])),
           "total": len(questions)}
    if has.any() and (~has).any():
        for name, pick in (("HasAns", has), ("NoAns", ~has)):
            out[f"{name}_exact"] = 100 * float(np.mean(np.array(per["exact"])[pick]))
            out[f"{name}_f1"] = 100 * float(np.mean(np.array(per["f1"])[pick]))
            out[f"{name}_total"] = int(pick.sum())
    return out


def decode(questions: list[Question], win: Windows, start_logits_NxL: np.ndarray,
           end_logits_NxL: np.ndarray, n_best: int = 20, max_answer_len: int = 30,
           null_threshold: float | None = None) -> dict[str, str]:
    """{question id: answer text} from the windows' start and end logits (module doc);
    `null_threshold` None: always a span (v1.1), else v2.0's no-answer rule."""
    found = best_spans(questions, win, start_logits_NxL, end_logits_NxL, n_best, max_answer_len)
    return {qid: "" if null_threshold is not None and margin > null_threshold else text
            for qid, (text, margin) in found.items()}


def best_spans(questions: list[Question], win: Windows, start_logits_NxL: np.ndarray,
               end_logits_NxL: np.ndarray, n_best: int = 20,
               max_answer_len: int = 30) -> dict[str, tuple[str, float]]:
    """{question id: (its best span's text, the null score minus that span's score)}: v2.0
    answers "" where the second exceeds the threshold (`decode`, `best_threshold`)."""
    best = {}  # question index -> (score, text)
    null = {}  # question index -> smallest null score
    for w in range(len(win.ids)):
        qi = int(win.question[w])
        ctx = win.contexts[qi]
        s_L, e_L = start_logits_NxL[w], end_logits_NxL[w]
        null[qi] = min(null.get(qi, np.inf), float(s_L[0] + e_L[0]))
        first, length = int(win.context_offset[w]), int(win.context_len[w])
        starts = np.argsort(-s_L[first:first + length])[:n_best]
        ends = np.argsort(-e_L[first:first + length])[:n_best]
        for i in starts:
            if not _most_context(win, w, int(i)):
                continue
            for j in ends:
                if j < i or j - i + 1 > max_answer_len:
                    continue
                total = float(s_L[first + i] + e_L[first + j])
                if qi not in best or total > best[qi][0]:
                    c0 = int(win.context_start[w])
                    text = questions[qi].context[ctx.starts[c0 + i]:ctx.ends[c0 + j]]
                    best[qi] = (total, text)
    out = {}
    for qi, q in enumerate(questions):
        span_score, text = best.get(qi, (-np.inf, ""))
        out[q.id] = (text, null.get(qi, np.inf) - span_score)
    return out


def best_threshold(questions: list[Question], spans: dict[str, tuple[str, float]]) -> dict:
    """The v2.0 no-answer threshold that maximises exact match and F1 on these questions,
    as the official v2.0 script reports it (best_exact, best_exact_thresh, best_f1,
    best_f1_thresh; scores in percent): questions are taken in order of their margin
    (`best_spans`), and the threshold at a question means answering it and every one of
    smaller margin with its span, the rest with "". Put best_f1_thresh in
    config.finetune.null_threshold to use it."""
    order = sorted(questions, key=lambda q: spans[q.id][1])
    margins = [spans[q.id][1] for q in order]
    out = {}
    for name, metric in (("exact", exact), ("f1", f1)):
        def gain(q, text):
            return max(metric(text, g) for g in q.answers or [""])
        total = best = sum(gain(q, "") for q in questions)  # below every margin: all ""
        threshold = margins[0] - 1.0 if margins else 0.0
        for k, q in enumerate(order):
            total += gain(q, spans[q.id][0]) - gain(q, "")
            tied = k + 1 < len(order) and margins[k + 1] == margins[k]  # answered together
            if total > best and not tied:
                best, threshold = total, margins[k]
        out[f"best_{name}"] = 100 * best / max(len(questions), 1)
        out[f"best_{name}_thresh"] = float(threshold)
    return out


def _most_context(win: Windows, w: int, i: int) -> bool:
    """Whether window w has the most context around its i-th context token among the
    question's windows that hold it (score: the nearer side's context, plus a hundredth of
    the window's length to break ties, as BERT's reference code)."""
    qi, token = win.question[w], win.context_start[w] + i
    def centrality(v):
        left, right = token - win.context_start[v], win.context_start[v] + win.context_len[v] - 1 - token
        return min(left, right) + 0.01 * win.context_len[v]
    holders = [v for v in np.flatnonzero(win.question == qi)
               if win.context_start[v] <= token < win.context_start[v] + win.context_len[v]]
    return max(holders, key=centrality) == w


def span_logits(setup, params, win: Windows, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(start logits [N, L], end logits [N, L]) of every window, fp32 (padding positions
    as they come: decoding reads only [CLS] and context positions); batches of
    `batch_size` windows (the last one padded with copies), so one program serves all."""
    model, mesh = setup.model, setup.mesh
    rep = sharding.replicated(mesh)
    segments_NxL = win.segments()

    # Replicated out: each device (and addressable_data(0)) holds every row.
    @functools.partial(jax.jit, out_shardings=rep)
    def spans(params, inputs_BxL, types_BxL, segments_BxL):
        return model.apply({"params": params}, inputs_BxL, None, segments_BxL, types_BxL,
                           output="spans")

    starts, ends = [], []
    for first in range(0, len(win.ids), batch_size):
        rows = np.arange(first, min(first + batch_size, len(win.ids)))
        rows_B = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        arrays = [jax.make_array_from_process_local_data(rep, a[rows_B])
                  for a in (win.ids, win.token_types, segments_NxL)]
        with sharding.activate(mesh, setup.cfg.mesh):
            s_BxL, e_BxL = spans(params, *arrays)
        starts.append(np.asarray(s_BxL.addressable_data(0))[:len(rows)])
        ends.append(np.asarray(e_BxL.addressable_data(0))[:len(rows)])
    return np.concatenate(starts), np.concatenate(ends)
