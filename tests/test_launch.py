"""Launch scripts: every remote script's --dry-run prints the exact commands, runs nothing."""

import os
import shutil
import signal
import subprocess
import sys
import time

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


# ----------------------------------------------------------------------------- sweeps

# Stands in for a jaxlm command: logs its argv; fails as a jaxlm command does (an "error:"
# line, then other output, then its exit code) for the seeds in FAIL_SEEDS, else writes
# results.json (roc_auc only for seeds > 0, as a metric some runs lack).
FAKE_RUN = """
import json, os, pathlib, signal, sys, time
if os.environ.get("WAIT_FOR_CTRL_C"):  # as jaxlm: Ctrl-C saves, prints one line, exits 130
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("error: interrupted", file=sys.stderr) or 130))
with open(os.environ["CALLS"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
while os.environ.get("WAIT_FOR_CTRL_C"):
    time.sleep(0.05)
seed = int(args.get("config.train.seed", 0))
if str(seed) in os.environ["FAIL_SEEDS"].split(","):
    print(f"error: seed {seed} went wrong", file=sys.stderr)
    print("a line after the error", file=sys.stderr)
    sys.exit(10 + seed)
workdir = pathlib.Path(args["workdir"])
workdir.mkdir(parents=True)
(workdir / "results.json").write_text(json.dumps(
    {"validation": {"accuracy": 0.5 + seed / 10, "roc_auc": 0.9 if seed else None}}))
"""


SIGINT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def sweep(tmp_path, *args, fail_seeds="", ctrl_c=False):
    """Runs launch/sweep.py on configs/bert/facts.py with the fake command (with ctrl_c:
    Ctrl-C, as a terminal sends it to the process group, once the first run has started);
    returns the process and the fake's calls, one line each."""
    (tmp_path / "fake_run.py").write_text(FAKE_RUN)
    calls = tmp_path / "calls.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CALLS": str(calls), "FAIL_SEEDS": fail_seeds,
           "WAIT_FOR_CTRL_C": "1" if ctrl_c else ""}
    # Started as from a terminal, SIGINT at its default: a test suite run in the background
    # (`&`) passes it on ignored, and a sweep started so rightly stays deaf to it.
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_DEFAULT, str(REPO / "launch/sweep.py"),
                             f"--config={REPO}/configs/bert/facts.py", f"--workdir={tmp_path / 'w'}",
                             "--command=fake_run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                            start_new_session=True)
    if ctrl_c:
        deadline = time.monotonic() + 60
        while not calls.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # nothing of a hung sweep outlives the test
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return (subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
            calls.read_text().splitlines() if calls.exists() else [])


def _refused(proc, calls, tmp_path, message):
    """Exit 2 with one line naming the problem, before printing or running anything."""
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}", proc.stderr
    assert proc.stdout == "" and calls == [] and not (tmp_path / "w").exists()


def _with_dry_run(args, dry_run):
    at = args.index("--") if "--" in args else len(args)
    return [*args[:at], *["--dry-run"] * dry_run, *args[at:]]


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("args,message", [
    (["--grid", "train.seed=0,1,0"], "--grid train.seed=0,1,0: '0' is given twice; give each "
     "value once"),
    (["--grid", "train.seed=0,1", "--grid", "config.train.seed=2"],
     "--grid train.seed is given twice; list all its values in one --grid"),
    (["--grid", "finetune.learning_rate=1e-4,0.0001", "--grid", "train.seed=0,1"],
     "--grid values finetune.learning_rate=1e-4 and finetune.learning_rate=0.0001 are the same "
     "configuration: one run would count as two"),
    (["--grid", "finetune.validation_data=a b,a_b"],
     "--grid values finetune.validation_data=a b and finetune.validation_data=a_b would share "
     "the run folder finetune.validation_data=a_b: one run would count as two"),
    (["--grid", "train.seed=0,1", "--", "--config.train.seed=3"],
     "--config.train.seed=3 after -- would override --grid train.seed in every run; drop one "
     "of them"),
])
def test_sweep_refuses_a_grid_that_would_count_one_run_twice(tmp_path, args, message, dry_run):
    """Statistics over seeds must be over distinct runs: before, a repeated value ran once
    and counted twice (std 0)."""
    proc, calls = sweep(tmp_path, *_with_dry_run(args, dry_run))
    _refused(proc, calls, tmp_path, message)


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("args,message", [
    (["--grid", "finetune.learnin_rate=1e-4,3e-4"], "--grid finetune.learnin_rate=1e-4: unknown "
     "config field config.finetune.learnin_rate (did you mean config.finetune.learning_rate?)"),
    (["--grid", "train.seed=0,x"], "--grid train.seed=x: config.train.seed: expected int, got 'x'"),
    (["--grid", "train.seed=0,1", "--", "--config.train.stpes=3"], "--config.train.stpes=3 "
     "(after --): unknown config field config.train.stpes (did you mean config.train.steps?)"),
    (["--grid", "finetune.learning_rate=1e-4,-1"],
     "run finetune.learning_rate=-1: config.finetune.learning_rate=-1.0 must be positive"),
    (["--grid", "=1"], "--grid '=1': expected FIELD=V1,V2,..."),
])
def test_sweep_checks_every_override_before_printing_or_running_anything(tmp_path, args, message,
                                                                         dry_run):
    proc, calls = sweep(tmp_path, *_with_dry_run(args, dry_run))
    _refused(proc, calls, tmp_path, message)


