"""Config schema, command-line overrides and the errors for bad input."""

import subprocess
import sys

import jax
import pytest

from conftest import REPO
from jaxlm import config as config_lib
from jaxlm.config import ConfigError, apply_override, parse_args, validate
from jaxlm.models.gpt import GPT, count_params

CONFIGS = sorted((REPO / "configs").rglob("*.py"))


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
