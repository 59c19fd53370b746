"""Bad input and faults, as a new user meets them: each ends with one line naming the field,
file or checkpoint, the documented exit code (2 user error, 130 Ctrl-C), and a workdir
exactly as it was (every file hashed before and after).

Categories: config values, paths, names, checkpoints (refused resumes, damaged files),
concurrency (one writer per workdir), signals (Ctrl-C), a full disk. The launchers'
quoting is tested in test_launch.py.
"""

import asyncio
import contextlib
import errno
import gc
import importlib
import io
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO
from test_checkpoint import wait_for_step
from test_launch import SIGINT_DEFAULT
from test_main import TINY, tree_digest

from jaxlm import checkpoint, cli, workdir
from jaxlm.runlog import read_history

COMMANDS = {"main": "jaxlm.main", "train": "jaxlm.train.__main__",
            "evaluate": "jaxlm.evaluate.__main__", "export": "jaxlm.export",
            "plan": "jaxlm.plan", "finetune": "jaxlm.finetune", "quantize": "jaxlm.quantize",
            "interop": "jaxlm.interop.__main__", "prepare": "jaxlm.data.prepare",
            "tokenizers": "jaxlm.data.tokenizers.__main__"}
DEBUG = f"--config={REPO}/configs/gpt/debug.py"


def command(name, *args):
    """`python -m jaxlm.<name> args` in this process (`name` a key of COMMANDS or a module
    path): (exit code, its "error:" lines)."""
    module = importlib.import_module(COMMANDS.get(name, name))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.run(module.main, list(args))
            code = 0
        except SystemExit as e:
            code = e.code
    return code, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


def refused(name, workdir_path, *args, match, code=2):
    """Runs a command that must be refused; checks code, one error line, untouched workdir."""
    before = tree_digest(workdir_path) if workdir_path.exists() else None
    got, errors = command(name, DEBUG, f"--workdir={workdir_path}", *TINY, *args)
    assert got == code and len(errors) == 1, (got, errors)
    assert match in errors[0], errors[0]
    after = tree_digest(workdir_path) if workdir_path.exists() else None
    assert after == before, "the refused command changed the workdir"
    return errors[0]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    path = tmp_path_factory.mktemp("bad_input") / "run"
    code, errors = command("train", DEBUG, f"--workdir={path}", *TINY,
                           "--config.train.steps=4", "--config.checkpoint.every=2")
    assert code == 0, errors
    return path


@pytest.fixture
def run_dir(trained_once, tmp_path):
    shutil.copytree(trained_once, tmp_path / "run")
    return tmp_path / "run"