def test_sweep_whose_every_run_fails_lists_them_and_exits_with_the_first_code(tmp_path):
    proc, calls = sweep(tmp_path, "--grid", "train.seed=1,2", fail_seeds="1,2")
    assert len(calls) == 2  # the second run is tried after the first failed
    assert proc.returncode == 11, proc.stderr  # the first failure's own exit code
    assert "Traceback" not in proc.stderr and "a line after the error" in proc.stderr  # passed on
    assert proc.stderr.strip().splitlines()[-3:] == [
        "sweep.py: 2 of 2 runs failed:",
        "  train.seed=1 (exit code 11): error: seed 1 went wrong",
        "  train.seed=2 (exit code 12): error: seed 2 went wrong"]
    assert not (tmp_path / "w").exists()  # no run finished: no table, no empty folder


def test_sweep_tabulates_the_finished_runs_and_says_how_many_each_statistic_is_over(tmp_path):
    args = ["--grid", "finetune.learning_rate=1e-4,3e-4", "--grid", "train.seed=0,1,2"]
    proc, calls = sweep(tmp_path, *args, fail_seeds="2")
    assert len(calls) == 6 and proc.returncode == 12, proc.stderr
    assert proc.stderr.strip().splitlines()[-3:] == [
        "sweep.py: 2 of 6 runs failed:",
        "  finetune.learning_rate=1e-4,train.seed=2 (exit code 12): error: seed 2 went wrong",
        "  finetune.learning_rate=3e-4,train.seed=2 (exit code 12): error: seed 2 went wrong"]
    # two runs finished per setting; roc_auc only in one of them
    md = (tmp_path / "w" / "sweep.md").read_text()
    assert "| 1e-4 | 2 | 0.550 ± 0.071 | - | - | - | 0.900 (n=1) |" in md and md in proc.stdout
    csv_text = (tmp_path / "w" / "sweep.csv").read_text().splitlines()
    assert csv_text[0].startswith("finetune.learning_rate,seeds,accuracy_mean,accuracy_std,accuracy_n,")
    # re-running skips the finished runs and runs the failed ones again; all done: exit 0
    proc, calls = sweep(tmp_path, *args)
    assert proc.returncode == 0 and proc.stdout.count("skip (finished)") == 4, proc.stderr
    assert len(calls) == 6 + 2 and "runs failed" not in proc.stderr
    assert "| 3e-4 | 3 | 0.600 ± 0.100 | - | - | - | 0.900 ± 0.000 (n=2) |" in proc.stdout


def test_sweep_stops_at_ctrl_c_after_the_run_has_saved(tmp_path):
    proc, calls = sweep(tmp_path, "--grid", "train.seed=0,1", ctrl_c=True)
    assert proc.returncode == 130 and len(calls) == 1, proc.stderr  # seed 1 never started
    assert proc.stderr.strip().splitlines()[-3:] == [
        "sweep.py: interrupted (Ctrl-C); the remaining runs were not started",
        "sweep.py: 1 of 2 runs failed:",
        "  train.seed=0 (exit code 130): error: interrupted"]
