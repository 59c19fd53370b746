"""Throughput/MFU arithmetic and the run's metric sinks (console, TensorBoard, metrics.jsonl)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pathlib
import sys

import jax

from jaxlm import files
from jaxlm.runlog import METRICS_FILE

log = logging.getLogger("jaxlm")

# Dense bf16 peak FLOP/s per JAX device, from the vendors' spec sheets. MFU is quoted
# against this peak whatever the compute dtype (the usual convention). Keys are matched
# as substrings of `device.device_kind`, first match wins.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),      # SXM; the PCIe card is lower (756e12): set hardware.peak_flops
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6 lite", 918e12),  # v6e
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),       # v5p
    ("TPU v4", 275e12),
)


def peak_flops_per_device(override: float = 0.0, device=None) -> float | None:
    """config.hardware.peak_flops if set, else the table entry for the device; None if unknown
    (CPUs have no entry: their peak depends on the core count and vector units)."""
    if override > 0:
        return override
    kind = (device or jax.devices()[0]).device_kind
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_second: float, num_devices: int,
        peak: float | None) -> float | None:
    if peak is None:
        return None
    return flops_per_token * tokens_per_second / (peak * num_devices)


# Metric-name prefixes of evaluation records (fine-tuning validation, in-training few-shot).
EVALUATION_GROUPS = ("validation", "fewshot")


class MetricSink:
    """Writes step metrics to WORKDIR/metrics.jsonl (read back by jaxlm.runlog), TensorBoard
    (WORKDIR/tb), the console and, with config.logging.wandb, Weights & Biases.

    Only process 0 writes. A progress bar is shown on an interactive terminal, plain log
    lines otherwise (CI, SLURM logs).
    """

    def __init__(self, workdir: pathlib.Path, total_steps: int, start_step: int,
                 tracker=None):
        """`tracker`: a jaxlm.tracking.Tracker (W&B) that gets every record too."""
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.bar = None
        self.tracker = tracker
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        path = files.path(workdir) / METRICS_FILE
        if files.is_remote(path):
            self.jsonl = ObjectLog(path)
        else:
            # A run killed mid-write leaves a partial last line; start the resumed run's
            # records on a fresh line (jaxlm.runlog.read_history skips the fragment).
            self.jsonl = open(path, "a+")
            if self.jsonl.tell():
                self.jsonl.seek(self.jsonl.tell() - 1)
                if self.jsonl.read(1) != "\n":
                    self.jsonl.write("\n")
        if files.is_remote(workdir):
            _register_object_events()
        self.tb = SummaryWriter(str(files.path(workdir) / "tb"))
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
        try:
            self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self.jsonl.flush()
        except OSError as e:  # e.g. a full disk: name the file
            raise OSError(e.errno, e.strerror, self.jsonl.name) from None
        if self.tracker is not None:
            self.tracker.log(step, clean)
        for k, v in clean.items():
            if v is not None and math.isfinite(v):
                group, _, rest = k.partition("_")  # evaluations get their own TB section
                self.tb.add_scalar(f"{group}/{rest}" if group in EVALUATION_GROUPS
                                   else f"train/{k}", v, step)
        if "loss" not in clean:  # an evaluation's record, e.g. validation_accuracy
            prefix = os.path.commonprefix(list(clean)).rpartition("_")[0]
            log.info("step %d/%d  %s: %s", step, self.total_steps, prefix or "evaluation",
                     "  ".join(f"{k[len(prefix) + 1 if prefix else 0:]} {v:.4f}"
                               for k, v in clean.items() if v is not None))
            return
        tps = clean.get("tokens_per_second")
        text = (f"loss {clean['loss']:.4f}  "
                + (f"ppl {clean['perplexity']:.2f}  " if "perplexity" in clean else "")
                + (f"acc {clean['accuracy']:.3f}  " if clean.get("accuracy") is not None else "")
                + (f"tok/s {tps:,.0f}" if tps is not None else "tok/s - (compiling)"))
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:  # a log file or pipe: progress and time left in every line
            extra = f"  grad_norm {clean['grad_norm']:.3f}  lr {clean['learning_rate']:.2e}"
            if clean.get("mfu") is not None:
                extra += f"  mfu {100 * clean['mfu']:.1f}%"
            if clean.get("eta_seconds") is not None:
                extra += f"  eta {format_duration(clean['eta_seconds'])}"
            log.info("step %d/%d  %s%s", step, self.total_steps, text, extra)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.tb.close()
            self.jsonl.close()
            if self.tracker is not None:
                self.tracker.close()


class ObjectLog:
    """metrics.jsonl in a bucket, where objects cannot be appended to: the records are kept
    in memory and the object rewritten whole at each flush (every log step), one upload,
    so the object always holds whole lines: those of the runs before this one (read at the
    start) and this run's up to its last flush. A run killed meanwhile loses no record it
    flushed; the steps after its last checkpoint are logged again by the resumed run, as on
    a disk (jaxlm.runlog.read_history keeps the later record of a step). The cost: each
    flush uploads the whole log (about 300 bytes a record; 10,000 records: 3 MB)."""

    def __init__(self, path):
        self.name = str(path)
        self._path = path
        text = path.read_text() if path.exists() else ""
        self._text = text if not text or text.endswith("\n") else text + "\n"

    def write(self, text: str) -> None:
        self._text += text

    def flush(self) -> None:
        files.write_text(self._path, self._text)

    def close(self) -> None:
        pass


class _ObjectEvents:
    """A TensorBoard events file in a bucket: the records kept in memory, the object
    rewritten whole at each flush (tensorboardX flushes every 2 minutes and at close).
    Replaces tensorboardX's own gs:// writer, which uploads again when it is garbage
    collected, after close, whenever that happens; this one writes through jaxlm.files."""

    def __init__(self, path: str):
        self.path, self.buffer, self.closed = files.path(path), io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _ObjectEventsFactory:
    def open(self, path: str) -> _ObjectEvents:
        return _ObjectEvents(path)

    def directory_check(self, path: str) -> None:
        pass  # a bucket has no folders to make


def _register_object_events() -> None:
    """tensorboardX's hook for a URL scheme's writer (its record_writer module)."""
    from tensorboardX.record_writer import register_writer_factory
    register_writer_factory("gs", _ObjectEventsFactory())


def format_duration(seconds: float) -> str:
    """3725 -> "1h02m", 125 -> "2m05s", 42 -> "42s"."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

