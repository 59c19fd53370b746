"""The README and docs/ as a newcomer follows them: every shell command in their ```bash
blocks is checked the way its program reads it, and every file they point to exists.

- `python -m jaxlm.*` lines run in this process with JAXLM_CHECK=1: the command parses its
  flags, loads its config file and validates every override, then stops before any work
  (jaxlm.cli). A renamed flag, field, config file or module fails here.
- `python -m jaxlm` (the index of commands) runs as written.
- The launchers (`launch/*.sh`, `launch/*.py`) run with `--dry-run`: they print their
  commands after checking their flags and the overrides, and start nothing.
- README's test command is exactly what .ci/run runs.
- Other programs are allowed only if EXTERNAL names them, with what covers them.
"""

import contextlib
import importlib
import importlib.util
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from jaxlm import cli

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Programs the pages use that are not jaxlm's, and what checks them instead.
EXTERNAL = {
    "python3 -m venv": "the standard library's venv (the README's install line)",
    "pip": "the install line; a fresh clone's install is what CI runs",
    "python -m pytest": "the README's test command: test_readme_test_command_is_what_ci_runs",
    "curl": "an HTTP request to the server started in the line before: tests/test_serve_http.py",
    "lm_eval": "lm-evaluation-harness against a served model: tests/test_serve_e2e.py",
    "docker": "building the image: its install line is checked by tests/test_docker.py",
    "gcloud": "Google Cloud's own cluster and bucket set-up (docs/cloud.md); not jaxlm's",
    "kubectl": "Kubernetes' client; what launch/gke.py sends it: tests/test_gke.py",
}


def bash_blocks(path):
    """(first line number, text) of each ```bash block of a markdown file."""
    blocks, current, start = [], None, 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if current is None and line.strip() == "```bash":
            current, start = [], n + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"{path.name}: a ```bash block opened at line {start} is not closed"
    return blocks


def commands(text):
    """The commands of a bash block: continuation lines joined, comments dropped, each
    `a && b` split in two; leading VAR=value assignments kept apart."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            argv, words = words[:cut], words[cut + 1:]
            env = {}
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                key, _, value = argv.pop(0).partition("=")
                env[key] = value
            if argv:
                found.append((env, argv))
    return found


def documented():
    for page in PAGES:
        for line, text in bash_blocks(page):
            for env, argv in commands(text):
                yield pytest.param(env, argv, id=f"{page.name}:{line}:{' '.join(argv)[:60]}")


def _python(argv) -> bool:
    return re.fullmatch(r"(.*/)?python3?", argv[0]) is not None


def _external(argv) -> str | None:
    prog = argv[0].rsplit("/", 1)[-1]
    if _python(argv) and argv[1:2] == ["-m"]:
        prog = f"{'python3' if prog == 'python3' else 'python'} -m {argv[2]}"
        return EXTERNAL.get(prog) or EXTERNAL.get(f"python -m {argv[2]}")
    return EXTERNAL.get(prog)


def check_jaxlm(module_name, args, monkeypatch):
    """Runs `python -m module_name args` here under JAXLM_CHECK=1; returns what it printed."""
    spec = importlib.util.find_spec(module_name)
    assert spec is not None, f"no module {module_name}"
    if spec.submodule_search_locations is not None:  # a package: python -m runs __main__
        module_name += ".__main__"
    module = importlib.import_module(module_name)
    monkeypatch.setenv("JAXLM_CHECK", "1")
    monkeypatch.chdir(REPO)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if module_name == "jaxlm.__main__":
            module.main()  # the index takes no flags: it runs as written
            return out.getvalue()
        with pytest.raises(SystemExit) as stop:
            cli.run(module.main, args)
    assert stop.value.code == 0, f"refused: {err.getvalue().strip()}"
    assert out.getvalue().startswith("checked: "), out.getvalue()
    return out.getvalue()


@pytest.mark.parametrize("env,argv", list(documented()))
def test_documented_command(env, argv, monkeypatch):
    reason = _external(argv)
    if reason is not None:
        return  # named in EXTERNAL with what covers it
    if _python(argv) and argv[1:2] == ["-m"] and argv[2].split(".")[0] == "jaxlm":
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        printed = check_jaxlm(argv[2], argv[3:], monkeypatch)
        if argv[2] == "jaxlm":
            assert "python -m jaxlm.main" in printed
        return
    script = argv[1] if _python(argv) else argv[0]
    assert script.startswith("launch/"), f"a program the docs test does not know: {argv}"
    # --dry-run goes first: sweep.py passes what follows "--" to the runs.
    cmd = ([sys.executable, script] if script.endswith(".py") else ["bash", script])
    # The launchers ask `python` (this interpreter, as in the venv) for the jax version.
    path = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run([*cmd, "--dry-run", *argv[2 if _python(argv) else 1:]], cwd=REPO,
                          env={**os.environ, **env, "PATH": path}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_page_has_commands_and_the_readme_maps_every_page():
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README's map does not link docs/{page.name}"
    without = [p.name for p in PAGES if not bash_blocks(p) and p.name != "layout.md"]
    assert not without, f"pages without a command to try: {without}"


def test_readme_test_command_is_what_ci_runs():
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines()
          if line.startswith("python3 -m venv")]
    readme_lines = [line for _, text in bash_blocks(REPO / "README.md")
                    for line in text.splitlines() if "pytest" in line]
    assert len(ci) == 1 and readme_lines == ci, (readme_lines, ci)


# A path in backticks or a link that names a file of the repository.
_PATH = re.compile(r"(?:`|\]\()((?:\.\./)?(?:jaxlm|configs|launch|benchmarks|tests|docs)/"
                   r"[\w./-]*\w)(?:#[\w-]*)?[`)]")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_files_the_pages_name_exist(page):
    missing = []
    for path in _PATH.findall(page.read_text()):
        base = page.parent if path.startswith("../") else REPO
        if "*" not in path and not (base / path).exists():
            missing.append(path)
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_the_check_refuses_what_the_command_would(monkeypatch):
    """The check is the command's own parser: a mistyped field or flag fails it."""
    for args in (["--config=configs/gpt/debug.py", "--workdir=runs/x", "--config.train.stpes=3"],
                 ["--config=configs/gpt/debug.py", "--workdir=runs/x", "--output=y"]):
        with pytest.raises(AssertionError, match="refused: error: unknown"):
            check_jaxlm("jaxlm.train", args, monkeypatch)
