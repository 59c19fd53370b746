"""Shared fixtures: tiny configs (D=32, H=4, 2 layers) that compile and run in seconds."""

import atexit
import os
import pathlib
import shutil
import tempfile

# 8 fake CPU devices for the sharding tests; set before anything imports JAX.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# One persistent XLA compilation cache for the session, shared with the commands the tests
# start (they inherit the environment): the tiny configs' programs recur across tests and
# processes, and a cache hit skips XLA's compile (test_main + test_checkpoint: 280 -> 183 s).
# A fresh folder per session, removed at exit. JAX writes entries in place, so a process
# may read one that another is still writing: JAX then warns (silenced in pyproject.toml)
# and compiles instead. (A size limit would make JAX lock the folder, but that made
# test_train + test_model slower than no cache at all: 148 s, against 114 s without a
# cache and 98 s with this one.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-tests-xla-")
    os.environ["JAXLM_TESTS_XLA_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# Under pytest-xdist (the README's `-n 2`) each worker gets a folder of its own inside that
# one, for itself and the commands it starts: two workers compiling the same tiny programs
# at once could otherwise read each other's half-written entries (JAX writes in place).
if os.environ.get("PYTEST_XDIST_WORKER") and \
        os.environ.get("JAXLM_TESTS_XLA_CACHE") == os.environ["JAX_COMPILATION_CACHE_DIR"]:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["JAXLM_TESTS_XLA_CACHE"], os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(os.environ["JAX_COMPILATION_CACHE_DIR"], exist_ok=True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxlm.config import base_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _tiny(c, **model_overrides):
    """Shrinks a config to the tiny test shapes and run lengths."""
    c.model.update(num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=64)
    c.model.update(**model_overrides)
    c.data.seq_len = 32
    c.train.update(steps=20, batch_size=8, log_every=5)
    c.checkpoint.update(every=10, heartbeat_seconds=30.0, timeout_seconds=300.0)
    c.optimizer.update(learning_rate=3e-3, warmup_steps=5)
    return c


def tiny_config(**model_overrides):
    c = _tiny(base_config(), **model_overrides)
    c.evaluate.update(num_examples=8, shots=(0, 1), batch_size=8, num_samples=1,
                      sample_len=16, max_new_tokens=8)
    return c


def tiny_bert_config(**model_overrides):
    """configs/bert/debug.py at the tiny shapes of `tiny_config` (masked LM, byte:bert)."""
    from jaxlm.config import load_config
    return _tiny(load_config(REPO / "configs/bert/debug.py"), **model_overrides)


@pytest.fixture
def cfg():
    return tiny_config()


def fresh_step(cfg, devices=None):
    """(a fresh train state in the step's layout, the compiled step) for `cfg`."""
    from jaxlm.train.build import build_train
    step = build_train(cfg, devices)
    return step.place_state(step.init_state()), step


def random_batch(cfg, seed: int = 0) -> dict:
    """A global batch of random byte windows, made by the config's objective (numpy)."""
    from jaxlm.train.objectives import make_objective
    from jaxlm.data.tokenizers import get_tokenizer
    objective = make_objective(cfg, get_tokenizer(cfg.data.tokenizer))
    rng = np.random.default_rng(seed)
    length = cfg.data.seq_len + objective.extra_tokens

    def read(i):  # any other example, e.g. next-sentence prediction's random B
        return {"tokens": np.random.default_rng([seed, i]).integers(0, 256, length).astype(np.int32)}

    rows = [objective.example({"tokens": rng.integers(0, 256, length).astype(np.int32)}, i, read)
            for i in range(cfg.train.batch_size)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
