#!/usr/bin/env python3
"""Runs a jaxlm command on Google Kubernetes Engine: TPU slices or GPU hosts, as one JobSet.

    python launch/gke.py --tpu=v5e:4x4 [--nodes=2] --image=REGISTRY/jaxlm:tpu \\
        --config=configs/gpt/gpt2_small.py --workdir=gs://BUCKET/runs/small \\
        [--name=NAME] [--namespace=NS] [--queue=KUEUE_QUEUE] [--service-account=KSA] \\
        [--max-restarts=10] [--grace-period=300] [--command=jaxlm.main] [--dry-run] \\
        [-- --config.train.steps=1000]
    python launch/gke.py --gpus=8 --nodes=2 [--gpu-type=nvidia-h100-80gb] \\
        --image=REGISTRY/jaxlm:cuda12 --config=... --workdir=gs://...

The manifest is one JobSet (jobset.x-k8s.io/v1alpha2: the JobSet controller must run in the
cluster). Its one replicated job, "slice", has one child Job per TPU slice (--nodes slices of
--tpu=VERSION:TOPOLOGY, VERSION one of v4, v5e, v5p, v6e; more than one slice is multislice,
the slices joined over the data-centre network as config.mesh.dcn_data unless the overrides
set config.mesh.dcn_*), or, for GPUs, one Job of --nodes hosts with --gpus GPUs each. Each
pod is one jaxlm process:
  - TPU pods select their node pool by cloud.google.com/gke-tpu-accelerator and
    cloud.google.com/gke-tpu-topology and request all the host's chips (google.com/tpu);
    each slice gets a node pool of its own (JobSet's exclusive-topology annotation). GPU pods
    request nvidia.com/gpu (and select cloud.google.com/gke-accelerator with --gpu-type).
    v5e/v6e 2x4 is one host of 8 chips; --chips-per-host=4 makes it two hosts of 4, which
    multislice needs (GKE runs multislice on multi-host slices only).
  - `python -m jaxlm.main --config=... --workdir=... OVERRIDES` with, when there is more than
    one process, --config.distributed.coordinator_address=<name>-slice-0-0.<name>:8482 (the
    first pod of the first slice, by the DNS name of JobSet's headless service),
    num_processes = slices x hosts, and process_id = slice x hosts per slice + host, read
    from the pod's JobSet job index and Job completion index: the order JAX itself gives TPU
    hosts. The overrides may not set config.distributed.*.
  - The workdir, gs://BUCKET/PATH, is the run's resume point: every pod reads and writes it
    directly (jaxlm's gs:// workdirs: Orbax to Cloud Storage, the lease lock object; the
    image installs the gcs extra). The pods' Kubernetes service account (--service-account)
    needs read and write access to the bucket, e.g. through Workload Identity.
  - Preemption: SIGTERM (spot reclaim, eviction, maintenance) reaches jaxlm, which saves at the
    next step and exits 0; the pod then exits 143 all the same, so that the JobSet restarts
    every pod (up to --max-restarts times, crashes included) and the run resumes from the
    workdir. A bad config or flag (jaxlm's exit code 2) fails the JobSet at once.

--dry-run (anywhere, even after --) prints the manifest (YAML) and runs nothing; otherwise the
manifest goes to `kubectl apply -f -`. Nothing is written to disk either way. A bad flag (no
--image, an unknown TPU type or topology, --nodes that the topology cannot take, ...) stops
it with one line naming the flag, exit code 2, before anything is printed or applied. Every
value reaches jaxlm exactly as given: the pods pass them as separate arguments, never through
a shell's parsing, and Kubernetes' $(VAR) expansion is escaped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import subprocess
import sys

API_VERSION = "jobset.x-k8s.io/v1alpha2"
CONTAINER = "jaxlm"
COORDINATOR_PORT = 8482      # the port JAX's own GKE TPU detection uses for process 0
IMAGE_UID = 1000             # the Dockerfile's user: the pods run as it (runAsNonRoot)
EXIT_CODE_BAD_INPUT = 2      # jaxlm's exit code for a bad config or flag: restarting cannot help

# GKE's TPU node labels (cloud.google.com/gke-tpu-accelerator) and slice shapes, as GKE's
# "Plan TPUs" tables and xpk (AI-Hypercomputer/xpk, core/system_characteristics.py) list them.
# 2D (v5e, v6e): topology -> the chips per host it comes in (the first is the default).
TOPOLOGIES_2D = {"1x1": (1,), "2x2": (4,), "2x4": (8, 4), "4x4": (4,), "4x8": (4,),
                 "8x8": (4,), "8x16": (4,), "16x16": (4,)}
# 3D (v4, v5p): 2x2x1 (one host), 2x2x2, 2x2x4, 2x4x4, then any AxBxC of multiples of 4 up to
# `max_cubes` 4x4x4 cubes (v5p: A <= B <= C); 4 chips per host.
SMALL_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4")


@dataclasses.dataclass(frozen=True)
class TpuVersion:
    accelerator: str            # the node label value
    dims: int                   # 2: AxB, 3: AxBxC
    max_cubes: int = 0          # 3D only
    nondecreasing: bool = False


TPU_VERSIONS = {
    "v4": TpuVersion("tpu-v4-podslice", 3, max_cubes=64),
    "v5e": TpuVersion("tpu-v5-lite-podslice", 2),
    "v5p": TpuVersion("tpu-v5p-slice", 3, max_cubes=140, nondecreasing=True),
    "v6e": TpuVersion("tpu-v6e-slice", 2),
}
TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
GPUS_PER_HOST = (1, 2, 4, 8, 16)  # GKE's GPU machine shapes (g2, a2, a3, ...)

# Runs in every pod as `sh -c SCRIPT gke.py MODULE ARGS...` (POSIX sh): the arguments stay
# separate words ("$@"), never parsed by a shell. The environment comes from the manifest.
POD_SCRIPT = """\
# launch/gke.py: one jaxlm process of a JobSet.
term= child= code=0
trap 'term=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null' TERM
if [ "$JAXLM_PROCESSES" -gt 1 ]; then
  # Process id: slice (the JobSet job index) x hosts per slice + host (the Job's completion
  # index), the order JAX gives TPU hosts itself.
  rank=$((JAXLM_SLICE * JAXLM_HOSTS_PER_SLICE + JAXLM_HOST))
  set -- "$@" "--config.distributed.process_id=$rank"
  # Process 0's name resolves once its pod is up; wait for it, as JAX's GKE detection does.
  waited=0
  until [ -n "$term" ] || [ "$waited" -ge 300 ] ||
      getent hosts "$JAXLM_COORDINATOR_HOST" >/dev/null; do
    sleep 5
    waited=$((waited + 5))
  done
