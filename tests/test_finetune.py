"""Fine-tuning for classification: labelled data (files, errors with file and line),
the encoder's input format, metrics against hand-computed values, and the command end to
end: from a pretrained checkpoint, best params kept, results and plots, exact resume,
evaluation-only mode, and the refusals."""

import importlib
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_bert_config, tiny_config
from test_main import tree_digest

from jaxlm import cli
from jaxlm.data import labelled
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import CheckpointError, ConfigError, DataError
from jaxlm.evaluate import classification
from jaxlm.runlog import read_history
from jaxlm.train import loop

TOK = get_tokenizer("byte:bert")


def ft_config(**finetune):
    cfg = tiny_bert_config(num_classes=2)
    cfg.finetune.update(train_examples=32, epochs=2, batch_size=8, learning_rate=1e-3,
                        class_names=("false", "true"))
    cfg.finetune.update(**finetune)
    cfg.evaluate.batch_size = 25
    return cfg


# ----------------------------------------------------------------------------- data


def write(path, text):
    path.write_text(text)
    return str(path)


def test_files_of_every_format_with_names_pairs_and_slices(tmp_path):
    ft = ft_config(text_field="a", pair_field="b", label_field="y", class_names=("neg", "pos")).finetune
    jsonl = write(tmp_path / "d.jsonl", '{"a": "x", "b": "y", "y": "pos"}\n{"a": "u", "b": "v", "y": 0}\n')
    csv = write(tmp_path / "d.csv", 'a,b,y\nx,"y, with comma",1\nu,v,neg\n')
    tsv = write(tmp_path / "d.tsv", "a\tb\ty\nx\ty\t1\nu\tv\t0\n")
    for spec in (jsonl, csv, tsv):
        data = labelled.read(spec, ft, 2)
        assert data.labels.tolist() == [1, 0] and data.texts == ["x", "u"]
        assert data.pairs[0].startswith("y")
    assert labelled.read(f"{jsonl}[1:]", ft, 2).texts == ["u"]


@pytest.mark.parametrize("content,match", [
    ('{"sentence": "ok", "label": 1}\n{"sentence": "fine", "label": 2}\n',
     r"d.jsonl:2: label 2 is not a class of config.model.num_classes=2 \(0..1 or one of"),
    ('{"sentence": "ok", "label": 1}\n{"text": "x", "label": 0}\n',
     r"d.jsonl:2: no field 'sentence' \(config.finetune.text_field\)"),
    ('{"sentence": "ok", "label": 1}\n{"sentence": "  ", "label": 0}\n', r"d.jsonl:2: field 'sentence' is empty"),
    ('{"sentence": "ok", "label": 1}\n{"sentence": "x", "label": 0.5}\n', r"d.jsonl:2: label 0.5"),
])
def test_bad_examples_are_named_with_file_and_line(tmp_path, content, match):
    with pytest.raises(DataError, match=match):
        labelled.read(write(tmp_path / "d.jsonl", content), ft_config().finetune, 2)


def test_the_real_sst2_slice_reads():
    path = SHARED_DATA / "fewshot/sst2/validation.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data absent: {path}")
    data = labelled.read(str(path), ft_config().finetune, 2)
    assert len(data) == 500 and set(data.labels.tolist()) == {0, 1}


def test_encoder_formats_and_cuts_the_longest_part_first():
    bert = labelled.Encoder(TOK, 12, pooled=True)
    ex = bert("abc", "de")
    cls, sep = TOK.bert_ids["cls"], TOK.bert_ids["sep"]
    assert ex["tokens"][:8].tolist() == [cls, 97, 98, 99, sep, 100, 101, sep]
    assert ex["types"][:9].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert ex["segments"].tolist() == [1] * 8 + [0] * 4 and bert.truncated == 0
    ex = bert("abcdefgh", "xy")   # 8 + 2 > 12 - 3: the longer part loses 1
    assert ex["tokens"].tolist() == [cls] + list(b"abcdefg") + [sep, 120, 121, sep]
    assert bert.truncated == 1
    gpt = labelled.Encoder(get_tokenizer("byte"), 6, pooled=False)
    assert gpt("abc")["tokens"].tolist() == [256, 97, 98, 99, 257, 257]


def test_synthetic_facts_are_balanced_and_split():
    train, val = labelled.synthetic_facts("train"), labelled.synthetic_facts("validation")
    assert abs(train.labels.mean() - 0.5) < 0.01 and abs(val.labels.mean() - 0.5) < 0.02
    assert not set(train.texts) & set(val.texts)


# ----------------------------------------------------------------------------- metrics


