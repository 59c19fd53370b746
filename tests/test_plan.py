"""jaxlm.plan: ahead-of-time compile for a topology, memory per device, plain-words warnings."""

import re
import subprocess
import sys

import jax
import pytest
from conftest import REPO, tiny_config

from jaxlm import plan
from jaxlm.models import block_name

FC_IN = f"['{block_name(0)}']['mlp']['fc_in']['kernel']"   # as jax.tree_util.keystr writes it

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def config(strategy, data, fsdp, tensor, **model):
    cfg = tiny_config(vocab_size=264, **model)
    cfg.mesh.update(strategy=strategy, data=data, fsdp=fsdp, sequence=1, tensor=tensor)
    return cfg


def test_fsdp_holds_an_eighth_of_the_state_per_device():
    dp = plan.make_plan(config("dp", 8, 1, 1), jax.devices())
    fsdp = plan.make_plan(config("fsdp", 1, 8, 1), jax.devices())
    # Parameters + Adam moments dominate the arguments; the batch is the same in both.
    assert fsdp.argument_bytes < dp.argument_bytes / 4
    assert fsdp.param_shardings[FC_IN] == jax.sharding.PartitionSpec("fsdp", None)
    assert dp.flops_per_step > 0 and fsdp.peak_bytes > 0


def test_weak_choices_are_explained():
    warnings = plan.make_plan(config("fsdp", 8, 1, 1), jax.devices()).warnings
    assert any("config.mesh.fsdp is 1" in w for w in warnings)
    cfg = config("tp", 1, 1, 8, d_model=64, num_heads=4)
    assert any("wider than the number of heads (4)" in w
               for w in plan.weak_choices(cfg, {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 8}))


def test_largest_live_buffers_are_named_and_add_up():
    p = plan.make_plan(config("fsdp", 1, 8, 1), jax.devices(), top=50)
    sizes = [b for _, b, _ in p.peak_buffers]
    assert sizes and sizes == sorted(sizes, reverse=True)
    # The groups are disjoint parts of what is live, and XLA's liveness count cannot exceed
    # what its allocator reserves.
    assert sum(sizes) <= p.live_bytes <= p.peak_bytes
    ops = [op for op, _, _ in p.peak_buffers]
    assert any("block_*" in op for op in ops) and not any("block_0" in op for op in ops)


def test_cli_prints_memory_and_shardings():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlm.plan", f"--config={REPO}/configs/gpt/debug.py",
         "--topology=cpu:4", "--config.mesh.strategy=fsdp", "--config.mesh.data=1",
         "--config.mesh.fsdp=-1", "--top=3",
         "--config.train.batch_size=8"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mesh {'data': 1, 'fsdp': 4, 'sequence': 1, 'tensor': 1} of cpu" in proc.stdout
    assert "per device peak:" in proc.stdout
    assert FC_IN in proc.stdout
    top = proc.stdout.split("largest buffers live at the memory peak")[1].splitlines()[1:4]
    assert all(re.fullmatch(r" +\d+\.\d MB +\d+ x  \S.*", line) for line in top), top


def test_unknown_topology_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "jaxlm.plan", f"--config={REPO}/configs/gpt/debug.py",
                           "--topology=gpu:8"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("--topology=gpu:8: expected cpu:N or tpu:<name>")
    proc = subprocess.run([sys.executable, "-m", "jaxlm.plan", f"--config={REPO}/configs/gpt/debug.py",
                           "--top=many"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--top=many: expected a number" in proc.stderr