fi
if [ -z "$term" ]; then
  python -m "$@" &
  child=$!
  wait "$child"
  code=$?
  while kill -0 "$child" 2>/dev/null; do  # wait returns early when SIGTERM comes
    wait "$child"
    code=$?
  done
fi
if [ -n "$term" ]; then
  # jaxlm saved and exited 0; a pod that succeeded would end the run, so exit as killed.
  echo "gke.py: SIGTERM (preemption, eviction): exit 143; the JobSet restarts, resuming" >&2
  exit 143
fi
exit "$code"
"""


class LaunchError(Exception):
    """A bad flag: one line, naming it."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the pods run on: `replicas` Jobs (TPU slices) of `hosts` pods each."""
    replicas: int
    hosts: int
    resource: str                   # google.com/tpu or nvidia.com/gpu
    per_host: int                   # chips or GPUs each pod requests
    node_selector: dict
    tpu: bool


def tpu_shape(spec: str, nodes: int, chips_per_host: int | None) -> Shape:
    version, _, topology = spec.partition(":")
    version = TPU_ALIASES.get(version, version)
    if version not in TPU_VERSIONS or not topology:
        raise LaunchError(f"--tpu={spec}: expected VERSION:TOPOLOGY, VERSION one of "
                          f"{', '.join(TPU_VERSIONS)} (e.g. v5e:4x4, v5p:2x2x4)")
    tv = TPU_VERSIONS[version]
    if tv.dims == 2:
        if topology not in TOPOLOGIES_2D:
            raise LaunchError(f"--tpu={spec}: {version} has no {topology} topology; expected one "
                              f"of {', '.join(TOPOLOGIES_2D)}")
        shapes = TOPOLOGIES_2D[topology]
    else:
        dims = ([int(d) for d in topology.split("x")]
                if re.fullmatch(r"\d+x\d+x\d+", topology) else [])
        big = (dims and all(d >= 4 and d % 4 == 0 for d in dims)
               and dims[0] * dims[1] * dims[2] // 64 <= tv.max_cubes
               and (not tv.nondecreasing or dims == sorted(dims)))
        if topology not in SMALL_3D and not big:
            order = ", A <= B <= C" if tv.nondecreasing else ""
            raise LaunchError(f"--tpu={spec}: {version} has no {topology} topology; expected "
                              f"{', '.join(SMALL_3D)} or AxBxC of multiples of 4{order}, at most "
                              f"{tv.max_cubes * 64} chips")
        shapes = (4,)
    chips = 1
    for d in topology.split("x"):
        chips *= int(d)
    per_host = shapes[0] if chips_per_host is None else chips_per_host
    if per_host not in shapes:
        raise LaunchError(f"--chips-per-host={chips_per_host}: {version} {topology} comes with "
                          f"{' or '.join(map(str, shapes))} chips per host")
    hosts = chips // per_host
    if nodes > 1 and hosts == 1:
        hint = " (or --chips-per-host=4: two hosts)" if 4 in shapes and per_host != 4 else ""
        raise LaunchError(f"--nodes={nodes}: {version} {topology} is a single-host slice, and GKE "
                          f"runs multislice on multi-host slices only; use a larger topology{hint}")
    selector = {"cloud.google.com/gke-tpu-accelerator": tv.accelerator,
                "cloud.google.com/gke-tpu-topology": topology}
    return Shape(nodes, hosts, "google.com/tpu", per_host, selector, tpu=True)


