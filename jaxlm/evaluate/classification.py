"""Scoring a sequence classifier: predictions over a labelled set, the usual metrics
(computed by scikit-learn, not by hand) and their pictures.

`predict` runs the model over every example in fixed-size batches (one compiled program;
the last batch is padded and its padding dropped); with several processes every process
passes the same examples and reads the same replicated outputs.

`metrics` returns: accuracy; precision, recall and F1 (binary, for the positive class 1,
when there are two classes; macro averages always); Matthews correlation; ROC-AUC (binary,
or one-vs-rest macro over several classes; None if a class is missing from the labels);
the confusion matrix (rows: true class, columns: predicted).
"""

from __future__ import annotations

import functools

import pathlib

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from jaxlm import sharding  # noqa: E402


def predict(setup, params, source, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities [N, C], labels [N]) of every example of `source` in order; a
    one-output (regression) head gives its scores [N, 1] as they are."""
    model, mesh, cfg_mesh = setup.model, setup.mesh, setup.cfg.mesh
    rep = sharding.replicated(mesh)

    # Replicated out: under a data-parallel mesh the model's batch-sharded output would
    # leave each device (and addressable_data(0)) only its share of the rows.
    @functools.partial(jax.jit, out_shardings=rep)
    def probs(params, inputs, types, segments):
        logits = model.apply({"params": params}, inputs, None, segments, types, output="classes")
        return logits if logits.shape[-1] == 1 else jax.nn.softmax(logits, axis=-1)

    out, labels = [], []
    examples = source.encoded
    for start in range(0, len(examples), batch_size):
        rows = examples[start:start + batch_size]
        pad = batch_size - len(rows)
        rows = rows + [rows[-1]] * pad
        arrays = [jax.make_array_from_process_local_data(rep, np.stack([r[k] for r in rows]))
                  for k in ("tokens", "types", "segments")]
        with sharding.activate(mesh, cfg_mesh):
            p = probs(params, *arrays)
        out.append(np.asarray(p.addressable_data(0))[:batch_size - pad])
        labels += [r["label"] for r in rows[:batch_size - pad]]
    return np.concatenate(out), np.asarray(labels)


def metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """The metrics of the module docstring, as plain JSON values."""
    classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    out = {"examples": int(len(labels)), "accuracy": float(skm.accuracy_score(labels, predicted)),
           "mcc": float(skm.matthews_corrcoef(labels, predicted))}
    for average in (["binary"] if classes == 2 else []) + ["macro"]:
        p, r, f, _ = skm.precision_recall_fscore_support(
            labels, predicted, average=average, labels=list(range(classes)), zero_division=0)
        suffix = "" if average == "binary" else "_macro"
        out.update({f"precision{suffix}": float(p), f"recall{suffix}": float(r), f"f1{suffix}": float(f)})
    present = len(np.unique(labels)) == classes
    if not present:
        out["roc_auc"] = None
    elif classes == 2:
        out["roc_auc"] = float(skm.roc_auc_score(labels, probs[:, 1]))
    else:
        out["roc_auc"] = float(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    out["confusion_matrix"] = skm.confusion_matrix(labels, predicted,
                                                   labels=list(range(classes))).tolist()
    return out


def write_plots(folder: pathlib.Path, history: list[dict], labels: np.ndarray,
                probs: np.ndarray, class_names: list[str]) -> list[pathlib.Path]:
    """PNGs: training loss and validation metrics by step; ROC curve(s); confusion matrix
    (a regression head: the curves, and predicted against true scores)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    regression = probs.shape[1] == 1

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    train = [h for h in history if "loss" in h]
    valid = [h for h in history if "validation_loss" in h]
    ax[0].plot([h["step"] for h in train], [h["loss"] for h in train], label="training loss")
    ax[0].plot([h["step"] for h in valid], [h["validation_loss"] for h in valid], "o-",
               label="validation loss")
    ax[0].set(xlabel="step", ylabel="squared error" if regression else "cross-entropy",
              title="Loss")
    keys = ("pearson", "spearman") if regression else ("accuracy", "f1_macro")
    for key in keys:
        ax[1].plot([h["step"] for h in valid], [h[f"validation_{key}"] for h in valid], "o-",
                   label=key)
    ax[1].set(xlabel="step", ylabel="score", title="Validation",
              ylim=(-1.02 if regression else 0, 1.02))
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    written.append(_save(fig, folder / "curves.png"))
    if regression:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(labels, probs[:, 0], s=8, alpha=0.5)
        ax.set(xlabel="true score", ylabel="predicted score", title="Validation")
        written.append(_save(fig, folder / "scores.png"))
        return written

    fig, ax = plt.subplots(figsize=(5, 5))
    classes = probs.shape[1]
    for c in ([1] if classes == 2 else range(classes)):
        if 0 < np.sum(labels == c) < len(labels):
            fpr, tpr, _ = skm.roc_curve(labels == c, probs[:, c])
            ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {skm.auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(fontsize=8)
    written.append(_save(fig, folder / "roc.png"))

    fig, ax = plt.subplots(figsize=(5, 4))
    skm.ConfusionMatrixDisplay(skm.confusion_matrix(labels, probs.argmax(axis=1),
                                                    labels=list(range(classes))),
                               display_labels=class_names).plot(ax=ax, colorbar=False)
    ax.set_title("Confusion matrix (validation)")
    written.append(_save(fig, folder / "confusion.png"))
    return written


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
