"""PNG plots of a run: the training loss curve and few-shot accuracy against k."""

from __future__ import annotations

import io
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from jaxlm import files  # noqa: E402
from jaxlm.runlog import read_history  # noqa: E402


def _save(fig, path) -> None:
    """A PNG on a disk, or one object in a bucket (matplotlib writes local files only)."""
    if files.is_remote(path):
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=100, format="png")
        path.write_bytes(buffer.getvalue())
    else:
        fig.savefig(path, dpi=100)


def write_plots(workdir: pathlib.Path, results: dict, shots) -> list[pathlib.Path]:
    out_dir = files.path(workdir) / "plots"  # a local path or gs:// (jaxlm.files)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    history = read_history(workdir)
    if history:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([h["step"] for h in history], [h["loss"] for h in history])
        ax.set(xlabel="step", ylabel="training loss (nats/token)", title="Loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save(fig, out_dir / "loss.png")
        plt.close(fig)
        written.append(out_dir / "loss.png")

    if not results:  # no few-shot tasks configured
        return written
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(results.items()):
        color = f"C{i}"
        ax.plot(shots, [r["shots"][str(k)][r["metric"]] for k in shots], "o-", color=color,
                label=name)
        ax.axhline(r["chance"], color=color, ls=":", lw=1)
    ax.set(xlabel="shots (k)", ylabel="acc (exact_match)", title="Few-shot accuracy (dotted: chance)",
           ylim=(0, 1.02))
    ax.set_xticks(list(shots))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out_dir / "fewshot.png")
    plt.close(fig)
    written.append(out_dir / "fewshot.png")
    return written