def test_metrics_agree_with_hand_computed_values():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p1 = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])   # predicted 1 1 0 0 1 0 0 1
    m = classification.metrics(labels, np.stack([1 - p1, p1], axis=1))
    tp, fp, fn, tn = 3, 1, 1, 3
    assert m["accuracy"] == 6 / 8 and m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["precision"] == tp / (tp + fp) and m["recall"] == tp / (tp + fn)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    assert m["mcc"] == pytest.approx((tp * tn - fp * fn) / np.sqrt(4 * 4 * 4 * 4))
    # ROC-AUC: the share of (positive, negative) pairs ranked right: 14 of 16
    assert m["roc_auc"] == pytest.approx(14 / 16)
    three = classification.metrics(np.array([0, 1, 2, 2]), np.eye(3)[[0, 2, 2, 1]])
    assert three["accuracy"] == 0.5 and "f1" not in three
    assert three["f1_macro"] == pytest.approx(np.mean([1.0, 0.0, 0.5]))
    assert classification.metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))["roc_auc"] is None


# ----------------------------------------------------------------------------- the command


def command(*argv):
    module = importlib.import_module("jaxlm.finetune")
    return cli.run(module.main, list(argv))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny BERT after 10 steps of masked-LM pretraining."""
    path = tmp_path_factory.mktemp("pretrained") / "run"
    cfg = tiny_bert_config()
    cfg.train.steps, cfg.checkpoint.every = 10, 10
    loop.train(cfg, path, jax.devices()[:1])
    return path


def run_finetune(cfg, workdir):
    from jaxlm import finetune
    return finetune.finetune(cfg, workdir)


def test_finetune_end_to_end_and_evaluation_only(pretrained, tmp_path):
    cfg = ft_config(init=str(pretrained))
    cfg.data.seq_len = 24  # some facts are longer: they are cut, and counted
    out = run_finetune(cfg, tmp_path / "ft")
    assert out["train_examples"] == 32 and len(out["epochs"]) == 2
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert set(results["validation"]) >= {"accuracy", "f1", "f1_macro", "mcc", "roc_auc",
                                          "confusion_matrix", "precision", "recall"}
    assert results["best_step"] in (4, 8) and results["truncated"]["training"] > 0
    best = max(e["accuracy"] for e in results["epochs"])
    assert results["validation"]["accuracy"] == pytest.approx(best)   # the best epoch's params
    for png in ("curves.png", "roc.png", "confusion.png"):
        assert (tmp_path / "ft" / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    history = read_history(tmp_path / "ft")
    assert [h["step"] for h in history if "validation_accuracy" in h] == [4, 8]
    # exp(loss) of a class objective is no perplexity: none is logged
    assert all("loss" in h and "perplexity" not in h for h in history if "grad_norm" in h)
    # evaluation-only: the best params on another labelled set
    got = labelled_eval(cfg, tmp_path / "ft", "synthetic:facts:train")
    assert got["examples"] == 225 and 0 <= got["accuracy"] <= 1


def labelled_eval(cfg, workdir, spec):
    from jaxlm import finetune
    return finetune.evaluate_file(cfg, workdir, spec)


def test_finetune_resumes_exactly(pretrained, tmp_path):
    cfg = ft_config(init=str(pretrained), epochs=3)
    run_finetune(cfg, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "12")
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln)["step"] <= 8]
    (tmp_path / "resumed" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    run_finetune(cfg, tmp_path / "resumed")
    a, b = read_history(tmp_path / "full"), read_history(tmp_path / "resumed")
    assert [h.get("loss") for h in a] == [h.get("loss") for h in b]
    assert [h.get("validation_accuracy") for h in a] == [h.get("validation_accuracy") for h in b]


def test_finetuning_a_gpt_checkpoint_as_bert_is_refused_and_writes_nothing(tmp_path):
    gpt = tiny_config()
    gpt.train.steps, gpt.checkpoint.every = 2, 2
    loop.train(gpt, tmp_path / "gpt", jax.devices()[:1])
    cfg = ft_config(init=str(tmp_path / "gpt"))
    with pytest.raises(CheckpointError, match="holds a GPT model, and this config fine-tunes "
                                              "config.model.arch='bert'"):
        run_finetune(cfg, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_a_head_of_another_class_count_is_refused(pretrained, tmp_path):
    cfg = ft_config(init=str(pretrained))
    run_finetune(cfg, tmp_path / "two")
    three = ft_config(init=str(tmp_path / "two" / "best"), class_names=())
    three.model.num_classes = 3
    before = tree_digest(tmp_path / "two")
    with pytest.raises(CheckpointError, match="classification head of 2 classes, and "
                                              "config.model.num_classes=3"):
        run_finetune(three, tmp_path / "three")
    assert tree_digest(tmp_path / "two") == before and not (tmp_path / "three").exists()


def test_bad_init_path_and_class_count(tmp_path):
    with pytest.raises(ConfigError, match="not a jaxlm workdir, checkpoint or params export"):
        run_finetune(ft_config(init=str(tmp_path)), tmp_path / "ft")
    cfg = ft_config()
    cfg.model.num_classes = 0
    with pytest.raises(ConfigError, match="num_classes=0: fine-tuning needs at least 2"):
        run_finetune(cfg, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


# ----------------------------------------------------------------------------- sweeps


def _sweep():
    import importlib.util

    from conftest import REPO
    spec = importlib.util.spec_from_file_location("sweep", REPO / "launch/sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_dry_run_lists_every_point_and_the_table_averages_over_seeds(tmp_path, capsys):
    sweep = _sweep()
    argv = ["--config=configs/bert/facts.py", f"--workdir={tmp_path}", "--grid",
            "finetune.learning_rate=1e-4,3e-4", "--grid", "train.seed=0,1,2", "--dry-run",
            "--", "--config.finetune.init=runs/x"]
    assert sweep.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and all("--config.finetune.init=runs/x" in ln for ln in lines)
    assert "--config.finetune.learning_rate=0.0003 --config.train.seed=2" not in lines[-1]
    assert lines[-1].endswith("--config.finetune.learning_rate=3e-4 --config.train.seed=2 "
                              "--config.finetune.init=runs/x")
    # finished runs are skipped; the table: mean and std over the seeds of each setting
    points = sweep.grid_points(["finetune.learning_rate=1e-4,3e-4", "train.seed=0,1,2"])
    for point, acc in zip(points, [0.6, 0.7, 0.8, 0.5, 0.5, 0.5]):
        run = tmp_path / sweep.run_name(point)
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"validation": {"accuracy": acc, "f1": acc}}))
    assert sweep.main(argv[:-3]) == 0
    rows = sweep.table(tmp_path, points)
    assert [r["finetune.learning_rate"] for r in rows] == ["1e-4", "3e-4"]
    assert rows[0]["accuracy_mean"] == pytest.approx(0.7) and rows[0]["accuracy_std"] == pytest.approx(0.1)
    assert rows[1]["accuracy_std"] == 0.0 and rows[0]["seeds"] == 3
    assert "| 1e-4 | 3 | 0.700 ± 0.100 |" in (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "sweep.csv").read_text().startswith("finetune.learning_rate,seeds,")


def test_sigkill_during_finetuning_then_resume_is_bitwise_exact(tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import REPO
    from test_checkpoint import env_with_devices, run_beside, wait_for_step
    flags = [f"--config={REPO}/configs/bert/facts.py", "--config.model.num_layers=2",
             "--config.model.d_model=32", "--config.model.num_heads=4", "--config.model.mlp_dim=64",
             "--config.model.max_len=64", "--config.data.seq_len=32", "--config.train.log_every=1",
             "--config.finetune.train_examples=32", "--config.finetune.batch_size=8",
             "--config.finetune.epochs=6", "--config.evaluate.batch_size=25"]
    cmd = lambda w: [sys.executable, "-m", "jaxlm.finetune", f"--workdir={w}", *flags]
    full = run_beside(cmd(tmp_path / "full"), env_with_devices(2), tmp_path / "full.log")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), env=env_with_devices(2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_step(killed, 9, proc, saved=True)
        proc.send_signal(signal.SIGKILL)
        assert full.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]
    finally:
        for p in (proc, full):  # nothing outlives the test
            p.kill()
            p.wait()
    again = subprocess.run(cmd(killed), capture_output=True, text=True, env=env_with_devices(2),
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    a, b = read_history(tmp_path / "full"), read_history(killed)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 25))
    assert [h.get("loss") for h in a] == [h.get("loss") for h in b]
    assert [h.get("validation_accuracy") for h in a] == [h.get("validation_accuracy") for h in b]
    assert json.loads((tmp_path / "full" / "results.json").read_text())["validation"] == \
        json.loads((killed / "results.json").read_text())["validation"]


def test_a_prepared_tfds_dataset_with_labels_reads(tmp_path):
    """tfds:NAME:SPLIT (e.g. glue/sst2, imdb_reviews when prepared): here a dataset of the
    same features (text, ClassLabel) prepared from memory, then read back by name."""
    from data_helpers import require_tensorflow
    require_tensorflow()
    import tensorflow_datasets as tfds

    class Sentiment(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (text, label) in enumerate([("good film", 1), ("dull", 0), ("fine", 1)]):
                yield i, {"sentence": text, "label": label}

    Sentiment(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
    data = labelled.read("tfds:sentiment:train", ft_config().finetune, 2, str(tmp_path))
    assert sorted(zip(data.texts, data.labels.tolist())) == [("dull", 0), ("fine", 1), ("good film", 1)]
    with pytest.raises(ConfigError, match=r"sentiment has splits \['train'\]"):
        labelled.read("tfds:sentiment:test", ft_config().finetune, 2, str(tmp_path))
