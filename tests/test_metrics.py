"""Metric sinks and MFU arithmetic."""

import io
import json

import pytest

from jaxlm import runlog
from jaxlm.train import metrics


def record(step, loss=2.0):
    return {"loss": loss, "perplexity": 7.4, "tokens_per_second": 1000.0, "grad_norm": 0.5,
            "learning_rate": 1e-3, "mfu": None, "eta_seconds": 125.0 if step < 10 else 0.0}


@pytest.mark.parametrize("interactive", [True, False])
def test_sink_writes_jsonl_tensorboard_and_console(tmp_path, monkeypatch, caplog, interactive):
    stderr = io.StringIO()
    stderr.isatty = lambda: interactive
    monkeypatch.setattr(metrics.sys, "stderr", stderr)
    caplog.set_level("INFO", logger="jaxlm")
    sink = metrics.MetricSink(tmp_path, total_steps=10, start_step=0)
    for step in (5, 10):
        sink.write(step, record(step))
        sink.advance(5)
    sink.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [5, 10] and lines[0]["mfu"] is None
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    if interactive:  # a progress bar with loss and tokens/s, no log lines
        assert "loss 2.0000" in stderr.getvalue() and "10/10" in stderr.getvalue()
        assert "step 5" not in caplog.text
    else:             # plain log lines: progress and time left
        assert "step 5/10  loss 2.0000" in caplog.text and stderr.getvalue() == ""
        assert "eta 2m05s" in caplog.text and "eta 0s" in caplog.text


def test_durations_read_at_a_glance():
    assert [metrics.format_duration(s) for s in (0, 42, 125, 3725)] == ["0s", "42s", "2m05s", "1h02m"]


def test_read_history_keeps_last_record_per_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": l}) for s, l in [(1, 3.0), (2, 2.0), (2, 1.5)]))
    assert runlog.read_history(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.5}]


def test_mfu_and_peak_lookup():
    assert metrics.mfu(6e9, 1000.0, 2, 1e12) == pytest.approx(3.0)
    assert metrics.mfu(6e9, 1000.0, 2, None) is None
    assert metrics.peak_flops_per_device(override=5e12) == 5e12

    class Device:
        device_kind = "NVIDIA H100 80GB HBM3"
    assert metrics.peak_flops_per_device(device=Device()) == 989e12
    Device.device_kind = "cpu"
    assert metrics.peak_flops_per_device(device=Device()) is None