def flip_bytes(path, offset_fraction=0.5, count=4):
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_fraction)
    for i in range(at, at + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def silently_damage(run_dir, step=4):
    """Flips 4 bytes in a data file of checkpoint `step` such that it still restores without
    any error, with other parameter values: bit rot that nothing notices without checksums.
    Orbax's file layout is not fixed (which file holds which array varies from run to run),
    so the flip is searched for: data files largest first, 16 offsets each."""
    import jax
    import numpy as np

    from jaxlm import config
    from jaxlm.errors import CheckpointError
    from jaxlm.setup import build
    ckpt = checkpoint.Checkpointer(run_dir, read_only=True)
    setup = build(config.from_dict(ckpt.read_meta(step)["config"]))
    ckpt.verify = False
    read = lambda: jax.device_get(ckpt.restore_params(step, setup.abstract_params,
                                                      setup.param_shardings))
    good = jax.tree_util.tree_leaves(read())
    data_files = sorted((p for p in (run_dir / "checkpoints" / str(step) / "state").rglob("*")
                         if p.is_file() and p.parent.name == "d"), key=lambda p: -p.stat().st_size)
    try:
        for path in data_files:
            original = path.read_bytes()
            for k in range(1, 17):
                flip_bytes(path, k / 17)
                try:
                    got = jax.tree_util.tree_leaves(read())
                except CheckpointError:
                    got = good
                if any(not np.array_equal(a, b) for a, b in zip(good, got)):
                    return path
                path.write_bytes(original)
        # No flip landed in parameter data this time (it may all sit in zstd frames that
        # notice, or in B-tree nodes): change a parameter under the same metadata instead,
        # which is what a silent flip amounts to.
        from jaxlm.train.build import build_train
        run = build_train(setup.cfg)
        state, meta = ckpt.restore(step, run.abstract_state, run.state_shardings)
        params = jax.tree_util.tree_map(lambda x: x, state.params)
        params["embed"]["tokens"]["embedding"] = params["embed"]["tokens"]["embedding"] + 1e-3
        ckpt.close()
        writer = checkpoint.Checkpointer(run_dir)
        writer.verify = False  # keep the old checksums in the meta
        writer.manager.delete(step)
        writer.save(step, state.replace(params=params), meta)
        writer.wait()
        writer.close()
        return None
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("args,match", [
    (["--config.optimizer.learning_rate=-0.001"], "config.optimizer.learning_rate=-0.001 must be positive"),
    (["--config.model.dropout=1.5"], "config.model.dropout=1.5 must be in [0, 1)"),
    (["--config.train.batch_size=0"], "config.train.batch_size=0 must be positive"),
    (["--config.evaluate.num_examples=0"], "config.evaluate.num_examples=0 must be positive"),
    (["--config.evaluate.max_new_tokens=500"], "config.evaluate.max_new_tokens=500 leaves no room"),
    (["--config.data.seq_len=256"], "config.data.seq_len=256 exceeds config.model.max_len=128"),
    (["--config.train.stpes=3"], "did you mean config.train.steps"),
    (["--config.model.attention_impl=cudnn"], "config.model.attention_impl='cudnn' needs an NVIDIA GPU"),
    (["--config.model.attention_impl=splash"], "config.model.attention_impl='splash' needs a TPU"),
    (["--config.model.remat_policy=save_everything"], "config.model.remat_policy='save_everything': expected 'full'"),
    (["--config.model.remat=true", "--config.model.remat_policy=offload_dots"],
     "config.model.remat_policy='offload_dots' moves saved activations to host memory"),
])
def test_bad_values_are_refused_before_anything_starts(tmp_path, args, match):
    refused("main", tmp_path / "new", *args, match=match)
    assert not (tmp_path / "new").exists()


CONFIG_FILES = {  # a config file's own mistakes: one line with the file, line and field
    "undeclared": ("from jaxlm.config import base_config\ndef get_config():\n    c = base_config()\n"
                   "    c.model.num_layer = 3\n    return c\n",
                   "undeclared.py:4 (c.model.num_layer = 3): no config field 'num_layer' (did "
                   "you mean config.model.num_layers?)"),
    "section": ("from jaxlm.config import base_config\ndef get_config():\n    c = base_config()\n"
                "    c.modle.d_model = 3\n    return c\n",
                "section.py:4 (c.modle.d_model = 3): no config field 'modle' (did you mean "
                "config.model?)"),
    "syntax": ("def get_config(:\n    pass\n", "syntax.py:1: invalid syntax"),
    "raises": ("def get_config():\n    raise ValueError('no such size')\n",
               "raises.py:2 (raise ValueError('no such size')): ValueError: no such size"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_a_config_file_that_fails_is_one_line_naming_file_and_line(tmp_path, monkeypatch, name):
    text, match = CONFIG_FILES[name]
    (tmp_path / f"{name}.py").write_text(text)
    code, errors = command("train", f"--config={tmp_path / name}.py", f"--workdir={tmp_path / 'w'}")
    assert code == 2 and len(errors) == 1 and match in errors[0], errors
    assert not (tmp_path / "w").exists()
    monkeypatch.setenv("JAXLM_TRACEBACK", "1")  # for debugging: the whole traceback
    with pytest.raises((SyntaxError, AttributeError, ValueError)):
        command("train", f"--config={tmp_path / name}.py", f"--workdir={tmp_path / 'w'}")


@pytest.mark.parametrize("args,match", [
    (["--topology=cpu:eight"], "--topology=cpu:eight: expected cpu:N with N a whole number"),
    (["--topology=cpu:0"], "--topology=cpu:0: expected cpu:N"),
    (["--topology=cpu:"], "--topology=cpu:: expected cpu:N"),
    (["--topology=cpu:-2"], "--topology=cpu:-2: expected cpu:N"),
    (["--config.mesh.rules=(('embed',),)"],
     "config.mesh.rules: ('embed',) is not a (logical axis, mesh axes) pair"),
    (["--config.mesh.rules=(('embed','fsdp','x'),)"], "is not a (logical"),
    (["--config.mesh.rules=(('embed',3),)"], "the mesh axes are a name, a tuple of names or None"),
])
def test_malformed_topologies_and_mesh_rules_are_named(tmp_path, args, match):
    if args[0].startswith("--topology"):
        code, errors = command("plan", DEBUG, *args)
        assert code == 2 and len(errors) == 1 and match in errors[0], errors
    else:  # where every command meets them: building the model
        refused("train", tmp_path / "new", *args, match=match)
        assert not (tmp_path / "new").exists()


def test_fine_tuning_refuses_what_it_cannot_honour(tmp_path):
    """A selection metric the task lacks, a CSV row wider than its header, a slice that is
    not [a:b]: one line each, before anything is written."""
    from jaxlm import finetune
    from jaxlm.config import load_config
    from jaxlm.data import labelled
    from jaxlm.errors import ConfigError, DataError
    cfg = load_config(REPO / "configs/bert/facts.py")
    cfg.model.num_classes, cfg.finetune.best_metric = 6, "f1"
    with pytest.raises(ConfigError, match="'f1' is binary F1, defined for 2 classes"):
        finetune.finetune(cfg, tmp_path / "ft")
    cfg.model.num_classes, cfg.finetune.best_metric = 3, "roc_auc"  # the facts have 2 classes
    with pytest.raises(ConfigError, match="needs every class among the validation examples"):
        finetune.finetune(cfg, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()
    ft = cfg.finetune
    (tmp_path / "d.csv").write_text("sentence,label\nfine,1\nnot, quoted,0\n")
    with pytest.raises(DataError, match=r"d.csv:3: 3 fields, the header has 2"):
        labelled.read(str(tmp_path / "d.csv"), ft, 2)
    for spec, match in ((f"{tmp_path / 'd.csv'}[-5:]", r"\[-5:\]: a slice of the examples is \[a:b\]"),
                        (f"{tmp_path / 'd.csv'}[1]", r"\[1\]: a slice"),
                        (f"{tmp_path / 'd.csv'}[3:1]", r"\[3:1\]: the slice is empty")):
        with pytest.raises(ConfigError, match=match):
            labelled.read(spec, ft, 2)


# ----------------------------------------------------------------------------- paths


def test_workdir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    refused("train", tmp_path / "file", match="is a file, not a folder")
    refused("train", tmp_path / "file" / "run", match=f"{tmp_path / 'file'} is a file, not a folder")


def test_empty_workdir_flag_writes_nothing_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, errors = command("train", DEBUG, "--workdir=", *TINY)
    assert code == 2 and errors == ["error: --workdir= is empty; expected --workdir=DIR"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_workdir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    refused("train", locked / "run", match="is not writable (permission denied)")


@pytest.mark.parametrize("name", ["evaluate", "export"])
def test_read_only_commands_create_nothing_at_a_mistyped_path(tmp_path, name):
    extra = [f"--output={tmp_path / 'out'}"] if name == "export" else []
    refused(name, tmp_path / "typo", *extra, match="no such folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_into_a_missing_folder(run_dir, tmp_path):
    refused("export", run_dir, f"--output={tmp_path / 'missing' / 'export'}",
            match=f"the folder {tmp_path / 'missing'} does not exist (create it first)")


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("name,args,match", [
    ("main", ["--config.data.tokenizer=bpe"], "config.data.tokenizer='bpe': unknown tokenizer"),
    ("main", ["--config.mesh.strategy=zero3"], "config.mesh.strategy='zero3': expected one of"),
    ("main", ["--config.model.arch=llama"], "config.model.arch='llama': expected one of"),
    ("main", ["--config.train.objective=masked"], "config.train.objective='masked': expected one of"),
    ("main", ["--config.evaluate.tasks=rule_mc,hellaswagg"],
     "config.evaluate.tasks: unknown task(s) ['hellaswagg']"),
    ("train", ["--config.data.name=no_such_dataset", "--config.data.data_dir={tmp}"],
     "config.data.name='no_such_dataset': no TFDS dataset of that name"),
])
def test_bad_names_are_refused_before_training(tmp_path, name, args, match):
    args = [a.format(tmp=tmp_path) for a in args]
    refused(name, tmp_path / "new", *args, match=match)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("args,match", [  # each a string TFDS would take but not read back
    (["text", "--name=MyCorpus", "--split=train:{doc}"], "--name=MyCorpus: TFDS reads back only snake-case"),
    (["text", "--name=my-corpus", "--split=train:{doc}"], "--name=my-corpus: TFDS reads back only"),
    (["text", "--name=c", "--split=dev.1:{doc}"], "the split name 'dev.1' is not one TFDS can read back"),
    (["text", "--name=c", "--split=train:{doc}", "--split=train:{doc}"], "split 'train' is given twice"),
    (["text", "--name=c", "--split=train:{doc},"], "expected SPLIT:FILE[,FILE...]"),
    (["tfds", "--name=tiny shakespeare", "--manual_dir={tmp}"], "'tiny shakespeare' is not a TFDS dataset name"),
])
def test_prepare_checks_dataset_and_split_names(tmp_path, args, match):
    doc = tmp_path / "doc.txt"
    doc.write_text("one document\n")
    args = [a.format(doc=doc, tmp=tmp_path) for a in args]
    code, errors = command("prepare", *args, f"--data_dir={tmp_path / 'tfds'}")
    assert code == 2 and len(errors) == 1 and match in errors[0], errors
    assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("spec,match", [
    ("byte:x", "expected 'byte' or 'byte:bert'"),
    ("sentencepiece:{doc}", "is not a SentencePiece model file"),
    ("gpt2:{tmp}", "holds no GPT-2 vocabulary"),
    ("wordpiece:{tmp}", "holds no vocab.txt"),
])
def test_tokenizer_specs_are_checked_before_training(tmp_path, spec, match):
    doc = tmp_path / "doc.txt"
    doc.write_text("not a model\n")
    refused("train", tmp_path / "new", f"--config.data.tokenizer={spec.format(doc=doc, tmp=tmp_path)}",
            match=match)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("args,match", [
    (["--input={doc},", "--output={tmp}/spm.model"], "--input: '' is not a file"),
    (["--input={doc}", "--output={tmp}"], "is a folder; expected the model file"),
])
def test_tokenizer_training_checks_its_files_first(tmp_path, args, match):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text\n")
    before = sorted(tmp_path.iterdir())
    code, errors = command("tokenizers", "train", "--vocab_size=280",
                           *[a.format(doc=doc, tmp=tmp_path) for a in args])
    assert code == 2 and len(errors) == 1 and match in errors[0], errors
    assert sorted(tmp_path.iterdir()) == before


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("args,match", [
    (["--config.train.batch_size=16"], "the batch size changed mid-run"),
    (["--config.train.steps=3"], "config.train.steps=3 is below the step of the latest checkpoint"),
    (["--config.model.num_layers=3"], "config.model.num_layers is 2 there and 3 here"),
    (["--config.model.scan_layers=true"], "config.model.scan_layers is False there and True "
     "here; pass --config.model.scan_layers=false"),
    (["--config.data.seed=1"], "checkpoint 4 was trained on other data"),
])
def test_refused_resumes_change_no_file(run_dir, args, match):
    refused("main", run_dir, "--config.train.steps=6", *args, match=match)


def test_a_flipped_byte_is_named_with_the_intact_checkpoint(run_dir):
    silently_damage(run_dir)
    message = refused("train", run_dir, "--config.train.steps=6", match="checkpoints/4")
    assert "does not match the checksum saved with it" in message
    assert "checkpoint 2 is intact" in message
    assert f"move {run_dir / 'checkpoints' / '4'} out of" in message
    message = refused("evaluate", run_dir, match="damaged")
    assert "evaluate it with --config.checkpoint.step=2" in message
    code, errors = command("evaluate", DEBUG, f"--workdir={run_dir}", *TINY,
                           "--config.checkpoint.step=2", "--config.evaluate.tasks=rule_mc",
                           "--config.evaluate.shots=(0,)")
    assert code == 0, errors
    # fine-tuning from it names the intact one as well, before anything is written
    message = refused("finetune", run_dir.parent / "ft", f"--config.finetune.init={run_dir}",
                      "--config.model.num_classes=2", match="damaged")
    assert f"start from it with --config.finetune.init={run_dir / 'checkpoints' / '2'}" in message


def test_a_changed_meta_file_is_named(run_dir):
    meta = run_dir / "checkpoints" / "4" / "meta" / "metadata"  # Orbax's JSON file
    text = meta.read_text()
    meta.write_text(text.replace('"next_sample": 32', '"next_sample": 33'))
    assert meta.read_text() != text
    refused("train", run_dir, "--config.train.steps=6", match="meta is damaged")


def test_without_verification_a_flip_goes_unnoticed(run_dir):
    """What config.checkpoint.verify buys: the same damage, not checked, restores."""
    silently_damage(run_dir)
    code, errors = command("evaluate", DEBUG, f"--workdir={run_dir}", *TINY,
                           "--config.checkpoint.verify=false", "--config.evaluate.tasks=rule_mc",
                           "--config.evaluate.shots=(0,)")
    assert code == 0, errors


def test_an_unreadable_checkpoint_is_refused_in_one_line_every_time(trained_once, tmp_path):
    """When one array fails to read, Orbax closes the event loop with the other reads still
    pending; collected whenever Python's garbage collector ran, they printed ~1,000 lines
    of "Exception ignored in: <coroutine ...>" around the refusal in about one resume in
    three. Eight resumes (two at a time) of a run whose checkpoints each have one data file
    cut short (so one array fails, the others read on) end with that one line on stderr."""
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_once, damaged)
    for step in (2, 4):
        data = max((p for p in (damaged / "checkpoints" / str(step) / "state").rglob("*")
                    if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[:100])
    for pair in range(4):
        procs = []
        for i in (2 * pair, 2 * pair + 1):  # a resume locks its workdir: one copy each
            shutil.copytree(damaged, tmp_path / f"run{i}")
            procs.append(subprocess.Popen(_train_cmd(tmp_path / f"run{i}", "--config.train.steps=6"),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True, cwd=REPO))
        for proc in procs:
            err = proc.communicate(timeout=300)[1]
            lines = err.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, (len(lines), err[:3000])
            assert lines[0].startswith("error: checkpoint ") and "cannot be read" in lines[0], lines
            assert "no older checkpoint there is intact either" in lines[0], lines


# ----------------------------------------------------------------------------- concurrency


def _train_cmd(path, *extra):
    return [sys.executable, "-m", "jaxlm.train", DEBUG, f"--workdir={path}", *TINY, *extra]


def test_two_runs_on_one_workdir_exactly_one_trains(tmp_path):
    race_two_writers(_train_cmd(tmp_path / "run", "--config.train.steps=30",
                                "--config.train.log_every=1"), tmp_path / "run")


def race_two_writers(cmd: list[str], workdir) -> None:
    """Starts the 30-step training `cmd` twice at once on `workdir`: exactly one trains and
    writes its 30 log lines, the other exits 2 with one line naming the lock's holder."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [r[1][-2000:] for r in results]
    loser = next(err for p, (_, err) in zip(procs, results) if p.returncode == 2)
    assert loser.strip().splitlines()[-1].startswith(f"error: --workdir={workdir} is in use by ")
    assert "pid" in loser and "Traceback" not in loser
    assert [h["step"] for h in read_history(workdir)] == list(range(1, 31))  # one run's lines


def test_evaluation_may_run_beside_a_training_run(run_dir):
    claim = workdir.claim(run_dir)  # as a running jaxlm.train holds it
    try:
        message = refused("train", run_dir, "--config.train.steps=6", match="is in use by")
        assert f"pid {os.getpid()}" in message
        code, errors = command("evaluate", DEBUG, f"--workdir={run_dir}", *TINY,
                               "--config.evaluate.tasks=rule_mc", "--config.evaluate.shots=(0,)")
        assert code == 0, errors
    finally:
        claim.accept()
        claim.release()


# ----------------------------------------------------------------------------- signals


@contextlib.contextmanager
def _long_run_at_step_3(path, sigint=SIGINT_DEFAULT):
    """A training run that would go on for ever, once it has logged step 3, killed when
    the block ends; `sigint` is the `-c` script that starts it (the default: SIGINT at its
    default, as from a terminal)."""
    command = _train_cmd(path, "--config.train.steps=100000", "--config.train.log_every=1",
                         "--config.checkpoint.every=1000")
    proc = subprocess.Popen([sys.executable, "-c", sigint, *command[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(path, 3, proc)
        yield proc
    finally:
        proc.kill()


def test_ctrl_c_saves_at_the_next_step_and_exits_130(tmp_path):
    path = tmp_path / "run"
    with _long_run_at_step_3(path) as proc:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    saved = checkpoint.Checkpointer(path, read_only=True).steps()
    assert proc.returncode == 130 and len(saved) == 1 and saved[0] >= 3, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"error: interrupted (Ctrl-C): saved checkpoint "
                                            f"{saved[0]}; run the same command to continue")
    assert "Traceback" not in err


def test_a_run_started_with_ctrl_c_ignored_stays_deaf_to_it(tmp_path):
    """A shell script starts its background jobs with SIGINT ignored, so that Ctrl-C at
    the terminal does not reach them: the run trains on (SIGTERM still stops it)."""
    path = tmp_path / "run"
    with _long_run_at_step_3(path, sigint=SIGINT_DEFAULT.replace("SIG_DFL", "SIG_IGN")) as proc:
        proc.send_signal(signal.SIGINT)
        wait_for_step(path, max(h["step"] for h in read_history(path)) + 3, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    saved = checkpoint.Checkpointer(path, read_only=True).steps()
    assert proc.returncode == 0 and len(saved) == 1, err[-2000:]
    assert f"preempted (SIGTERM): saved step {saved[0]}; exiting" in err


_CTRL_C = """
import gc, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, not ignored
from jaxlm import cli, interrupt
interrupt.install()
case, where = sys.argv[1:]

def in_a_gc_callback(phase, info):  # as JAX's: Python drops what is raised in it
    if phase == "start" and in_a_gc_callback in gc.callbacks:
        gc.callbacks.remove(in_a_gc_callback)
        signal.raise_signal(signal.SIGINT)
        sum(range(1000))  # the handler runs here

def main(argv):
    if case == "import":  # a module whose import takes Ctrl-C half-way
        sys.path.insert(0, where)
        import interrupted_import
        print("imported", interrupted_import.WHOLE, flush=True)
    else:
        gc.callbacks.append(in_a_gc_callback)
        gc.collect()
        print("collected", flush=True)
    time.sleep(60)
    print("not interrupted", flush=True)

cli.run(main, [])
"""


_EXTENSION_LIKE = """
import signal
try:  # as jaxlib's extension reports anything raised while it loads
    signal.raise_signal(signal.SIGINT)
    WHOLE = sum(range(10**5)) > 0
except BaseException as e:
    raise ImportError("Encountered an error while initializing the extension.") from e
"""


@pytest.mark.parametrize("case", ["import", "gc"])
def test_ctrl_c_during_an_import_or_a_gc_callback_still_stops_the_command(tmp_path, case):
    """Python's own handling raises KeyboardInterrupt where the signal lands: inside a C
    extension's import it became an ImportError, inside JAX's gc callback it was dropped
    and the run trained on. Held until the import is whole, raised again when dropped."""
    (tmp_path / "interrupted_import.py").write_text(_EXTENSION_LIKE)
    proc = subprocess.run([sys.executable, "-c", _CTRL_C, case, str(tmp_path)], text=True,
                          capture_output=True, timeout=50, start_new_session=True)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stdout == {"import": "imported True\n", "gc": "collected\n"}[case]
    assert proc.stderr.strip().splitlines() == [
        "error: interrupted (Ctrl-C); checkpoints already written are intact"]


def test_ctrl_c_just_as_a_command_has_restarted_itself_is_one_line(tmp_path):
    """A command re-executes itself once (huge-page malloc, cli.py); Ctrl-C as the new
    interpreter starts, before jaxlm is imported, waits for cli.run instead of printing a
    traceback; then come seconds of importing JAX."""
    # Started as from a terminal: a suite run in the background passes SIGINT on ignored,
    # and a command started so stays deaf to it (jaxlm.interrupt.install).
    command = [sys.executable, "-c", SIGINT_DEFAULT, *_train_cmd(tmp_path / "run")[1:]]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while b"glibc.malloc.hugetlb" not in _environ(proc.pid):
            assert proc.poll() is None and time.time() < deadline, "no restart seen"
            time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "error: interrupted (Ctrl-C); checkpoints already written are intact"], err[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _environ(pid) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:  # between the exec's steps
        return b""


# ----------------------------------------------------------------------------- a full disk


_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
from jaxlm import cli
from jaxlm.train import __main__ as train
cli.run(train.main, sys.argv[1:])
"""


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_save_that_the_disk_refuses_keeps_the_checkpoints_before_it(run_dir):
    """The file-size limit makes every large write fail, as a full disk does (EFBIG instead
    of ENOSPC): the run stops with one line and the checkpoints 2 and 4 still restore."""
    before = tree_digest(run_dir / "checkpoints")
    proc = subprocess.run([sys.executable, "-c", _LIMITED, DEBUG, f"--workdir={run_dir}", *TINY,
                           "--config.train.steps=6", "--config.checkpoint.every=2"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last.startswith("error: saving checkpoint 6 to ") and "File too large" in last, last
    assert "Finished checkpoints there are intact: [2, 4]" in last
    assert "Traceback" not in proc.stderr and last == proc.stderr.strip().splitlines()[-1]
    assert {k: v for k, v in tree_digest(run_dir / "checkpoints").items()
            if k.split("/")[0] in ("2", "4")} == before
    code, errors = command("evaluate", DEBUG, f"--workdir={run_dir}", *TINY,
                           "--config.evaluate.tasks=rule_mc", "--config.evaluate.shots=(0,)")
    assert code == 0, errors
    assert json.loads((run_dir / "results.json").read_text())["step"] == 4


def test_a_disk_without_room_for_the_next_checkpoint_stops_before_writing(run_dir, monkeypatch):
    """Checked before the save starts: nothing half-written, one line, 2 and 4 intact."""
    real = checkpoint.shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=1000))
    code, errors = command("train", DEBUG, f"--workdir={run_dir}", *TINY,
                           "--config.train.steps=6", "--config.checkpoint.every=2")
    assert code == 2 and len(errors) == 1, errors
    assert "saving checkpoint 6 needs about 354 kB" in errors[0] and "has 1 kB free" in errors[0]
    assert "Finished checkpoints there are intact: [2, 4]" in errors[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]


# Every command that writes params or weight files, as (command, its arguments) for a
# source run RUN, a Hugging Face folder HF and the output OUT.
WRITERS = {
    "export": lambda run, hf, out: ["export", DEBUG, f"--workdir={run}", *TINY, f"--output={out}"],
    "quantize": lambda run, hf, out: ["quantize", f"--workdir={run}", f"--out={out}",
                                      "--config.quant.mode=int8"],
    "interop import": lambda run, hf, out: ["interop", "import", f"--src={hf}", f"--out={out}"],
    "interop export": lambda run, hf, out: ["interop", "export", f"--workdir={run}", f"--out={out}"],
}


@contextlib.contextmanager
def umask(value: int):
    before = os.umask(value)
    try:
        yield
    finally:
        os.umask(before)


@pytest.fixture(scope="module")
def hf_folder(trained_once, tmp_path_factory):
    """The run as a Hugging Face folder (python -m jaxlm.interop export, under umask 027),
    with GPT-2 tokenizer files (the byte tokens alone, made 0600) to import it back."""
    from jaxlm.data.tokenizers.gpt2 import byte_alphabet
    folder = tmp_path_factory.mktemp("hf") / "hf"
    with umask(0o027):
        code, errors = command("interop", "export", f"--workdir={trained_once}", f"--out={folder}")
    assert code == 0, errors
    alpha = byte_alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alpha, key=alpha.get))}
    (folder / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": len(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    for name in ("vocab.json", "merges.txt"):
        (folder / name).chmod(0o600)
    return folder


def modes(folder):
    return {oct(p.stat().st_mode & 0o777) for p in folder.rglob("*") if p.is_file()}, \
        {oct(p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")] if p.is_dir()}


def test_written_folders_follow_the_umask(hf_folder, tmp_path):
    """Not 0600/0700 (safetensors' files, tempfile.mkdtemp's folders): the umask's modes,
    for copied tokenizer files too; and no staging folder is left beside the output."""
    assert {name: oct((hf_folder / name).stat().st_mode & 0o777) for name in
            ("model.safetensors", "config.json", ".")} == {
        "model.safetensors": "0o640", "config.json": "0o640", ".": "0o750"}
    assert sorted(p.name for p in hf_folder.parent.iterdir()) == ["hf"]
    with umask(0o022):
        code, errors = command("interop", "import", f"--src={hf_folder}", f"--out={tmp_path / 'jx'}")
    assert code == 0, errors
    assert modes(tmp_path / "jx") == ({"0o644"}, {"0o755"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jx"]


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_disk_without_room_for_an_export_refuses_it_before_writing(run_dir, hf_folder,
                                                                    tmp_path, monkeypatch, writer):
    """Checked against the arrays' bytes before anything is written: one line naming the
    output, nothing created beside it, the source untouched."""
    real = checkpoint.shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    (tmp_path / "exports").mkdir()
    out = tmp_path / "exports" / "out"
    before = tree_digest(run_dir)
    code, errors = command(*WRITERS[writer](run_dir, hf_folder, out))
    assert code == 2 and len(errors) == 1, errors
    assert f"to {out} needs about " in errors[0] and "/exports has 1 kB free" in errors[0], errors
    assert list((tmp_path / "exports").iterdir()) == [] and tree_digest(run_dir) == before


_WRITE_LIMITED = """
import importlib, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from jaxlm import cli
cli.run(importlib.import_module(sys.argv[1]).main, sys.argv[2:])
"""


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_exports_the_disk_refuses_are_one_line_and_leave_nothing(trained_once, hf_folder, tmp_path):
    """The file-size limit fails the writes of Orbax (TensorStore), safetensors and Python
    as a full disk does (EFBIG instead of ENOSPC), past the free-space check: each writer
    ends with one line naming its output (exit 2, no traceback, no Orbax log), and leaves
    neither the output nor a temporary folder. The four commands run side by side."""
    # XLA's compilation cache is read, not written: its entries would meet the limit too.
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "100000"}
    procs = {}
    for writer, argv in WRITERS.items():
        (tmp_path / writer).mkdir()
        name, *args = argv(trained_once, hf_folder, tmp_path / writer / "out")
        procs[writer] = subprocess.Popen([sys.executable, "-c", _WRITE_LIMITED, COMMANDS[name], *args],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         cwd=REPO, env=env)
    for writer, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (writer, err[-3000:])
        assert lines[0].startswith("error: writing the ") and "File too large" in lines[0], lines
        assert f"to {tmp_path / writer / 'out'} failed: " in lines[0], lines
        assert list((tmp_path / writer).iterdir()) == [], writer


def test_a_failed_write_is_one_error_even_if_orbax_leaves_a_failure_unobserved(tmp_path, caplog):
    """Orbax runs a write's arrays as tasks of an event loop that it closes as soon as one
    fails (its asyncio_utils.run_sync, called here as a save calls it). An array failing in
    the loop's last turn is never looked at, and asyncio logs "Task exception was never
    retrieved" when the garbage collector frees it: with four writers side by side, now
    and then before the first failure had reached jaxlm. Here the collector runs at that
    moment: the write still ends in the one CheckpointError, and nothing is logged."""
    from orbax.checkpoint._src import asyncio_utils

    async def array(turns):
        for _ in range(turns):
            await asyncio.sleep(0)
        raise OSError(errno.EFBIG, "File too large")

    async def arrays():  # one of them fails in the loop's last turn
        await asyncio.gather(*(array(turns) for turns in range(8)))

    caplog.set_level(logging.WARNING, logger="asyncio")  # whatever an earlier command set
    with pytest.raises(checkpoint.CheckpointError, match="File too large"):
        with checkpoint.writing(tmp_path / "out", "the export", 0):
            try:
                asyncio_utils.run_sync(arrays())
            finally:
                gc.collect()
    assert [r.getMessage() for r in caplog.records] == [] and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_data_writers_the_disk_refuses_are_one_line_and_leave_nothing(tmp_path):
    """Preparing a dataset (TFDS's array_record writer) and training a tokenizer, past the
    file-size limit: one line naming the output, exit 2, nothing left behind."""
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123456789"), 6)) for _ in range(3000)]
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(2000)))
    runs = {"prepare": ["jaxlm.data.prepare", "text", "--name=big", "--unit=paragraph",
                        f"--data_dir={tmp_path / 'prepare' / 'tfds'}", f"--split=train:{corpus}"],
            "tokenizers": ["jaxlm.data.tokenizers.__main__", "train", f"--input={corpus}",
                           "--vocab_size=2000", f"--output={tmp_path / 'tokenizers' / 'spm.model'}"]}
    procs = {}
    for name, argv in runs.items():
        (tmp_path / name).mkdir()
        procs[name] = subprocess.Popen([sys.executable, "-c", _WRITE_LIMITED, *argv], cwd=REPO,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (name, err[-3000:])
        assert "File too large" in lines[0] and str(tmp_path / name) in lines[0], lines
        assert list((tmp_path / name).iterdir()) == [], name


def test_a_trained_tokenizer_follows_the_umask(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), 4)) for _ in range(200)]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(500)))
    with umask(0o022):
        code, errors = command("tokenizers", "train", f"--input={corpus}", "--vocab_size=300",
                               f"--output={tmp_path / 'spm.model'}")
    assert code == 0, errors
    assert oct((tmp_path / "spm.model").stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "spm.model"]


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    with _long_run_at_step_3(tmp_path / "run") as proc:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)")
