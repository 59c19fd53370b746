"""The Dockerfile, without Docker: its install lines install requirements.txt with the tested
jax for each accelerator, pinned, then the project; it runs as a non-root user; and
.dockerignore keeps what the build needs. The install line is run by sh with pip stubbed,
so what pip would be asked to install is checked word for word."""

import importlib.metadata
import re
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO
from packaging.requirements import Requirement

DOCKERFILE = REPO / "Dockerfile"


def instructions():
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments out."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):  # Docker drops the backslash and the newline
            current = current[:-1]
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def args():
    """ARG defaults, before and after FROM."""
    found = {}
    for word, rest in instructions():
        if word == "ARG":
            name, _, value = rest.partition("=")
            found[name] = value
    return found


def run_lines():
    return [rest for word, rest in instructions() if word == "RUN"]


def jax_requirement() -> Requirement:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and Requirement(line).name == "jax":
            return Requirement(line)
    raise AssertionError("requirements.txt names no jax")


def test_the_image_pins_the_jax_and_python_the_tests_ran_with():
    """The image runs what the tests ran: update JAX_VERSION / PYTHON_VERSION in the
    Dockerfile when the environment the tests run in moves to another jax or Python."""
    a = args()
    assert a["JAX_VERSION"] == importlib.metadata.version("jax"), (
        f"Dockerfile JAX_VERSION={a['JAX_VERSION']}, tests ran with jax "
        f"{importlib.metadata.version('jax')}")
    assert jax_requirement().specifier.contains(a["JAX_VERSION"]), "not in requirements.txt"
    assert a["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(f"{a['PYTHON_VERSION']}.0")
    assert ("FROM", "python:${PYTHON_VERSION}-slim") in instructions()


def _install_line():
    (line,) = [r for r in run_lines() if "-r requirements.txt" in r]
    return line


@pytest.mark.parametrize("accelerator", ["cpu", "cuda12", "tpu"])
def test_the_install_line_asks_pip_for_the_requirements_and_the_pinned_jax(tmp_path, accelerator):
    """Run as the build runs it (sh -c, the ARGs in the environment), with pip stubbed."""
    a = args()
    assert accelerator in (importlib.metadata.metadata("jax").get_all("Provides-Extra") or [])
    stub = tmp_path / "pip"
    stub.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > {tmp_path}/argv\n')
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "ACCELERATOR": accelerator,
           "JAX_VERSION": a["JAX_VERSION"], "LIBTPU_FIND_LINKS": a["LIBTPU_FIND_LINKS"]}
    subprocess.run(["sh", "-c", _install_line()], check=True, env=env, cwd=tmp_path, timeout=30)
    argv = [w.decode() for w in (tmp_path / "argv").read_bytes().split(b"\0")[:-1]]
    links = [f"--find-links={a['LIBTPU_FIND_LINKS']}"] if accelerator == "tpu" else []
    gcs = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gcs"]  # gs:// workdirs, which launch/gke.py gives the pods
    assert argv == ["install", *links, "-r", "requirements.txt",
                    f"jax[{accelerator}]=={a['JAX_VERSION']}", *gcs]
    assert a["LIBTPU_FIND_LINKS"] == ("https://storage.googleapis.com/jax-releases/"
                                      "libtpu_releases.html")


def test_an_unknown_accelerator_stops_the_build(tmp_path):
    proc = subprocess.run(["sh", "-c", _install_line()], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "ACCELERATOR": "rocm", "JAX_VERSION": "0"})
    assert proc.returncode == 2 and "ACCELERATOR=rocm: expected cpu, cuda12 or tpu" in proc.stderr


def test_the_project_installs_on_the_requirements_it_declares():
    """`pip install --no-deps .` after requirements.txt is complete: the project's
    dependencies are that file (pyproject's dynamic dependencies), and pip check confirms."""
    dynamic = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"] == {"file": ["requirements.txt"]}
    steps = instructions()
    order = [i for i, (word, rest) in enumerate(steps) if (word, rest) in {
        ("COPY", "requirements.txt ./"), ("COPY", ". .")}]
    install = steps.index(("RUN", _install_line()))
    project = steps.index(("RUN", "pip install --no-deps . && pip check"))
    assert order[0] < install < order[1] < project  # requirements' layer is cached apart


def test_the_image_runs_as_a_non_root_user():
    steps = instructions()
    users = [rest for word, rest in steps if word == "USER"]
    assert users == ["1000:1000"]  # numeric: Kubernetes' runAsNonRoot can check it
    assert any("useradd --uid 1000 --gid 1000" in r for r in run_lines())
    assert steps[-1] == ("CMD", '["python", "-m", "jaxlm"]')
    # launch/gke.py runs the pods as this user
    assert "IMAGE_UID = 1000 " in (REPO / "launch" / "gke.py").read_text()


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: a pattern matches the path or a folder above
    it; * stays within a path segment, **/ spans any."""
    def regex(p):
        p = re.escape(p).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        return re.compile(p)
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(regex(p).fullmatch(prefix) for p in patterns for prefix in prefixes)


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # _ignored does not do exceptions
    for needed in ("requirements.txt", "pyproject.toml", "README.md", "jaxlm/__init__.py",
                   "jaxlm/train/loop.py", "configs/gpt/debug.py", "launch/gke.py"):
        assert not _ignored(needed, patterns), needed
    for left_out in (".git/config", ".venv/bin/python", "jaxlm/__pycache__/x.pyc", "runs/a/b",
                     "jaxlm.egg-info/PKG-INFO", "logs/x.log"):
        assert _ignored(left_out, patterns), left_out
    # the tracked files the build needs are sent
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout
    sent = [f for f in tracked.splitlines() if not _ignored(f, patterns)]
    assert "requirements.txt" in sent and any(f.startswith("configs/") for f in sent)
