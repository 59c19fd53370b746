"""Config schema, command-line overrides and the errors for bad input."""

import subprocess
import sys

import jax
import pytest
from conftest import REPO

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.config import apply_override, validate
from jaxlm.errors import ConfigError
from jaxlm.models import count_params
from jaxlm.models.gpt import GPT

# Config files; _name.py files are helpers they share (e.g. the GPT-2 size table).
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.py") if not p.name.startswith("_"))


def parse_args(argv):
    return cli.parse(argv, "jaxlm.main", "")


def test_overrides_parse_by_field_type(cfg):
    apply_override(cfg, "train.steps", "50")
    apply_override(cfg, "optimizer.learning_rate", "1e-4")
    apply_override(cfg, "optimizer.weight_decay", "0")          # int text into a float field
    apply_override(cfg, "model.tie_embeddings", "false")
    apply_override(cfg, "model.position", "rope")
    apply_override(cfg, "evaluate.shots", "(0, 2)")
    apply_override(cfg, "evaluate.tasks", "rule_mc")             # one item into a tuple field
    assert cfg.train.steps == 50 and cfg.optimizer.learning_rate == 1e-4
    assert cfg.optimizer.weight_decay == 0.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.model.tie_embeddings is False and cfg.model.position == "rope"
    assert cfg.evaluate.shots == (0, 2) and cfg.evaluate.tasks == ("rule_mc",)


def test_unknown_field_names_it_and_suggests(cfg):
    with pytest.raises(ConfigError, match=r"unknown config field config.train.stpes "
                                          r"\(did you mean config.train.steps\?\)"):
        apply_override(cfg, "train.stpes", "5")


@pytest.mark.parametrize("field,value", [("train.steps", "ten"), ("train.steps", "1.5"),
                                         ("model.tie_embeddings", "maybe"),
                                         ("optimizer.learning_rate", "'fast'")])
def test_wrong_type_names_field(cfg, field, value):
    with pytest.raises(ConfigError, match=f"config.{field}: expected"):
        apply_override(cfg, field, value)


@pytest.mark.parametrize("changes,field", [
    ({"train.batch_size": "10", "train.microbatches": "4"}, "config.train.batch_size=10"),
    ({"data.seq_len": "100"}, "config.data.seq_len=100 exceeds config.model.max_len=64"),
    ({"model.num_heads": "5"}, "config.model.d_model=32 is not divisible"),
    ({"model.position": "alibi"}, "config.model.position='alibi'"),
    ({"train.steps": "0"}, "config.train.steps=0"),
])
def test_validate_names_offending_field(cfg, changes, field):
    for k, v in changes.items():
        apply_override(cfg, k, v)
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace("[", r"\[")):
        validate(cfg)


def test_parse_args_requires_config_and_workdir():
    with pytest.raises(ConfigError, match="--config=FILE and --workdir=DIR are required"):
        parse_args(["--workdir=x"])
    with pytest.raises(ConfigError, match="unknown flag --steps"):
        parse_args(["--steps=3"])
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--config=nope.py", "--workdir=x"])


def test_bad_flag_is_one_line_exit_2_before_jax_starts(tmp_path):
    """The CLI error is a single line, exit code 2, and nothing is written to the workdir."""
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlm.main", f"--config={REPO}/configs/gpt/debug.py",
         f"--workdir={workdir}", "--config.train.stepz=3"],
        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: unknown config field config.train.stepz "
                                   "(did you mean config.train.steps?)")
    assert not workdir.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc tunables: Linux only")
@pytest.mark.parametrize("env, expected", [
    ({}, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc.malloc.hugetlb=0"),  # the user's choice
    ({"JAXLM_HUGE_PAGES": "0"}, "None"),
], ids=["unset", "appended", "kept", "opted-out"])
def test_commands_restart_once_with_huge_page_malloc(env, expected):
    """A command re-executes itself (same process id, arguments) once with glibc's
    hugetlb tunable; a library call (explicit argv) never does."""
    import os
    program = ("import os, sys; from jaxlm import cli; "
               "cli.run(lambda argv: print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), argv))")
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXLM_HUGE_PAGES")}
    proc = subprocess.Popen([sys.executable, "-c", program, "--x=1"], env={**base, **env},
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.split() == [str(proc.pid), expected, "['--x=1']"]
    program = program.replace("argv))", "argv), [])")
    out = subprocess.run([sys.executable, "-c", program], env=base, capture_output=True, check=True,
                         text=True, cwd=REPO, timeout=60).stdout.split()
    assert out[1] == "None"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_file_loads_and_validates(path):
    cfg = config_lib.load_config(path)
    validate(cfg)
    assert cfg.keys() == config_lib.base_config().keys()


@pytest.mark.parametrize("size,millions", [("small", 124), ("medium", 355), ("large", 774),
                                           ("xl", 1558)])
def test_gpt2_sizes_have_published_parameter_counts(size, millions):
    """Counted from abstract shapes (nothing allocated); GPT-2's published sizes."""
    cfg = config_lib.load_config(REPO / f"configs/gpt/gpt2_{size}.py")
    assert cfg.data.seq_len == 1024 == cfg.model.max_len
    shapes = jax.eval_shape(GPT(cfg.model).init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 8), "int32"))
    n = count_params(shapes["params"]) / 1e6
    assert abs(n - millions) / millions < 0.01, f"{size}: {n:.1f}M parameters"


