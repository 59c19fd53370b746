"""The shape of the code: every module imports on its own, the import graph of jaxlm has no
cycles, and every command is a leaf with a working --help."""

import ast
import pathlib
import subprocess
import sys

import pytest
from conftest import REPO

PACKAGE = REPO / "jaxlm"
# python -m <command>: the entry points, each a leaf that parses flags and calls one function.
COMMANDS = ["jaxlm.main", "jaxlm.train", "jaxlm.evaluate", "jaxlm.export", "jaxlm.plan",
            "jaxlm.finetune", "jaxlm.data.prepare", "jaxlm.data.tokenizers", "jaxlm.interop"]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: pathlib.Path) -> set[str]:
    """jaxlm modules that `name` imports anywhere in its file (function bodies too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


def test_import_graph_has_no_cycles():
    graph = {name: imports_of(name, path) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["jaxlm.errors"] == set()  # everyone may import it


def test_commands_are_leaves():
    entry = {f"{c}.__main__" if f"{c}.__main__" in MODULES else c for c in COMMANDS}
    for name in MODULES:
        imported = imports_of(name, MODULES[name]) & entry
        assert not imported, f"{name} imports the command(s) {sorted(imported)}"


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\nprint('ok')" % sorted(MODULES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_every_command_has_help_without_a_config_file():
    procs = {c: subprocess.Popen([sys.executable, "-m", c, "--help"], cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in COMMANDS}
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{command}: {err[-2000:]}"
        assert out.startswith(f"usage: python -m {command}"), out[:200]
        assert "flags" in out
        if command.startswith("jaxlm.data") or command == "jaxlm.interop":  # no --config
            assert "config fields" not in out
        else:  # the schema: every field with its default, valid values and meaning
            assert "--config=FILE" in out and "config fields (declared in jaxlm/config.py" in out
            assert "  train.steps = 1000  [positive]\n" in out
            assert "  model.dropout = 0.0  [in [0, 1)]\n" in out
