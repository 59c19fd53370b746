"""A run's metrics log, WORKDIR/metrics.jsonl, read back.

jaxlm.train.metrics.MetricSink writes it; plots, fine-tuning results and tests read it
here, so that reading a run's history does not import training.
"""

from __future__ import annotations

import json
import pathlib

from jaxlm import files

METRICS_FILE = "metrics.jsonl"  # one JSON record per line: {"step": s, name: value, ...}


def read_history(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl as a list, one dict per step: a step's records (training, validation)
    merged, a later value of a field replacing an earlier one (a resumed run may have logged
    a step twice; a killed run may have left half a line)."""
    path = files.path(workdir) / METRICS_FILE  # a local path or gs:// (jaxlm.files)
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # empty, or the fragment of a killed run's last write
            continue
        by_step.setdefault(rec["step"], {}).update(rec)  # a step's records merge; later wins
    return [by_step[s] for s in sorted(by_step)]
