"""launch/gke.py: the JobSet manifests it prints are valid (JobSet's published schema, the
Kubernetes client's typed models, the checks JobSet's webhook and the API server add), every
value reaches jaxlm in the pod as written, a bad flag stops it with one line, and only a run
without --dry-run calls kubectl. No cluster, no network."""

import copy
import importlib.util
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO

jsonschema = pytest.importorskip("jsonschema", reason="in the test extra: pip install -e '.[test]'")
k8s = pytest.importorskip("kubernetes.client", reason="in the test extra: pip install -e '.[test]'")

GKE = REPO / "launch" / "gke.py"
SCHEMA = REPO / "third_party" / "jobset" / "jobset.x-k8s.io_jobsets.v1alpha2.schema.json"
# A value that breaks naive quoting in every shell, and Kubernetes' $(VAR) expansion.
NASTY = ("/tmp/run dir;touch PWNED $(touch PWNED) `touch PWNED` 'q' \"d\" \\ $HOME $$ "
         "$(JAXLM_HOST) $(\nline2")
BASE = ["--image=us-docker.pkg.dev/p/r/jaxlm:tpu", "--config=configs/gpt/gpt2_small.py",
        "--workdir=gs://my-bucket/runs/small"]


def _load_gke():
    spec = importlib.util.spec_from_file_location("launch_gke", GKE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gke = _load_gke()


def _stub(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def launch(tmp_path, *args, kubectl_exit=0, kubectl=True):
    """Runs launch/gke.py in an empty folder with a fake `kubectl` first on PATH that records
    its arguments and stdin. Returns the process and the recorded calls [(argv, stdin)]."""
    bin_dir, work = tmp_path / "bin", tmp_path / "cwd"
    bin_dir.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    log = tmp_path / "kubectl.log"
    if kubectl:
        _stub(bin_dir / "kubectl", f'printf "%s\\0" "$@" >> {log}; printf "\\1" >> {log}; '
              f'cat >> {log}; printf "\\2" >> {log}; exit {kubectl_exit}\n')
    proc = subprocess.run([sys.executable, str(GKE), *args], capture_output=True, text=True,
                          cwd=work, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin" if kubectl
                               else str(bin_dir)})  # no kubectl anywhere on PATH
    calls = []
    if log.exists():
        for call in log.read_bytes().split(b"\2")[:-1]:
            argv, stdin = call.split(b"\1")
            calls.append(([a.decode() for a in argv.split(b"\0")[:-1]], stdin.decode()))
    assert not any(work.iterdir()), "the launcher wrote files"
    return proc, calls


def dry_run(tmp_path, *args) -> dict:
    proc, calls = launch(tmp_path, *args, "--dry-run")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert calls == []
    return yaml.safe_load(proc.stdout)


# ----------------------------------------------------------------------------- validation

def _strict(schema):
    """The schema as the API server applies it with strict field validation (kubectl's
    default): an object with declared properties takes no others."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items share their key fields (env names, ports)."""
    if validator.is_type(instance, "array"):
        seen = [tuple(item.get(k) for k in keys) for item in instance]
        for key in {k for k in seen if seen.count(k) > 1}:
            yield jsonschema.ValidationError(f"duplicate list-map key {dict(zip(keys, key))}")


def _list_type(validator, kind, instance, schema):
    """x-kubernetes-list-type: set: no item twice."""
    if kind == "set" and validator.is_type(instance, "array"):
        if len(set(map(json.dumps, instance))) < len(instance):
            yield jsonschema.ValidationError("duplicate item in a list-type set")


_FORMATS = jsonschema.FormatChecker()
for _bits in (32, 64):
    _FORMATS.checks(f"int{_bits}")(
        lambda v, b=_bits: not isinstance(v, int) or -2**(b - 1) <= v < 2**(b - 1))
_Validator = jsonschema.validators.extend(jsonschema.Draft4Validator, {
    "x-kubernetes-list-map-keys": _list_map_keys, "x-kubernetes-list-type": _list_type})
VALIDATOR = _Validator(_strict(json.loads(SCHEMA.read_text())), format_checker=_FORMATS)


def _round_trip(model, data):
    """`data` through the Kubernetes client's typed model (strict types, required fields)
    and back: an unknown field would be dropped, so the two would differ."""
    def drop_none(x):
        if isinstance(x, dict):
            return {k: drop_none(v) for k, v in x.items() if v is not None}
        return [drop_none(v) for v in x] if isinstance(x, list) else x
    assert drop_none(model.from_dict(copy.deepcopy(data)).to_dict(serialize=True)) == data


DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def check_manifest(doc):
    """Everything that can be checked without a cluster."""
    errors = sorted(VALIDATOR.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    _round_trip(k8s.V1ObjectMeta, doc["metadata"])  # the schema leaves the top metadata open
    spec = doc["spec"]
    # JobSet's webhook (pkg/webhooks/jobset_webhook.go, v0.12.0)
    for rule in spec["failurePolicy"]["rules"]:
        assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", rule["name"])
        assert set(rule.get("onJobFailureReasons", [])) <= {
            "BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes",
            "MaxFailedIndexesExceeded", "PodFailurePolicy"}
    for rjob in spec["replicatedJobs"]:
        job = rjob["template"]["spec"]
        _round_trip(k8s.V1JobSpec, job)
        longest_pod = (f"{doc['metadata']['name']}-{rjob['name']}-{rjob['replicas'] - 1}-"
                       f"{job['completions'] - 1}-abcde")
        assert DNS_1035.fullmatch(longest_pod) and len(longest_pod) <= 63, longest_pod
        # The API server's Job and Pod validation, beyond any schema
        pod = job["template"]["spec"]
        containers = {c["name"]: c for c in pod["containers"]}
        assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
        for rule in job["podFailurePolicy"]["rules"]:
            codes = rule["onExitCodes"]
            assert codes["containerName"] in containers and 0 not in codes["values"]
        assert job["completionMode"] == "Indexed" and job["parallelism"] <= job["completions"]
        volumes = {v["name"] for v in pod["volumes"]}
        for c in containers.values():
            assert {m["name"] for m in c["volumeMounts"]} <= volumes
            assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", e["name"]) for e in c["env"])
            for e in c["env"]:  # the downward API takes labels and annotations by key
                path = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                assert path is None or re.fullmatch(
                    r"metadata\.(annotations|labels)\['[^']+'\]", path)
            res = c["resources"]  # extended resources: integers, requests == limits
            assert res["requests"] == res["limits"]
            assert all(v.isdigit() for v in res["limits"].values())
            assert all(len(p["name"]) <= 15 for p in c["ports"])


def container(doc):
    (rjob,) = doc["spec"]["replicatedJobs"]
    (c,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    return c


# ----------------------------------------------------------------------------- manifests

def test_tpu_single_slice(tmp_path):
    doc = dry_run(tmp_path, "--tpu=v5e:4x4", *BASE)
    check_manifest(doc)
    (rjob,) = doc["spec"]["replicatedJobs"]
    job, pod = rjob["template"]["spec"], rjob["template"]["spec"]["template"]["spec"]
    assert rjob["replicas"] == 1 and job["parallelism"] == job["completions"] == 4  # 16 chips / 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "4x4"}
    assert container(doc)["resources"]["limits"] == {"google.com/tpu": "4"}
    assert doc["metadata"]["annotations"] == {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    assert doc["metadata"]["name"] == "jaxlm-gpt2-small"
    assert container(doc)["args"] == [
        "jaxlm.main", "--config=configs/gpt/gpt2_small.py", "--workdir=gs://my-bucket/runs/small",
        "--config.distributed.coordinator_address="
        "jaxlm-gpt2-small-slice-0-0.jaxlm-gpt2-small:8482",
        "--config.distributed.num_processes=4"]
    # the pods reach the bucket themselves (no mount), as the image's non-root user
    assert [v["name"] for v in pod["volumes"]] == ["dshm"]
    assert container(doc)["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000}
    assert doc["spec"]["failurePolicy"]["maxRestarts"] == 10 and job["backoffLimit"] == 0


def test_tpu_multislice_spans_the_data_axis_over_the_slices(tmp_path):
    doc = dry_run(tmp_path, "--tpu=v5p:2x2x4", "--nodes=3", "--name=big", *BASE, "--",
                  "--config.train.steps=5")
    check_manifest(doc)
    (rjob,) = doc["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 3 and rjob["template"]["spec"]["completions"] == 4
    args = container(doc)["args"]
    assert args[3:] == ["--config.distributed.coordinator_address=big-slice-0-0.big:8482",
                        "--config.distributed.num_processes=12", "--config.mesh.dcn_data=3",
                        "--config.train.steps=5"]
    # overrides that place the slices themselves are left alone
    doc = dry_run(tmp_path, "--tpu=v5p:2x2x4", "--nodes=2", *BASE, "--", "--config.mesh.dcn_fsdp=2")
    assert container(doc)["args"][-2:] == ["--config.distributed.num_processes=8",
                                           "--config.mesh.dcn_fsdp=2"]


def test_single_host_tpu_runs_one_process(tmp_path):
    doc = dry_run(tmp_path, "--tpu=v6e:2x4", *BASE)
    check_manifest(doc)
    assert container(doc)["args"][3:] == []  # no coordinator for one process
    assert container(doc)["resources"]["limits"] == {"google.com/tpu": "8"}
    doc = dry_run(tmp_path, "--tpu=v6e:2x4", "--chips-per-host=4", "--nodes=2", *BASE)
    check_manifest(doc)
    assert doc["spec"]["replicatedJobs"][0]["template"]["spec"]["completions"] == 2


def test_gpu_hosts(tmp_path):
    doc = dry_run(tmp_path, "--gpus=8", "--nodes=2", "--gpu-type=nvidia-h100-80gb",
                  "--queue=team-a", "--namespace=ml", "--service-account=jaxlm-runner",
                  "--max-restarts=3", *BASE)
    check_manifest(doc)
    (rjob,) = doc["spec"]["replicatedJobs"]
    pod = rjob["template"]["spec"]["template"]["spec"]
    assert rjob["replicas"] == 1 and rjob["template"]["spec"]["completions"] == 2
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert container(doc)["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert pod["serviceAccountName"] == "jaxlm-runner" and doc["metadata"]["namespace"] == "ml"
    assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "annotations" not in doc["metadata"]  # no exclusive node pools for GPUs
    assert doc["spec"]["failurePolicy"]["maxRestarts"] == 3
    assert "--config.distributed.num_processes=2" in container(doc)["args"]


def test_the_checks_catch_what_a_cluster_would_refuse(tmp_path):
    """The validation above is not vacuous."""
    doc = dry_run(tmp_path, "--tpu=v5e:4x4", *BASE)
    for path, value in [(("spec", "replicatedJobs", 0, "template", "spec", "parallelizm"), 4),
                        (("spec", "failurePolicy", "rules", 0, "action"), "Retry"),
                        (("spec", "replicatedJobs", 0, "replicas"), "1")]:
        bad = copy.deepcopy(doc)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(AssertionError):
            check_manifest(bad)
    bad = copy.deepcopy(doc)
    container(bad)["resources"]["limits"]["google.com/tpu"] = 4  # a quantity is a string
    with pytest.raises(ValueError):  # pydantic.ValidationError
        _round_trip(k8s.V1JobSpec, bad["spec"]["replicatedJobs"][0]["template"]["spec"])
    bad = copy.deepcopy(doc)
    container(bad)["env"].append({"name": "JAXLM_HOST", "value": "1"})
    with pytest.raises(AssertionError, match="duplicate"):
        check_manifest(bad)


# ----------------------------------------------------------------------------- in the pod

def k8s_expand(value, env):
    """Kubernetes' expansion of command and args (k8s.io/kubernetes
    third_party/forked/golang/expansion: Expand, tryReadVariableName, MappingFuncFor)."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2:end]
                    out.append(env.get(name, f"$({name})"))
                    i = end + 1
                    continue
                out.append("$(")
                i += 2
                continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(value[i])
        i += 1
    return "".join(out)


def test_k8s_literal_survives_the_expansion():
    env = {"A": "expanded", "JAXLM_HOST": "2"}
    for n in range(7):
        for chars in itertools.product("$()A", repeat=n):
            s = "".join(chars)
            assert k8s_expand(gke.k8s_literal(s), env) == s, s
    assert k8s_expand("$(A) $$(A) $A $", env) == "expanded $(A) $A $"  # the emulation itself


def pod_process(tmp_path, doc, *, slice_index, host, python_body, getent="exit 0\n"):
    """Starts the container's command as a pod would: Kubernetes' expansion of command and
    args, the environment (the downward API's values given), `python` and `getent` stubbed."""
    c = container(doc)
    env = {}
    for e in c["env"]:
        env[e["name"]] = e["value"] if "value" in e else {
            "metadata.annotations['jobset.sigs.k8s.io/job-index']": str(slice_index),
            "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(host),
        }[e["valueFrom"]["fieldRef"]["fieldPath"]]
    argv = [k8s_expand(a, env) for a in c["command"] + c["args"]]
    bin_dir = tmp_path / "podbin"
    bin_dir.mkdir(exist_ok=True)
    _stub(bin_dir / "python", python_body)
    _stub(bin_dir / "getent", getent)
    return subprocess.Popen(argv, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**env, "PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path)})


RECORD = 'for a in "$@"; do printf "%s\\0" "$a"; done > "$OUT/argv"\n'


def test_every_value_reaches_jaxlm_as_written(tmp_path):
    """Config, workdir and overrides go through YAML, Kubernetes' $(VAR) expansion and the
    pod's shell unchanged, and nothing in them runs."""
    doc = dry_run(tmp_path, "--tpu=v5p:2x2x4", "--nodes=2", f"--config={NASTY}",
                  f"--workdir=gs://my-bucket/{NASTY}", "--image=img", "--",
                  f"--config.data.manual_dir={NASTY}", "--config.train.steps=5")
    check_manifest(doc)
    proc = pod_process(tmp_path, doc, slice_index=1, host=2, python_body=RECORD + "exit 0\n")
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    argv = (tmp_path / "argv").read_bytes().split(b"\0")[:-1]
    name = doc["metadata"]["name"]  # from the config's file name
    assert [a.decode() for a in argv] == [
        "-m", "jaxlm.main", f"--config={NASTY}", f"--workdir=gs://my-bucket/{NASTY}",
        f"--config.distributed.coordinator_address={name}-slice-0-0.{name}:8482",
        "--config.distributed.num_processes=8", "--config.mesh.dcn_data=2",
        f"--config.data.manual_dir={NASTY}", "--config.train.steps=5",
        "--config.distributed.process_id=6"]  # slice 1 x 4 hosts + host 2
    assert not list(tmp_path.rglob("PWNED")) and not list(REPO.glob("PWNED"))


@pytest.mark.parametrize("code", [0, 1, 2])
def test_the_pod_exits_with_jaxlm_s_code(tmp_path, code):
    doc = dry_run(tmp_path, "--gpus=8", "--nodes=2", *BASE)
    proc = pod_process(tmp_path, doc, slice_index=0, host=1, python_body=RECORD + f"exit {code}\n")
    assert proc.wait(timeout=30) == code
    assert (tmp_path / "argv").read_bytes().endswith(b"--config.distributed.process_id=1\0")


def test_a_preempted_pod_lets_jaxlm_save_then_fails_so_the_jobset_restarts(tmp_path):
    """SIGTERM reaches jaxlm, which saves and exits 0; the pod exits 143 so that its Job
    fails (not completes) and the JobSet restarts everything."""
    doc = dry_run(tmp_path, "--tpu=v5e:4x4", *BASE)
    saving = ('trap \'echo saved > "$OUT/saved"; exit 0\' TERM\n: > "$OUT/ready"\n'
              'while :; do sleep 0.05; done\n')
    proc = pod_process(tmp_path, doc, slice_index=0, host=0, python_body=saving)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert (tmp_path / "saved").read_text() == "saved\n"
    assert "SIGTERM" in proc.stderr.read()
    rules = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"]
    assert rules == [{"action": "FailJob", "onExitCodes": {"containerName": "jaxlm",
                                                           "operator": "In", "values": [2]}}]


# ----------------------------------------------------------------------------- the command line

def test_without_dry_run_the_manifest_goes_to_kubectl_apply(tmp_path):
    printed = dry_run(tmp_path, "--tpu=v5e:4x4", *BASE)
    proc, calls = launch(tmp_path, "--tpu=v5e:4x4", *BASE)
    assert proc.returncode == 0, proc.stderr
    assert [argv for argv, _ in calls] == [["apply", "-f", "-"]]
    assert yaml.safe_load(calls[0][1]) == printed
    assert "kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=jaxlm-gpt2-small" in proc.stderr
    (tmp_path / "fail").mkdir()
    proc, calls = launch(tmp_path / "fail", "--tpu=v5e:4x4", *BASE, kubectl_exit=1)
    assert proc.returncode == 1 and len(calls) == 1  # kubectl's own exit code


def test_dry_run_after_double_dash_still_applies_nothing(tmp_path):
    proc, calls = launch(tmp_path, "--tpu=v5e:4x4", *BASE, "--", "--config.train.steps=1",
                         "--dry-run")
    assert proc.returncode == 0 and calls == [], proc.stderr
    assert "--config.train.steps=1" in proc.stdout and "--dry-run" not in proc.stdout


def test_help(tmp_path):
    proc, calls = launch(tmp_path, "--help")
    assert proc.returncode == 0 and calls == [] and "JobSet" in proc.stdout


def test_missing_kubectl_is_one_line(tmp_path):
    proc, _ = launch(tmp_path, "--tpu=v5e:4x4", *BASE, kubectl=False)
    assert proc.returncode == 2 and proc.stderr.startswith("gke.py: kubectl is not on PATH")
    assert len(proc.stderr.strip().splitlines()) == 1


WITHOUT_IMAGE = [a for a in BASE if not a.startswith("--image")]


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("args,message", [
    (["--tpu=v5e:4x4", *WITHOUT_IMAGE], "--image=... is required"),
    (["--tpu=v5e:4x4", "--image=", *WITHOUT_IMAGE], "--image=... is required"),
    (["--tpu=v3:2x2", *BASE],
     "--tpu=v3:2x2: expected VERSION:TOPOLOGY, VERSION one of v4, v5e, v5p, v6e"),
    (["--tpu=v5e", *BASE], "--tpu=v5e: expected VERSION:TOPOLOGY"),
    (["--tpu=v5e:3x3", *BASE], "--tpu=v5e:3x3: v5e has no 3x3 topology"),
    (["--tpu=v4:3x4x4", *BASE], "--tpu=v4:3x4x4: v4 has no 3x4x4 topology"),
    (["--tpu=v5p:8x4x4", *BASE], "A <= B <= C"),
    (["--tpu=v5e:2x2", "--nodes=2", *BASE], "--nodes=2: v5e 2x2 is a single-host slice"),
    (["--tpu=v6e:2x4", "--nodes=2", *BASE], "(or --chips-per-host=4: two hosts)"),
    (["--tpu=v5e:4x4", "--chips-per-host=8", *BASE], "--chips-per-host=8: v5e 4x4 comes with 4"),
    (["--tpu=v5e:4x4", "--nodes=0", *BASE], "--nodes=0: expected >= 1"),
    (["--tpu=v5e:4x4", "--nodes=two", *BASE], "argument --nodes: invalid int value: 'two'"),
    (["--tpu=v5e:4x4", "--gpus=8", *BASE], "give one of --tpu"),
    ([*BASE], "give one of --tpu"),
    (["--gpus=3", *BASE], "--gpus=3: expected the GPUs of one host"),
    (["--gpus=8", "--chips-per-host=4", *BASE], "--chips-per-host is for --tpu only"),
    (["--tpu=v5e:4x4", *BASE[:2], "--workdir=runs/small"],
     "--workdir=runs/small: expected gs://BUCKET/PATH"),
    (["--tpu=v5e:4x4", *BASE[:2], "--workdir=runs\nsmall"], "--workdir=runs\\nsmall: expected"),
    (["--tpu=v5e:4x4", *BASE[:2], "--workdir=gs://My_Bucket/x"], "is not a bucket name"),
    (["--tpu=v5e:4x4", *BASE[:2], "--workdir=gs://b-1/x/../../etc"],
     "are not folders in a bucket"),
    (["--tpu=v5e:4x4", *BASE[:2]], "--workdir=gs://BUCKET/PATH is required"),
    (["--tpu=v5e:4x4", "--name=" + "x" * 60, *BASE], "too long"),
    (["--tpu=v5e:4x4", "--name=Big_Run", *BASE], "--name=Big_Run: expected a DNS label"),
    (["--tpu=v5e:4x4", *BASE, "--", "--steps=3"], "only --config.FIELD=VALUE overrides"),
    (["--tpu=v5e:4x4", *BASE, "--", "--config.distributed.process_id=1"],
     "config.distributed is set by the launcher"),
    (["--tpu=v5e:4x4", "--bogus", *BASE], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_naming_the_flag_and_nothing_is_applied(tmp_path, args, message, dry):
    at = args.index("--") if "--" in args else len(args)
    argv = [*args[:at], *["--dry-run"] * dry, *args[at:]]
    proc, calls = launch(tmp_path, *argv)
    assert proc.returncode == 2 and proc.stdout == "" and calls == []
    assert proc.stderr.startswith("gke.py: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- YAML

@pytest.mark.parametrize("value", [
    NASTY, "", " lead", "trail ", "yes", "No", "null", "~", "0x10", "1e3", "- x", "x: y", "#c",
    "a\n", "a\n\n", "\na", "a\n b", "tab\there", "é ü 日本", "\u2028", "a\r\nb", "@x", "!x",
    "*x", "%x", "'", '"', "\\", "a\nb\n", " |", "4", "true", "[1]", "{a: 1}",
])
def test_the_yaml_reads_back_exactly(value):
    doc = {"k": value, "yes": [value, {"m": value, "n": [value]}], "e": {}, "l": [], "i": 7,
           "b": False, "x.io/y-z": value}
    assert yaml.safe_load(gke.to_yaml(doc)) == doc


def test_the_yaml_reads_back_exactly_for_random_strings():
    rng = random.Random(0)
    alphabet = " \n\t#:-|>'\"\\$()[]{},&*!%@`~?ab1é\u2028\r"
    for _ in range(500):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        doc = {"k": value, "l": [value, {"m": value}]}
        assert yaml.safe_load(gke.to_yaml(doc)) == doc, repr(value)
