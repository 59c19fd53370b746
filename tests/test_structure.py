"""The shape of the code: every module imports on its own, the import graph of jaxlm has no
cycles and only points down the layers, every command is a leaf with a working --help, and
no code outside jaxlm/models asks a model family by its name."""

import ast
import pathlib
import subprocess
import sys

import pytest
from conftest import REPO

PACKAGE = REPO / "jaxlm"
# python -m <command>: the entry points, each a leaf that parses flags and calls one function.
COMMANDS = ["jaxlm.main", "jaxlm.train", "jaxlm.evaluate", "jaxlm.export", "jaxlm.plan",
            "jaxlm.finetune", "jaxlm.data.prepare", "jaxlm.data.tokenizers", "jaxlm.interop",
            "jaxlm.upgrade", "jaxlm.serve", "jaxlm.quantize", "jaxlm.glue", "jaxlm.squad"]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
ENTRY_POINTS = {f"{c}.__main__" if f"{c}.__main__" in MODULES else c for c in COMMANDS}

# The layers, lowest first. A module may import modules of its own group and of lower
# layers; groups of one layer are siblings that must not import each other. "pkg.*" is a
# package and everything in it; the most specific entry decides (a command inside a
# package is a command). Every module must be placed: a new one forces a decision here.
LAYERS = [
    [("jaxlm", "jaxlm.errors", "jaxlm.interrupt")],
    # Foundations: the config schema, files, processes, mesh; no model and no data.
    [("jaxlm.config", "jaxlm.files", "jaxlm.workdir", "jaxlm.watchdog", "jaxlm.distributed", "jaxlm.sharding",
      "jaxlm.runlog", "jaxlm.trainable", "jaxlm.tracking")],
    # Data knows no model, models know no data.
    [("jaxlm.data.*",), ("jaxlm.models.*",)],
    # Decoding with a model and params it is given.
    [("jaxlm.inference.*",)],
    # The HTTP layer over an inference Service (its command, jaxlm.serve.__main__, loads it).
    [("jaxlm.serve.*",)],
    # What every command builds (nothing of training), and the checkpoint files.
    [("jaxlm.setup", "jaxlm.checkpoint")],
    # Training and evaluation are siblings: the callers wire evaluation into training.
    [("jaxlm.train.*",), ("jaxlm.evaluate.*",)],
    [("jaxlm.interop.*",)],
    # What the fine-tuning commands share (jaxlm.finetune, jaxlm.squad).
    [("jaxlm.finetuning",)],
    # The commands (leaves, see test_commands_are_leaves: jaxlm.main, jaxlm.finetune,
    # jaxlm.plan, jaxlm.export, every __main__) and their parser.
    [("jaxlm.cli", "jaxlm.__main__", *sorted(ENTRY_POINTS))],
]


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


def _covers(entry: str, name: str) -> bool:
    prefix = entry.removesuffix(".*")
    return name == prefix or (entry.endswith(".*") and name.startswith(prefix + "."))


def _place(name: str) -> tuple[int, int] | None:
    """(layer, group) of a module: its most specific entry in LAYERS; None: unplaced."""
    found = [(len(entry), (layer, group)) for layer, groups in enumerate(LAYERS)
             for group, entries in enumerate(groups) for entry in entries if _covers(entry, name)]
    return max(found)[1] if found else None


def test_imports_point_down_the_layers():
    unplaced = sorted(name for name in MODULES if _place(name) is None)
    assert not unplaced, f"modules in no layer of LAYERS (tests/test_structure.py): {unplaced}"
    stale = [entry for groups in LAYERS for entries in groups for entry in entries
             if not any(_covers(entry, name) for name in MODULES)]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"
    wrong = []
    for name, path in sorted(MODULES.items()):
        layer, group = _place(name)
        for target in sorted(imports_of(name, path)):
            t_layer, t_group = _place(target)
            if t_layer > layer or (t_layer == layer and t_group != group):
                how = "a higher layer" if t_layer > layer else "a sibling group"
                wrong.append(f"{name} (layer {layer}) imports {target} ({how}, layer {t_layer})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_commands_are_leaves():
    for name in MODULES:
        imported = imports_of(name, MODULES[name]) & ENTRY_POINTS
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
        assert "config fields (declared" not in out  # the schema has its own flag
        if command.startswith("jaxlm.data") or command in ("jaxlm.interop", "jaxlm.upgrade"):
            assert "--help-config" not in out  # no --config
        else:
            assert "--config=FILE" in out and "--help-config[=SECTION]" in out


def test_help_config_lists_the_schema_or_one_section():
    """--help-config: every field with its default, valid values and meaning; =SECTION: one
    section's; an unknown section is one line naming the sections."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "jaxlm.train", *args], cwd=REPO,
                              text=True, capture_output=True, timeout=120)
    every = run("--help-config")
    assert every.returncode == 0 and every.stdout.startswith("config fields (declared in")
    assert "  train.steps = 1000  [positive]\n" in every.stdout
    assert "  model.dropout = 0.0  [in [0, 1)]\n" in every.stdout
    train = run("--help-config=train")
    assert "  train.steps = 1000" in train.stdout and "model.dropout" not in train.stdout
    bad = run("--help-config=trian")
    assert bad.returncode == 2 and bad.stderr.strip().startswith(
        "error: --help-config=trian: no such section; sections: model, data, train")


def test_python_m_jaxlm_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "jaxlm"], cwd=REPO, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert f"python -m {command} " in proc.stdout, command


@pytest.mark.parametrize("script", ["debug.sh", "tpu_pod.sh", "slurm.sh"])
def test_launchers_answer_help(script):
    proc = subprocess.run(["bash", str(REPO / "launch" / script), "--help"], cwd=REPO,
                          text=True, capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr
    assert f"launch/{script}" in proc.stdout


def _names_a_family(node: ast.AST) -> bool:
    """`arch`, `x.arch` or `x.family.name` / `family.name`."""
    if isinstance(node, ast.Name):
        return node.id == "arch"
    if isinstance(node, ast.Attribute):
        owner = node.value
        owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        return node.attr == "arch" or (node.attr == "name" and owner_name == "family")
    return False


def _is_text(node: ast.AST) -> bool:
    """A string literal, or a tuple/list/set of them (`arch in ("gpt", "bert")`)."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_is_text(e) for e in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_code_asks_family_capabilities_not_names():
    """Outside jaxlm/models, code asks models.Family what a model can do (`causal`, `pooled`)
    instead of comparing config.model.arch (or a family's name) with "gpt" or "bert": a new
    family then works everywhere its flags say it does. (Comparing two archs, e.g. a
    checkpoint's with the config's, is not asking a capability and is fine.)"""
    found = []
    files = [p for d in ("jaxlm", "launch", "benchmarks") for p in sorted((REPO / d).rglob("*.py"))]
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("jaxlm/models/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(map(_names_a_family, operands)) and any(map(_is_text, operands)):
                    found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not found, ("compare a models.Family flag instead of the family's name:\n"
                       + "\n".join(found))
