"""config.train.profile_steps: a JAX profiler trace of chosen steps (jaxlm.train.profile)."""

import pytest
from test_bad_input import refused
from test_main import run


def test_profile_steps_write_a_trace_of_those_steps(tmp_path):
    """config.train.profile_steps=2:4: a JAX profiler trace (XPlane for TensorBoard's
    profile plugin, and Perfetto's) of steps 3 and 4 in WORKDIR/tb; the run is unchanged."""
    run(tmp_path, "--config.train.steps=5", "--config.train.profile_steps=2:4", evaluate=False)
    (trace,) = (tmp_path / "tb" / "plugins" / "profile").iterdir()
    names = [p.name for p in trace.iterdir()]
    assert any(n.endswith(".xplane.pb") for n in names) and "perfetto_trace.json.gz" in names, names
    assert any("train_step" in p.read_bytes().decode("latin-1") for p in trace.glob("*.xplane.pb"))


@pytest.mark.parametrize("spec", ["4:2", "a:b", "3", "2:2"])
def test_a_malformed_profile_range_is_refused(tmp_path, spec):
    refused("train", tmp_path / "new", f"--config.train.profile_steps={spec}",
            match="config.train.profile_steps=")