def test_cli_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from jaxlm import cli
    from jaxlm.errors import Diverged

    def fails_with(error):
        def main(argv):
            raise error
        return main

    with pytest.raises(SystemExit) as e:
        cli.run(fails_with(ConfigError("config.train.steps=0 must be positive")), [])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: config.train.steps=0 must be positive\n"
    with pytest.raises(SystemExit) as e:
        cli.run(fails_with(Diverged("step 3: loss nan")), [])
    assert e.value.code == 1
    with pytest.raises(KeyError):  # a bug is not a user error: its traceback stays
        cli.run(fails_with(KeyError("oops")), [])


def test_cli_flag_forms(tmp_path):
    from jaxlm import cli
    flags = [cli.Flag("name", "", None), cli.Flag("split", "", None, repeat=True),
             cli.Flag("overwrite", "", switch=True)]
    args = cli.parse(["text", "--name", "corpus", "--split=train:a.txt", "--split=test:b.txt",
                      "--overwrite"], "x", "", config=False, workdir=False,
                     commands={"text": flags})
    assert args.command == "text" and args.flags == {
        "name": "corpus", "split": ["train:a.txt", "test:b.txt"], "overwrite": True}
    with pytest.raises(ConfigError, match=r"expected a command \(text\), got 'tfds'"):
        cli.parse(["tfds"], "x", "", config=False, workdir=False, commands={"text": flags})
    with pytest.raises(ConfigError, match="--workdir= is empty; expected --workdir=DIR"):
        parse_args([f"--config={REPO}/configs/gpt/debug.py", "--workdir="])
    args = parse_args([f"--config={REPO}/configs/gpt/debug.py", "--workdir", str(tmp_path),
                       "--config.train.steps", "700"])
    assert args.config.train.steps == 700 and args.workdir == tmp_path


@pytest.mark.parametrize("field,value,message", [
    ("optimizer.learning_rate", "-1e-3", "config.optimizer.learning_rate=-0.001 must be positive"),
    ("model.dropout", "1.5", r"config.model.dropout=1.5 must be in \[0, 1\)"),
    ("train.batch_size", "0", "config.train.batch_size=0 must be positive"),
    ("evaluate.shots", "(0, -2)", "config.evaluate.shots=-2 must be >= 0"),
    ("mesh.data", "0", "config.mesh.data=0 must be -1 or >= 1"),
    ("checkpoint.step", "-2", "config.checkpoint.step=-2 must be -1 or >= 0"),
    ("model.dtype", "int8", "config.model.dtype='int8': expected 'float32', 'bfloat16', 'float16' or 'float64'"),
    ("optimizer.eps", float("nan"), "config.optimizer.eps=nan must be positive"),  # a config file's
])
def test_every_value_is_checked_against_its_declared_range(cfg, field, value, message):
    if isinstance(value, str):
        apply_override(cfg, field, value)
    else:
        section, name = field.split(".")
        cfg[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_config_round_trips_through_its_json_form(cfg):
    cfg.mesh.rules = (("embed", ("fsdp", "tensor")),)
    cfg.evaluate.tasks = ("rule_mc",)
    saved = config_lib.to_dict(cfg)
    back = config_lib.from_dict(saved)
    assert back.to_dict() == cfg.to_dict()
    del saved["model"]["arch"]  # written by an older jaxlm: the default fills in
    assert config_lib.from_dict(saved).model.arch == "gpt"
    saved["model"]["flash"] = True
    with pytest.raises(ConfigError, match="config field model.flash, which this jaxlm does not know"):
        config_lib.from_dict(saved)
