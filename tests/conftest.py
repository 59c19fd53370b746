"""Shared fixtures: tiny configs (D=32, H=4, 2 layers) that compile and run in seconds."""

import os
import pathlib

# 8 fake CPU devices for the sharding tests; set before anything imports JAX.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

from jaxlm.config import base_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_config(**model_overrides):
    c = base_config()
    c.model.update(num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=64)
    c.model.update(**model_overrides)
    c.data.seq_len = 32
    c.train.update(steps=20, batch_size=8, log_every=5)
    c.checkpoint.update(every=10, heartbeat_seconds=30.0, timeout_seconds=300.0)
    c.optimizer.update(learning_rate=3e-3, warmup_steps=5)
    c.evaluate.update(num_examples=8, shots=(0, 1), batch_size=8, num_samples=1,
                      sample_len=16, max_new_tokens=8)
    return c


@pytest.fixture
def cfg():
    return tiny_config()
