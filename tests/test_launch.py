"""Launch scripts: every remote script's --dry-run prints the exact commands, runs nothing."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def dry_run(tmp_path, script, *args, extra=()):
    """Runs a script with --dry-run, with `gcloud` and `sbatch` replaced by stubs that
    record any call: a dry run must call neither."""
    stubs, calls = tmp_path / "stubs", tmp_path / "calls.log"
    stubs.mkdir()
    for tool in ("gcloud", "sbatch"):
        (stubs / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\nexit 1\n")
        (stubs / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *args, "--dry-run", "--", *extra],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not calls.exists(), f"dry run called: {calls.read_text()}"
    return proc.stdout


def test_tpu_pod_dry_run_creates_installs_runs_on_all_workers_and_collects_logs(tmp_path):
    out = dry_run(tmp_path, "tpu_pod.sh", "--name=pod1", "--zone=us-central2-b", "--accelerator=v4-32",
                  "--config=configs/gpt/gpt2_small.py", "--workdir=gs://bucket/run", "--create",
                  "--workers=4", "--project=proj", extra=["--config.train.steps=10"])
    lines = out.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create pod1 --zone=us-central2-b "
                               "--project=proj --accelerator-type=v4-32")
    ssh = [l for l in lines if " ssh pod1 --worker=all " in l]
    assert len(ssh) == 2  # install, then run
    assert "pip\\ install" in ssh[0] and "jax\\[tpu\\]" in ssh[0]
    assert "jaxlm.main\\ --config=configs/gpt/gpt2_small.py\\ --workdir=gs://bucket/run" in ssh[1]
    assert "auto_detect=true\\ --config.train.steps=10" in ssh[1]
    logs = [l for l in lines if "jaxlm_run.log logs/pod1/worker-" in l]
    assert len(logs) == 4 and "--worker=3" in logs[-1]
    assert not (REPO / "logs" / "pod1").exists()  # a dry run writes nothing


def test_tpu_pod_requires_its_arguments():
    proc = subprocess.run(["bash", str(REPO / "launch/tpu_pod.sh"), "--name=x", "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--zone=... is required" in proc.stderr


def test_slurm_dry_run_prints_batch_script_and_sbatch(tmp_path):
    out = dry_run(tmp_path, "slurm.sh", "--nodes=4", "--gpus-per-node=8", "--partition=gpu",
                  "--config=configs/gpt/gpt2_xl.py", "--workdir=/shared/xl",
                  extra=["--config.train.steps=5"])
    assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=1" in out
    assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --partition=gpu" in out
    assert ("srun python -m jaxlm.main --config=configs/gpt/gpt2_xl.py --workdir=/shared/xl "
            "--config.distributed.auto_detect=true --config.train.steps=5") in out
    assert out.strip().endswith("sbatch logs/slurm/jaxlm-gpt2_xl.sbatch")


def test_debug_script_passes_overrides(tmp_path):
    """launch/debug.sh is the single-host entry point; a bad override fails it fast."""
    proc = subprocess.run(["bash", str(REPO / "launch/debug.sh"), str(tmp_path / "w"),
                           "--config.train.stpes=1"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "did you mean config.train.steps" in proc.stderr


def test_dry_run_after_double_dash_still_runs_nothing(tmp_path):
    out = dry_run(tmp_path, "slurm.sh", "--config=configs/gpt/debug.py", "--workdir=w",
                  extra=["--config.train.steps=1", "--dry-run"])
    assert "sbatch logs/slurm/jaxlm-debug.sbatch" in out and "--dry-run" not in out