def gpu_shape(gpus: int, nodes: int, gpu_type: str | None) -> Shape:
    if gpus not in GPUS_PER_HOST:
        raise LaunchError(f"--gpus={gpus}: expected the GPUs of one host: "
                          f"{', '.join(map(str, GPUS_PER_HOST))}")
    if gpu_type is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", gpu_type):
        raise LaunchError(f"--gpu-type={gpu_type}: expected a GKE accelerator name such as "
                          "nvidia-h100-80gb")
    selector = {"cloud.google.com/gke-accelerator": gpu_type} if gpu_type else {}
    return Shape(1, nodes, "nvidia.com/gpu", gpus, selector, tpu=False)


def check_workdir(workdir: str) -> str:
    """gs://BUCKET[/PATH], checked: the workdir every pod gets."""
    m = re.fullmatch(r"gs://([^/]*)(/.*)?", workdir, re.DOTALL)
    if not m:
        raise LaunchError(f"--workdir={workdir}: expected gs://BUCKET/PATH, a bucket every pod "
                          "reaches: the run's resume point after a restart")
    bucket, path = m.group(1), (m.group(2) or "").rstrip("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", bucket):
        raise LaunchError(f"--workdir={workdir}: {bucket!r} is not a bucket name (3-222 of "
                          "a-z, 0-9, '.', '-', '_')")
    if any(part in (".", "..") for part in path.split("/")):
        raise LaunchError(f"--workdir={workdir}: '.' and '..' are not folders in a bucket")
    return f"gs://{bucket}{path}"


