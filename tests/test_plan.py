"""jaxlm.plan: ahead-of-time compile for a topology, memory per device, plain-words warnings."""

import json
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
    # XLA's count (matmuls + elementwise) is near the 6N + attention formula unscanned
    assert 1.0 < dp.flops_per_step / dp.model_flops < 1.3


def test_weak_choices_are_explained():
    warnings = plan.make_plan(config("fsdp", 8, 1, 1), jax.devices()).warnings
    assert any("config.mesh.fsdp is 1" in w for w in warnings)
    cfg = config("tp", 1, 1, 8, d_model=64, num_heads=4)
    assert any("wider than the number of heads (4)" in w
               for w in plan.weak_choices(cfg, {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 8}))


def test_the_temporaries_regions_are_named_disjoint_and_add_up():
    """In a process of its own, without the session's persistent compilation cache
    (conftest): a cached executable is not compiled, so XLA would write no dumps."""
    code = ("import json, jax; jax.config.update('jax_enable_compilation_cache', False); "
            "from jaxlm import plan; from test_plan import config; "
            "p = plan.make_plan(config('fsdp', 1, 8, 1), jax.devices(), top=10**6); "
            "print(json.dumps([p.temp_bytes, p.temp_regions]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO / "tests", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    temp_bytes, regions = json.loads(proc.stdout.splitlines()[-1])
    sizes = [b for _, b, _ in regions]
    assert sizes and sizes == sorted(sizes, reverse=True)
    # Disjoint address ranges of the one allocation: together they are all of it, but
    # for the alignment gaps between them.
    assert 0.9 * temp_bytes <= sum(sizes) <= temp_bytes
    names = [what for what, _, _ in regions]
    assert any("block_*" in w for w in names) and not any("block_0" in w for w in names)
    assert all(re.match(r"\(?[a-z]+\d*\[[\d,]*\]", w) for w in names), names


def test_regions_merge_overlapping_buffers_and_take_the_largest_name(tmp_path):
    """Buffers whose address ranges overlap share a region (XLA reused the memory); the
    region is named by its largest buffer, with the JAX operation from the HLO's metadata."""
    (tmp_path / "module_0001.jit_train_step.after_optimizations-buffer-assignment.txt").write_text(
        "allocation 0: size 64, parameter 0, shape |f32[16]| at ShapeIndex {}:\n"
        " value: <1 p @0> (size=64,offset=0): f32[16]{0}\n"
        "allocation 1: size 1000, preallocated-temp:\n"
        " value: <2 fusion.1 @0> (size=600,offset=0): bf16[300]{0}\n"
        " value: <3 copy.2 @0> (size=100,offset=500): f32[25]{0}\n"
        " value: <4 while.3{1} @0> (size=300,offset=700): f32[75]{0}\n"
        " value: <5 wide.param.1{1} (phi) @0> (size=300,offset=700): f32[75]{0}\n")
    (tmp_path / "module_0001.jit_train_step.after_optimizations.txt").write_text(
        '  %fusion.1 = bf16[300]{0} fusion(%p), metadata={op_name="jit(train_step)/'
        'blocks/block_3/mlp/dot_general"}\n  %copy.2 = f32[25]{0} copy(%p)\n')
    assert plan.temp_regions(str(tmp_path)) == [
        ("bf16[300] blocks/block_*/mlp/dot_general", 600, 2),
        ("f32[75] while.3 (XLA's own, no JAX op)", 300, 2)]
    # A dump of another layout is an error, not an empty listing.
    (tmp_path / "module_0001.jit_train_step.after_optimizations-buffer-assignment.txt").write_text(
        "allocation 0: size 64, parameter 0, shape |f32[16]| at ShapeIndex {}:\n")
    with pytest.raises(RuntimeError, match="holds no temporaries"):
        plan.temp_regions(str(tmp_path))


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
    # the listing folds the 4 blocks of the debug config into one line per parameter
    assert FC_IN.replace(block_name(0), "block_*") + " (x4)" in proc.stdout
    assert block_name(1) not in proc.stdout.split("largest buffers")[0]
    top = proc.stdout.split("largest regions of the temporaries")[1].splitlines()[1:4]
    assert all(re.fullmatch(r" +\d+\.\d MB +\d+ buffers  \S.*", line) for line in top), top
    assert "fits: unknown (no memory size known for cpu; pass --device-memory=GB)" in proc.stdout


@pytest.mark.parametrize("name,wrap", [
    ("v5p:4x4x4", (True, True, True)), ("v4:4x4x8", (True, True, True)),
    ("v5p:2x4x4", None), ("v5p:2x2x2", None),
    ("v5e:16x16", (True, True, False)), ("v5e:8x16", (False, True, False)),
    ("v6e:16x16", (True, True, False)), ("v5e:4x4", None), ("v5e:8x8", None),
])
def test_full_tori_are_compiled_with_their_wraparound(name, wrap):
    assert plan.wraparound(name) == ({"wrap": wrap} if wrap else {})


def test_unknown_topology_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "jaxlm.plan", f"--config={REPO}/configs/gpt/debug.py",
                           "--topology=gpu:8"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("--topology=gpu:8: expected cpu:N or tpu:<name>")
    proc = subprocess.run([sys.executable, "-m", "jaxlm.plan", f"--config={REPO}/configs/gpt/debug.py",
                           "--top=many"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--top=many: expected a number" in proc.stderr


def test_a_step_that_does_not_fit_gets_a_proposal_verified_by_compiling():
    """The debug config (batch 32) against a budget below its peak: the first cheap change
    that fits is proposed, and compiling the proposed config independently confirms it."""
    from jaxlm.config import load_config
    cfg = load_config(REPO / "configs/gpt/debug.py")
    devices = jax.devices()[:1]
    base = plan.make_plan(cfg, devices)
    budget = 0.75 * base.peak_bytes
    tried = []
    change, fitted = plan.propose(cfg, devices, budget, base.mesh, log=tried.append)
    assert change == {"train.microbatches": 2} and len(tried) == 1, tried
    again = plan.make_plan(plan._with(cfg, change), devices)
    assert again.peak_bytes == fitted.peak_bytes <= budget < base.peak_bytes


def test_a_step_xla_refuses_is_a_verdict_with_a_proposal_not_a_traceback():
    """A TPU compile over the device's HBM is refused by XLA (CompileTimeHbmOom) instead of
    reported: plan says NO with XLA's figures, logs the refused tries and still proposes.
    Here the refusals are made up (a CPU compile never refuses): the first two compiles
    fail as a TPU's would, the third compiles."""
    refusal = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the "
               "total memory required for HLO temporaries (62.66G) exceeds available HBM "
               "(15.75G). HLO module: jit_train_step.")
    code = ("import sys, jax, jax.stages; real = jax.stages.Lowered.compile; calls = []\n"
            "def compile(self, *a, **k):\n"
            "    calls.append(1)\n"
            f"    if len(calls) <= 2: raise jax.errors.JaxRuntimeError({refusal!r})\n"
            "    return real(self, *a, **k)\n"
            "jax.stages.Lowered.compile = compile\n"
            "from jaxlm import cli, plan; cli.run(plan.main, sys.argv[1:])")
    proc = subprocess.run(
        [sys.executable, "-c", code, f"--config={REPO}/configs/gpt/debug.py", "--topology=cpu:1",
         "--device-memory=100", "--config.model.num_layers=1", "--config.model.d_model=32",
         "--config.model.mlp_dim=64", "--config.train.batch_size=4"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert ("fits: NO, XLA refused to compile the step: Ran out of memory on HBM, the total "
            "memory required for HLO temporaries (62.66G) exceeds available HBM (15.75G);") in out
    tried = [x for x in out.splitlines() if x.startswith("  tried ")]
    assert len(tried) == 2 and "XLA refused it (Ran out of memory on HBM" in tried[0], out
    assert tried[1].endswith(" GB") and "peak" in tried[1], out
    proposal = tried[1].removeprefix("  tried ").split(":")[0]
    assert f"proposal: {proposal} (peak" in out, out


def test_candidates_keep_the_maths_and_come_cheapest_first():
    cfg = config("dp", 8, 1, 1)
    cfg.data.seq_len, cfg.model.max_len = 256, 256
    mesh = {"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1}
    tpu = plan.candidates(cfg, mesh, cpu=False)
    assert tpu == [{"train.loss_chunk": 128},
                   {"model.remat": True, "model.remat_policy": "save_dots_no_batch"},
                   {"model.remat": True, "model.remat_policy": "full"},
                   {"mesh.strategy": "fsdp", "mesh.fsdp": 8, "mesh.data": 1}]  # batch 8 = dp 8
    assert plan.candidates(cfg, mesh, cpu=True) == [tpu[0], tpu[3]]  # remat: not seen on CPU


def test_device_memory_budget():
    assert plan.device_memory("TPU v5 lite") == 15.75 * 2 ** 30  # as XLA counts it
    assert plan.device_memory("TPU v5") == 95.73 * 2 ** 30
    assert plan.device_memory("NVIDIA H100 80GB HBM3") == 80e9
    assert plan.device_memory("cpu") is None
    assert plan.memory_flag("24GB") == plan.memory_flag("24") == 24e9
    assert plan.device_memory("TPU v5 lite", plan.memory_flag("8")) == 8e9
    assert plan.memory_flag("") is None
    with pytest.raises(plan.ConfigError, match="--device-memory=lots: expected GB per device"):
        plan.memory_flag("lots")


def test_listing_folds_blocks_sharded_alike():
    specs = {f"['{block_name(i)}']['w']": "P('fsdp', None)" for i in range(3)}
    specs["['embed']"] = "P(None,)"
    assert plan.fold_layers(specs) == {"['block_*']['w'] (x3)": "P('fsdp', None)",
                                       "['embed']": "P(None,)"}
