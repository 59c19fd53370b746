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
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *args, "--dry-run", "--", *extra],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not calls.exists(), f"dry run called: {calls.read_text()}"
    return proc.stdout


def test_tpu_pod_dry_run_creates_installs_runs_on_all_workers_and_collects_logs(tmp_path):
    out = dry_run(tmp_path, "tpu_pod.sh", "--name=pod1", "--zone=us-central2-b", "--accelerator=v4-32",
                  "--config=configs/gpt/gpt2_small.py", "--workdir=/mnt/bucket/run", "--create",
                  "--workers=4", "--project=proj", extra=["--config.train.steps=10"])
    lines = out.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create pod1 --zone=us-central2-b "
                               "--project=proj --accelerator-type=v4-32")
    ssh = [l for l in lines if " ssh pod1 --worker=all " in l]
    assert len(ssh) == 2  # install, then run
    import jax
    assert "pip\\ install" in ssh[0] and f"jax\\[tpu\\]=={jax.__version__}" in ssh[0]  # pinned
    assert "jaxlm.main\\ \\'--config=configs/gpt/gpt2_small.py\\'\\ \\'--workdir=/mnt/bucket/run\\'" in ssh[1]
    assert "auto_detect=true\\ \\'--config.train.steps=10\\'" in ssh[1]
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
    assert ("srun python -m jaxlm.main '--config=configs/gpt/gpt2_xl.py' '--workdir=/shared/xl' "
            "--config.distributed.auto_detect=true '--config.train.steps=5'") in out
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


# A value that breaks naive quoting in every shell it passes through.
NASTY = "/tmp/run dir;touch PWNED $(touch PWNED) `touch PWNED` 'q' \"d\" \\ $HOME\nline2"


def _stub(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _argv_of(log):
    return log.read_bytes().split(b"\0")[:-1]


def test_tpu_pod_quotes_every_value_for_the_workers_shell(tmp_path):
    """The printed commands, run by bash with gcloud stubbed, hand the workers' shell a
    command that passes the workdir and overrides to jaxlm unchanged, running nothing else."""
    out = dry_run(tmp_path, "tpu_pod.sh", "--name=pod1", "--zone=z", "--config=configs/gpt/debug.py",
                  f"--workdir={NASTY}", "--workers=1", extra=[f"--config.data.manual_dir={NASTY}"])
    ssh = [line for line in out.splitlines() if " ssh pod1 " in line][-1]
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir(), (home / "jaxlm").mkdir(parents=True)
    # gcloud: runs the --command it is given with sh, as the worker would.
    _stub(bin_dir / "gcloud", 'while [ "$1" != --command ]; do shift; done; exec sh -c "$2"\n')
    _stub(bin_dir / "python3", f'for a in "$@"; do printf "%s\\0" "$a"; done > {tmp_path}/argv\n')
    subprocess.run(["bash", "-c", ssh], check=True, cwd=tmp_path, timeout=60,
                   env={**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"})
    argv = _argv_of(tmp_path / "argv")
    assert argv[:4] == [b"-m", b"jaxlm.main", b"--config=configs/gpt/debug.py",
                        f"--workdir={NASTY}".encode()]
    assert argv[-1] == f"--config.data.manual_dir={NASTY}".encode()
    assert not list(tmp_path.rglob("PWNED")) and not list(REPO.glob("PWNED"))


def test_slurm_script_quotes_paths_and_overrides(tmp_path):
    venv = tmp_path / "my venv;$(touch PWNED)"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    out = dry_run(tmp_path, "slurm.sh", "--config=configs/gpt/debug.py", f"--workdir={NASTY}",
                  f"--venv={venv}", extra=[f"--config.data.manual_dir={NASTY}"])
    body = out.split("\n", 1)[1].rsplit("\nsbatch ", 1)[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "srun", 'exec "$@"\n')
    _stub(bin_dir / "python", f'for a in "$@"; do printf "%s\\0" "$a"; done > {tmp_path}/argv\n')
    subprocess.run(["bash", "-c", body], check=True, cwd=tmp_path, timeout=60,
                   env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    argv = _argv_of(tmp_path / "argv")
    assert argv[2:4] == [b"--config=configs/gpt/debug.py", f"--workdir={NASTY}".encode()]
    assert argv[-1] == f"--config.data.manual_dir={NASTY}".encode()
    assert not list(tmp_path.rglob("PWNED")) and not list(REPO.glob("PWNED"))


@pytest.mark.parametrize("script,args,message", [
    ("tpu_pod.sh", ["--name=Pod_1", "--zone=z", "--config=c.py", "--workdir=w"], "--name=Pod_1: expected a TPU name"),
    ("tpu_pod.sh", ["--name=p", "--zone=z", "--config=c.py", "--workdir=gs://b/run"], "a URL is not a workdir"),
    ("tpu_pod.sh", ["--name=p", "--zone=z", "--config=c.py", "--workdir=w", "--", "--steps=3"],
     "only --config.FIELD=VALUE overrides"),
    ("tpu_pod.sh", ["--name=p", "--zone=z", "--config=c.py", "--workdir=w", "--bogus"], "unknown argument --bogus"),
    ("slurm.sh", ["--config=c.py", "--workdir=w", "--nodes=two"], "--nodes=two: expected a number"),
    ("slurm.sh", ["--config=c.py", "--workdir=w", "--partition=a b"], "expected partition name"),
    ("debug.sh", ["--steps=3"], "unknown flag --steps"),
])
def test_launchers_refuse_bad_arguments(tmp_path, script, args, message):
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *args, "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_debug_script_dry_run_runs_nothing(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch/debug.sh"), "--dry-run", str(tmp_path / "w x"),
                           "--config.train.steps=5"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "-m jaxlm.main --config=configs/gpt/debug.py" in proc.stdout
    assert "w\\ x" in proc.stdout and "--config.train.steps=5" in proc.stdout
    assert not (tmp_path / "w x").exists() and not (REPO / "--dry-run").exists()


def test_remote_installs_need_a_known_jax_version(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch/tpu_pod.sh"), "--name=p", "--zone=z",
                           "--config=c.py", "--workdir=w", "--dry-run"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "/bin/false", "JAX_VERSION": ""})
    assert proc.returncode == 2 and "cannot tell which jax to install" in proc.stderr