def default_name(config: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", pathlib.PurePath(config).stem.lower()).strip("-")
    return f"jaxlm-{base}"[:40].rstrip("-") or "jaxlm"


def check_name(name: str, rjob: str, shape: Shape) -> None:
    """JobSet's own rule: the longest pod name, <name>-<rjob>-<job>-<pod>-xxxxx, must be a
    DNS-1035 label (at most 63 characters)."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise LaunchError(f"--name={name}: expected a DNS label (lowercase letters, digits and "
                          "'-', starting with a letter)")
    longest = f"{name}-{rjob}-{shape.replicas - 1}-{shape.hosts - 1}-xxxxx"
    if len(longest) > 63:
        raise LaunchError(f"--name={name}: too long; its pod names ({longest}) would pass 63 "
                          f"characters: at most {len(name) - (len(longest) - 63)} characters")


def k8s_literal(value: str) -> str:
    """`value` escaped for Kubernetes' expansion of command and args, which turns $(VAR) into
    the variable's value and $$ into $, and leaves any other $ as it is: so each $ before a $
    or a ( is doubled, and only those (the script stays readable)."""
    return re.sub(r"\$(?=[$(])", "$$", value)


def jaxlm_args(args, workdir: str, name: str, rjob: str, shape: Shape) -> list[str]:
    argv = [args.command, f"--config={args.config}", f"--workdir={workdir}"]
    processes = shape.replicas * shape.hosts
    if processes > 1:
        argv += [f"--config.distributed.coordinator_address={name}-{rjob}-0-0.{name}:"
                 f"{COORDINATOR_PORT}", f"--config.distributed.num_processes={processes}"]
    if shape.tpu and shape.replicas > 1 and not any(
            e.startswith("--config.mesh.dcn_") for e in args.overrides):
        argv.append(f"--config.mesh.dcn_data={shape.replicas}")
    return argv + args.overrides


def manifest(args) -> dict:
    """The JobSet for `args` (parsed flags); LaunchError for a bad one."""
    if not args.image:
        raise LaunchError("--image=... is required: the container image the pods run (build it "
                          "from the Dockerfile: see its header)")
    if re.search(r"\s", args.image):
        raise LaunchError(f"--image={args.image}: an image reference has no spaces")
    if not args.config:
        raise LaunchError("--config=... is required: the config file's path in the image, e.g. "
                          "configs/gpt/gpt2_small.py")
    if not args.workdir:
        raise LaunchError("--workdir=gs://BUCKET/PATH is required: where the run writes and "
                          "resumes from")
    if args.nodes < 1:
        raise LaunchError(f"--nodes={args.nodes}: expected >= 1 (TPU slices, or GPU hosts)")
    if (args.tpu is None) == (args.gpus is None):
        raise LaunchError("give one of --tpu=VERSION:TOPOLOGY (e.g. v5e:4x4) or --gpus=N "
                          "(per host)")
    if args.tpu is None and args.chips_per_host is not None:
        raise LaunchError("--chips-per-host is for --tpu only")
    if args.gpus is None and args.gpu_type is not None:
        raise LaunchError("--gpu-type is for --gpus only")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", args.command):
        raise LaunchError(f"--command={args.command}: expected a module such as jaxlm.train")
    if args.max_restarts < 0 or args.grace_period < 0:
        flag = "--max-restarts" if args.max_restarts < 0 else "--grace-period"
        raise LaunchError(f"{flag}: expected a number >= 0")
    for e in args.overrides:
        if not e.startswith("--config.") or "=" not in e:
            raise LaunchError(f"after --, only --config.FIELD=VALUE overrides are passed on, "
                              f"not {e}")
        if e.startswith("--config.distributed."):
            raise LaunchError(f"{e}: config.distributed is set by the launcher (one process "
                              "per pod)")
    for flag, value in (("--namespace", args.namespace), ("--queue", args.queue),
                        ("--service-account", args.service_account)):
        if value is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value):
            raise LaunchError(f"{flag}={value}: expected a Kubernetes name")
    shape = (tpu_shape(args.tpu, args.nodes, args.chips_per_host) if args.tpu is not None
             else gpu_shape(args.gpus, args.nodes, args.gpu_type))
    rjob = "slice"
    name = args.name if args.name is not None else default_name(args.config)
    check_name(name, rjob, shape)
    workdir = check_workdir(args.workdir)
    processes = shape.replicas * shape.hosts
    count = str(shape.per_host)  # a Kubernetes quantity: a string

    container = {
        "name": CONTAINER,
        "image": args.image,
        "command": [k8s_literal(a) for a in ("sh", "-c", POD_SCRIPT, "gke.py")],
        "args": [k8s_literal(a) for a in jaxlm_args(args, workdir, name, rjob, shape)],
        "env": [
            {"name": "JAXLM_SLICE", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
            {"name": "JAXLM_HOST", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            {"name": "JAXLM_HOSTS_PER_SLICE", "value": str(shape.hosts)},
            {"name": "JAXLM_PROCESSES", "value": str(processes)},
            {"name": "JAXLM_COORDINATOR_HOST", "value": f"{name}-{rjob}-0-0.{name}"},
        ],
        "ports": [{"containerPort": COORDINATOR_PORT, "name": "coordinator"}],
        "resources": {"requests": {shape.resource: count}, "limits": {shape.resource: count}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID},
    }
    pod_spec = {
        "restartPolicy": "Never",  # a failed pod fails its Job; the JobSet restarts them all
        "terminationGracePeriodSeconds": args.grace_period,
        "nodeSelector": shape.node_selector,
        "tolerations": [{"key": shape.resource, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],  # collectives' shared memory
    }
    if not shape.node_selector:
        del pod_spec["nodeSelector"]
    if args.service_account:
        pod_spec["serviceAccountName"] = args.service_account
    job_spec = {
        "completionMode": "Indexed",
        "parallelism": shape.hosts,
        "completions": shape.hosts,
        "backoffLimit": 0,
        "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": CONTAINER, "operator": "In", "values": [EXIT_CODE_BAD_INPUT]}}]},
        "template": {"spec": pod_spec},
    }
    metadata = {"name": name, "labels": {"app.kubernetes.io/name": "jaxlm"}}
    if args.namespace:
        metadata["namespace"] = args.namespace
    if args.queue:
        metadata["labels"]["kueue.x-k8s.io/queue-name"] = args.queue
    if shape.tpu:  # one node pool (one ICI domain) per slice
        metadata["annotations"] = {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    return {
        "apiVersion": API_VERSION,
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "failurePolicy": {
                "maxRestarts": args.max_restarts,
                # The Job failed by its podFailurePolicy: jaxlm refused its input.
                "rules": [{"name": "badInput", "action": "FailJobSet",
                           "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "replicatedJobs": [{"name": rjob, "replicas": shape.replicas,
                                "template": {"spec": job_spec}}],
        },
    }


# ----------------------------------------------------------------------------- YAML

_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, dict) and not v:
        return "{}"
    if isinstance(v, list) and not v:
        return "[]"
    return json.dumps(v)  # a YAML double-quoted scalar: JSON's string syntax is a subset


def _key(k: str) -> str:
    return k if _PLAIN_KEY.fullmatch(k) and k.lower() not in _YAML_WORDS else json.dumps(k)


def _block(s: str) -> str | None:
    """The literal block indicator (| or |-) under which `s` reads back unchanged, if any:
    several lines of printable ASCII, none ending in a space, the first not indented, and at
    most one newline at the end."""
    body, indicator = (s[:-1], "|") if s.endswith("\n") else (s, "|-")
    lines = body.split("\n")
    ok = (len(lines) > 1 and all(" " <= c <= "~" for c in body.replace("\n", ""))
          and lines[0] != "" and not lines[0].startswith(" ") and lines[-1] != ""
          and not any(line.endswith(" ") for line in lines))
    return indicator if ok else None


def _value(v, indent: int) -> list[str]:
    """`v` after a `key:` or `-`: the rest of that line, then the lines below it."""
    if isinstance(v, (dict, list)) and v:
        return [""] + _yaml(v, indent)
    if isinstance(v, str) and _block(v):
        lines = v[:-1].split("\n") if v.endswith("\n") else v.split("\n")
        return [f" {_block(v)}"] + [" " * indent + line if line else "" for line in lines]
    return [" " + _scalar(v)]


def _yaml(v, indent: int = 0) -> list[str]:
    pad = " " * indent
    out = []
    if isinstance(v, dict):
        for k, x in v.items():
            first, *rest = _value(x, indent + 2)
            out += [f"{pad}{_key(k)}:{first}", *rest]
        return out
    for x in v:
        if isinstance(x, dict) and x:  # "- " then the mapping's first key on the same line
            first, *rest = _yaml(x, indent + 2)
            out += [f"{pad}- {first[indent + 2:]}", *rest]
        else:
            first, *rest = _value(x, indent + 2)
            out += [f"{pad}-{first}", *rest]
    return out


def to_yaml(doc: dict) -> str:
    """Block-style YAML of plain dicts, lists, strings, ints and bools (no PyYAML needed)."""
    return "\n".join(_yaml(doc)) + "\n"


# ----------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise LaunchError(message)


def parse(argv: list[str]) -> argparse.Namespace:
    # --dry-run counts wherever it stands, even after "--": a misplaced one must not launch.
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    overrides = []
    if "--" in argv:
        argv, overrides = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = _Parser(prog="launch/gke.py", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--tpu", metavar="VERSION:TOPOLOGY", help="v4, v5e, v5p or v6e, e.g. v5e:4x4")
    p.add_argument("--gpus", type=int, metavar="N", help="GPUs per host")
    p.add_argument("--nodes", type=int, default=1, help="TPU slices, or GPU hosts (default 1)")
    p.add_argument("--chips-per-host", type=int, help="v5e/v6e 2x4: 8 (one host) or 4 (two)")
    p.add_argument("--gpu-type",
                   help="node label cloud.google.com/gke-accelerator, e.g. nvidia-h100-80gb")
    p.add_argument("--image", help="the container image (see the Dockerfile)")
    p.add_argument("--config", help="the config file's path in the image")
    p.add_argument("--workdir", metavar="gs://BUCKET/PATH")
    p.add_argument("--name", help="the JobSet's name (default: jaxlm-<config name>)")
    p.add_argument("--namespace")
    p.add_argument("--queue", help="Kueue LocalQueue (label kueue.x-k8s.io/queue-name)")
    p.add_argument("--service-account", help="Kubernetes service account with access to the bucket")
    p.add_argument("--max-restarts", type=int, default=10,
                   help="JobSet restarts after preemptions and crashes (default 10)")
    p.add_argument("--grace-period", type=int, default=300,
                   help="seconds from SIGTERM to SIGKILL, to save (default 300)")
    p.add_argument("--command", default="jaxlm.main", help="the module each pod runs")
    p.add_argument("--dry-run", action="store_true", help="print the manifest, apply nothing")
    args = p.parse_args(argv)
    args.dry_run, args.overrides = dry_run, overrides
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else list(argv))
        doc = manifest(args)
    except LaunchError as e:
        line = str(e).replace("\n", "\\n")  # one line, whatever the value it quotes holds
        print(f"gke.py: {line}", file=sys.stderr)
        return 2
    text = to_yaml(doc)
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    try:
        code = subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True).returncode
    except FileNotFoundError:
        print("gke.py: kubectl is not on PATH: install it (gcloud components install kubectl), "
              "or print the manifest with --dry-run and apply it yourself", file=sys.stderr)
        return 2
    if code == 0:
        name, ns = doc["metadata"]["name"], f" -n {args.namespace}" if args.namespace else ""
        print(f"gke.py: status: kubectl get jobset {name}{ns}; logs of process 0: kubectl logs "
              f"-f{ns} -l jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/job-index=0,"
              "batch.kubernetes.io/job-completion-index=0", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
