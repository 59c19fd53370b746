"""Multi-process training: 2 processes x 4 CPU devices, joined by jax.distributed (gloo CPU
collectives) through launch/local.py, train exactly like 1 process x 8 devices."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from test_main import TINY, run

from jaxlm.runlog import read_history

ARGS = ("--config.train.steps=6", "--config.train.log_every=2", "--config.checkpoint.every=3")


def launch(*argv, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "launch/local.py"), *argv],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def launch_beside(log, reference, *argv, timeout=600) -> tuple[int, str]:
    """`launch/local.py argv` in the background while `reference()` (the single-process
    run it is compared with) runs in this process, so that the two share the cores instead
    of taking turns. Returns the launch's exit code and output (kept in `log`); the launch
    and its processes are killed if anything fails first."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "launch/local.py"), *argv],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)  # its own group, to kill it whole
    try:
        reference()
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log.read_text()


@pytest.mark.skipif(jax.device_count() != 8, reason="compares against 8 devices in one process")
@pytest.mark.parametrize("layout", ["dp", "fsdp", "dcn_data"])
def test_two_processes_match_one_process(tmp_path, layout):
    """dcn_data: a hybrid mesh whose data axis spans the 2 processes as 2 slices of 4.
    fsdp: the 2-process checkpoint then resumes in 1 process (elastic resume)."""
    flags = (*TINY, *ARGS)
    if layout == "fsdp":
        flags += ("--config.mesh.strategy=fsdp", "--config.mesh.data=1", "--config.mesh.fsdp=8")
    hybrid = ("--config.mesh.data=4", "--config.mesh.dcn_data=2") if layout == "dcn_data" else ()
    code, out = launch_beside(
        tmp_path / "launch.log", lambda: run(tmp_path / "sp", *flags[len(TINY):], evaluate=False),
        "--processes=2", "--cpu-devices=4", "--", "-m", "jaxlm.train",
        f"--config={REPO}/configs/gpt/debug.py", f"--workdir={tmp_path / 'mp'}", *flags, *hybrid)
    assert code == 0, out[-3000:]
    assert "[p1]" in out and "process 1 of 2; 4 local of 8 devices" in out
    if layout == "dcn_data":
        assert "mesh {'data': 8, 'fsdp': 1, 'sequence': 1, 'tensor': 1}" in out

    multi, single = read_history(tmp_path / "mp"), read_history(tmp_path / "sp")
    assert [h["step"] for h in multi] == [h["step"] for h in single] == [2, 4, 6]
    np.testing.assert_allclose([h["loss"] for h in multi], [h["loss"] for h in single], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "mp" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["3", "6"]
    if layout == "fsdp":
        # Elastic resume: the 2-process run continues as 1 process (8 devices) with exactly
        # the samples, hence the losses, of the single-process run.
        for workdir in ("mp", "sp"):
            run(tmp_path / workdir, *flags[len(TINY):], "--config.train.steps=8", evaluate=False)
        multi, single = read_history(tmp_path / "mp"), read_history(tmp_path / "sp")
        assert [h["step"] for h in multi] == [h["step"] for h in single] == [2, 4, 6, 8]
        np.testing.assert_allclose([h["loss"] for h in multi], [h["loss"] for h in single], rtol=1e-5)


def test_failing_process_fails_the_launch(tmp_path):
    proc = launch("--processes=2", "--cpu-devices=1", "--", "-m", "jaxlm.train",
                  f"--config={REPO}/configs/gpt/debug.py", f"--workdir={tmp_path}",
                  "--config.train.stepz=1", timeout=120)
    assert proc.returncode == 2
    assert "[p0] error: unknown config field config.train.stepz" in proc.stdout


def test_dry_run_prints_one_command_per_process():
    proc = launch("--processes=3", "--port=1234", "--dry-run", "--", "-m", "jaxlm.train",
                  "--config=c.py", "--workdir=w", timeout=60)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 3
    for i, line in enumerate(lines):
        assert "-m jaxlm.train --config=c.py --workdir=w" in line
        assert "--config.distributed.coordinator_address=localhost:1234" in line
        assert line.endswith(f"--config.distributed.process_id={i}")


def test_inconsistent_distributed_config_is_named():
    from jaxlm import distributed
    from jaxlm.config import base_config
    from jaxlm.errors import ConfigError
    cfg = base_config()
    cfg.distributed.update(coordinator_address="localhost:1", num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match=r"num_processes \(got 2\).*process_id \(got 2\)"):
        distributed.initialize(cfg.distributed)


@pytest.mark.skipif(jax.device_count() != 8, reason="compares against 8 devices in one process")
def test_two_processes_evaluate_like_one(tmp_path):
    """The main job end to end on 2 processes: same few-shot results as 1 process, and
    only process 0 prints the table and writes results.json and plots."""
    flags = (*TINY, "--config.train.steps=4", "--config.evaluate.shots=(0,1)")
    code, out = launch_beside(
        tmp_path / "launch.log", lambda: run(tmp_path / "sp", *flags[len(TINY):]),
        "--processes=2", "--cpu-devices=4", "--", "-m", "jaxlm.main",
        f"--config={REPO}/configs/gpt/debug.py", f"--workdir={tmp_path / 'mp'}", *flags)
    assert code == 0, out[-3000:]
    assert out.count("Few-shot results") == 1 and "[p0] Few-shot results" in out
    multi = json.loads((tmp_path / "mp" / "results.json").read_text())
    single = json.loads((tmp_path / "sp" / "results.json").read_text())
    for task, r in single["tasks"].items():
        for k in ("0", "1"):
            assert multi["tasks"][task]["shots"][k][r["metric"]] == r["shots"][k][r["metric"]]
    assert (tmp_path / "mp" / "plots" / "fewshot.png").exists()
