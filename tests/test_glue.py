"""GLUE: every task's files read from fixtures in GLUE's own layouts (written here: there is
no GLUE data offline), the metrics against scikit-learn and scipy on fixed predictions,
the GLUE score's averaging, fine-tuning a regression head (STS-B), a 3-class pair task
with its mismatched dev set and test-server files (MNLI, AX), a GPT classifier on pairs,
the suite's table, and bad files refused in one line with nothing written."""

import importlib
import json

import numpy as np
import pytest
from conftest import REPO, _tiny
from scipy import stats
from sklearn import metrics as skm
from test_bad_input import command as run_command
from test_main import tree_digest

from jaxlm import cli
from jaxlm.config import load_config
from jaxlm.data import glue as glue_data
from jaxlm.data import labelled
from jaxlm.errors import ConfigError, DataError
from jaxlm.evaluate import glue as glue_eval
from jaxlm.runlog import read_history

WORDS = "the a cat dog sat ran on under mat rug big small red old".split()


def sentence(rng, n=4):
    return " ".join(rng.choice(WORDS, n)).capitalize() + "."


# Each task's header (None: CoLA's headerless train/dev) and a row maker: (fields by column
# name, with "A" and "B" the texts and "L" the label).
LAYOUTS = {
    "cola": (None, "index sentence", lambda a, b, y: ["gj04", y, "", a]),
    "sst2": ("sentence label", "index sentence", None),
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
             "index\t#1 ID\t#2 ID\t#1 String\t#2 String", None),
    "stsb": ("index genre filename year old_index source1 source2 sentence1 sentence2 score",
             "index genre filename year old_index source1 source2 sentence1 sentence2", None),
    "qqp": ("id qid1 qid2 question1 question2 is_duplicate", "id question1 question2", None),
    "mnli": ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
             "sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label",
             "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
             "sentence1_parse sentence2_parse sentence1 sentence2", None),
    "qnli": ("index question sentence label", "index question sentence", None),
    "rte": ("index sentence1 sentence2 label", "index sentence1 sentence2", None),
    "wnli": ("index sentence1 sentence2 label", "index sentence1 sentence2", None),
}


def _columns(header: str) -> list[str]:
    return header.split("\t") if "\t" in header else header.split(" ")


def label_for(t, rng, a):
    """A label the text decides (so a model can learn it), as the files write it."""
    if t.regression:
        return f"{min(5.0, len(a) / 6):.3f}"
    return t.labels[(len(a) + ("cat" in a)) % len(t.labels)]


def write_task(root, name, n_train=24, n_dev=12, n_test=6, seed=0):
    """GLUE's files of one task (train, dev splits, test splits) under root/<folder>/."""
    t = glue_data.TASKS[name] if name != "ax" else glue_data.AX
    rng = np.random.default_rng(seed)
    folder = root / t.folder
    folder.mkdir(parents=True, exist_ok=True)
    header, test_header, headerless_row = LAYOUTS.get(name, (None, "index sentence1 sentence2", None))
    for split, file in t.files().items():
        test = split.startswith("test")
        columns = _columns(test_header if test else header) if (test or header) else None
        lines = ["\t".join(columns)] if columns else []
        for i in range(n_test if test else n_train if split == "train" else n_dev):
            a, b = sentence(rng), sentence(rng)
            y = label_for(t, rng, a)
            if columns is None:
                lines.append("\t".join(headerless_row(a, b, y)))
                continue
            text = dict(zip(t.columns, (a, b)))
            row = [text.get(c, y if c == t.label else str(i) if c in ("index", "id") else "x")
                   for c in columns]
            lines.append("\t".join(row))
        (folder / file).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("GLUE")
    for name in [*glue_data.TASKS, "ax"]:
        write_task(root, name)
    return root


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name", sorted(glue_data.TASKS))
def test_every_task_reads_its_files(glue_dir, name):
    t = glue_data.TASKS[name]
    train = glue_data.read(f"glue:{name}:train", cfg_ft(glue_dir), t.num_classes)
    assert len(train) == 24 and (train.pairs is None) == (len(t.columns) == 1)
    assert train.where[0].endswith(f"{t.folder}/train.tsv:{1 if t.headerless else 2}")
    if t.regression:
        assert train.labels.dtype == np.float32 and 0 <= train.labels.min() <= train.labels.max() <= 5
    else:
        assert set(train.labels.tolist()) <= set(range(t.num_classes))
        first = (glue_dir / t.folder / "train.tsv").read_text().split("\n")[0 if t.headerless else 1]
        assert t.labels[train.labels[0]] in first.split("\t")  # the class of the file's label
    for split in t.dev:
        assert len(glue_data.read(f"glue:{name}:{split}", cfg_ft(glue_dir), t.num_classes)) == 12
    for split in t.test:
        data, ids = glue_data.read_split(t, split, str(glue_dir))
        assert len(data) == 6 and ids == [str(i) for i in range(6)]


def cfg_ft(glue_dir):
    cfg = load_config(REPO / "configs/bert/glue.py")
    cfg.finetune.glue_dir = str(glue_dir)
    return cfg.finetune


def test_a_byte_order_mark_before_the_header_is_ignored(tmp_path):
    """As files saved by Windows tools begin: the header's first column is still found."""
    folder = write_task(tmp_path, "mrpc")
    path = folder / "train.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(glue_data.read("glue:mrpc:train", cfg_ft(tmp_path), 2)) == 24


def test_sentence_pairs_are_cls_a_sep_b_sep_with_token_types(glue_dir):
    from jaxlm.data.tokenizers import get_tokenizer
    tok = get_tokenizer("byte:bert")
    data = glue_data.read("glue:rte:train", cfg_ft(glue_dir), 2)
    ex = labelled.Encoder(tok, 64, pooled=True)(data.texts[0], data.pairs[0])
    a, b = tok.encode(data.texts[0]), tok.encode(data.pairs[0])
    cls, sep = tok.bert_ids["cls"], tok.bert_ids["sep"]
    n = len(a) + len(b) + 3
    assert ex["tokens"][:n].tolist() == [cls, *a, sep, *b, sep]
    assert ex["types"][:n].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)


# ----------------------------------------------------------------------------- bad files


BAD = {  # task, file, (line number, new content) or a header, the error
    "missing column": ("mrpc", "dev.tsv", (1, "Quality\t#1 ID\t#2 ID\t#1 String\tSecond"),
                       r"MRPC/dev.tsv:1: no column '#2 String'; the header has"),
    "label outside the set": ("rte", "train.tsv", (3, "2\tA cat.\tA dog.\tmaybe"),
                              r"RTE/train.tsv:3: label 'maybe' is not one of rte's labels "
                              r"\['entailment', 'not_entailment'\]"),
    "binary label 2": ("sst2", "dev.tsv", (4, "A dog.\t2"),
                       r"SST-2/dev.tsv:4: label '2' is not one of sst2's labels \['0', '1'\]"),
    "score above 5": ("stsb", "train.tsv", (2, "0\tx\tx\tx\tx\tx\tx\tA cat.\tA dog.\t7.5"),
                      r"STS-B/train.tsv:2: score '7.5' is not a number in \[0, 5\]"),
    "short row": ("qqp", "train.tsv", (5, "4\t1\t2\tWhy?"),
                  r"QQP/train.tsv:5: 4 fields, the task's columns need 6"),
    "cola short row": ("cola", "dev.tsv", (3, "gj04\t1"), r"CoLA/dev.tsv:3: 2 fields"),
}


def break_file(root, name, file, change):
    t = glue_data.TASKS[name]
    path = root / t.folder / file
    lines = path.read_text().split("\n")
    line, content = change
    lines[line - 1] = content
    path.write_text("\n".join(lines))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_named_with_file_and_line(tmp_path, case):
    name, file, change, match = BAD[case]
    write_task(tmp_path, name)
    break_file(tmp_path, name, file, change)
    t = glue_data.TASKS[name]
    split = "train" if file == "train.tsv" else t.dev[0]
    with pytest.raises(DataError, match=match):
        glue_data.read(f"glue:{name}:{split}", cfg_ft(tmp_path), t.num_classes)


TINY = ["--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=4",
        "--config.model.mlp_dim=64", "--config.model.max_len=64", "--config.data.seq_len=32",
        "--config.finetune.epochs=2", "--config.finetune.batch_size=8",
        "--config.evaluate.batch_size=8"]


def test_bad_files_stop_every_command_before_it_writes(tmp_path):
    """The fine-tuning command, the suite and the prediction writer: one line naming the
    file and line, exit code 2, and nothing written."""
    write_task(tmp_path / "GLUE", "rte")
    break_file(tmp_path / "GLUE", "rte", "dev.tsv", BAD["label outside the set"][2])
    config, glue = f"--config={REPO}/configs/bert/glue.py", f"--config.finetune.glue_dir={tmp_path / 'GLUE'}"
    before = tree_digest(tmp_path)
    code, errors = run_command("jaxlm.finetune", config, f"--workdir={tmp_path / 'ft'}", glue,
                               "--config.finetune.glue_task=rte", *TINY)
    assert code == 2 and len(errors) == 1 and "RTE/dev.tsv:3: label 'maybe'" in errors[0], errors
    code, errors = run_command("jaxlm.glue", config, f"--workdir={tmp_path / 'suite'}",
                               f"--glue-dir={tmp_path / 'GLUE'}", "--tasks=rte", "--lrs=1e-3",
                               "--seeds=0", *TINY)
    assert code == 2 and len(errors) == 1 and "RTE/dev.tsv:3: label 'maybe'" in errors[0], errors
    assert tree_digest(tmp_path) == before and not (tmp_path / "ft").exists()
    assert not (tmp_path / "suite").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"model.num_classes": 2, "finetune.glue_task": "stsb"},
     "config.model.num_classes=2 does not fit config.finetune.glue_task='stsb' (1)"),
    ({"finetune.train_data": "glue:rte:train", "finetune.glue_task": "mrpc"},
     "config.finetune.train_data='glue:rte:train' is not data of config.finetune.glue_task='mrpc'"),
    ({"finetune.class_names": ("no", "yes"), "finetune.glue_task": "rte"},
     "config.finetune.class_names=('no', 'yes') does not fit"),
    ({"finetune.glue_task": "", "model.num_classes": 2},
     "config.finetune.best_metric='glue' is a GLUE task's official score: it needs"),
    ({"finetune.best_metric": "accuracy", "finetune.glue_task": "stsb"},
     "config.finetune.best_metric='accuracy' scores classes; config.model.num_classes=1"),
    ({"finetune.best_metric": "pearson", "finetune.glue_task": "rte"},
     "config.finetune.best_metric='pearson' scores a regression"),
])
def test_settings_that_contradict_the_task_are_refused(tmp_path, overrides, match):
    from jaxlm import finetune
    cfg = load_config(REPO / "configs/bert/glue.py")
    for field, value in overrides.items():
        section, name = field.split(".")
        cfg[section][name] = value
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        finetune.finetune(cfg, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_a_glue_spec_checks_task_split_and_head():
    ft = load_config(REPO / "configs/bert/glue.py").finetune
    with pytest.raises(ConfigError, match=r"glue:mnli has splits \['test_matched'"):
        glue_data.read("glue:mnli:validation", ft, 3)
    with pytest.raises(ConfigError, match="expected glue:TASK:SPLIT with TASK one of"):
        glue_data.read("glue:sst:train", ft, 2)
    with pytest.raises(ConfigError, match=r"glue:stsb has 1 output \(a score\), and "
                                          "config.model.num_classes=2"):
        glue_data.read("glue:stsb:train", ft, 2)


# ----------------------------------------------------------------------------- metrics


def test_metrics_agree_with_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert glue_eval.accuracy(labels, predicted) == pytest.approx(skm.accuracy_score(labels, predicted))
    assert glue_eval.f1(labels, predicted) == pytest.approx(skm.f1_score(labels, predicted))
    assert glue_eval.mcc(labels, predicted) == pytest.approx(skm.matthews_corrcoef(labels, predicted))
    x = rng.normal(size=300)
    y = np.round(x + rng.normal(size=300), 1)  # rounded: many ties for Spearman's ranks
    x[:40] = np.round(x[:40])
    assert glue_eval.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert glue_eval.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert glue_eval.ranks([3, 1, 3, 2]).tolist() == stats.rankdata([3, 1, 3, 2]).tolist()
    # edge cases: a constant side has no correlation (0, as scikit-learn's MCC says)
    assert glue_eval.mcc([0, 1, 1], [1, 1, 1]) == skm.matthews_corrcoef([0, 1, 1], [1, 1, 1]) == 0
    assert glue_eval.pearson([1, 2, 3], [2, 2, 2]) == 0.0
    assert glue_eval.f1([0, 0], [0, 0]) == skm.f1_score([0, 0], [0, 0], zero_division=0) == 0


def test_task_scores_average_each_tasks_official_metrics():
    labels = np.array([1, 0, 1, 1, 0, 0])
    probs = np.eye(2)[[1, 0, 0, 1, 1, 0]]  # predicted 1 0 0 1 1 0
    mrpc = glue_eval.task_metrics(glue_data.TASKS["mrpc"], labels, probs)
    assert mrpc["accuracy"] == pytest.approx(4 / 6) and mrpc["f1"] == pytest.approx(2 / 3)
    assert mrpc["glue"] == pytest.approx((4 / 6 + 2 / 3) / 2) and set(mrpc) == {"f1", "accuracy", "glue"}
    cola = glue_eval.task_metrics(glue_data.TASKS["cola"], labels, probs)
    assert set(cola) == {"mcc", "glue"} and cola["glue"] == pytest.approx(1 / 3)
    scores = np.array([[0.5], [1.0], [4.0], [3.0]])
    stsb = glue_eval.task_metrics(glue_data.TASKS["stsb"], np.array([1.0, 0.0, 5.0, 2.0]), scores)
    assert stsb["spearman"] == pytest.approx(0.8) and stsb["glue"] == pytest.approx(
        (stsb["pearson"] + 0.8) / 2)


def test_the_glue_score_counts_mnli_once_as_the_mean_of_m_and_mm():
    """BERT-large's published GLUE test row (Devlin et al. 2019; leaderboard score 80.5):
    each task's metrics averaged, MNLI-m and MNLI-mm averaged into one task, AX left out."""
    row = {"cola": 60.5, "sst2": 94.9, "mrpc": (89.3 + 85.4) / 2, "stsb": (87.6 + 86.5) / 2,
           "qqp": (72.1 + 89.3) / 2, "mnli-m": 86.7, "mnli-mm": 85.9, "qnli": 92.7,
           "rte": 70.1, "wnli": 65.1}
    score, missing = glue_eval.glue_score(row)
    assert round(score, 1) == 80.5 and missing == []
    partial, missing = glue_eval.glue_score({"rte": 0.6, "mnli-m": 0.5})
    assert partial == 0.6 and missing == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "wnli"]


def test_submission_lines_use_the_servers_labels():
    mnli = glue_eval.submission_lines(glue_data.TASKS["mnli"], ["7", "9"], np.eye(3)[[2, 0]])
    assert mnli == "index\tprediction\n7\tcontradiction\n9\tentailment\n"
    stsb = glue_eval.submission_lines(glue_data.TASKS["stsb"], ["0", "1"], np.array([[5.7], [-0.2]]))
    assert stsb == "index\tprediction\n0\t5.000\n1\t0.000\n"
    cola = glue_eval.submission_lines(glue_data.TASKS["cola"], ["0"], np.array([[0.2, 0.8]]))
    assert cola == "index\tprediction\n0\t1\n"


# ----------------------------------------------------------------------------- fine-tuning


def glue_config(task, glue_dir, config="configs/bert/glue.py"):
    cfg = _tiny(load_config(REPO / config))
    cfg.finetune.update(glue_task=task, glue_dir=str(glue_dir), epochs=2, batch_size=8,
                        learning_rate=1e-3)
    cfg.evaluate.batch_size = 8
    return cfg


def test_stsb_trains_a_regression_head_scored_by_pearson_and_spearman(glue_dir, tmp_path):
    from jaxlm import finetune
    out = finetune.finetune(glue_config("stsb", glue_dir), tmp_path / "ft")
    v = out["validation"]
    assert set(v) >= {"mse", "pearson", "spearman", "glue"} and "accuracy" not in v
    assert v["glue"] == pytest.approx((v["pearson"] + v["spearman"]) / 2)
    assert out["best_metric"] == "glue" and len(out["epochs"]) == 2
    assert max(e["glue"] for e in out["epochs"]) == pytest.approx(v["glue"])  # the best epoch
    assert all(e["loss"] == pytest.approx(e["mse"], rel=1e-5) for e in out["epochs"])
    for png in ("curves.png", "scores.png"):
        assert (tmp_path / "ft" / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    # the head is one output, the loss squared error: the training loss is a mean square
    history = read_history(tmp_path / "ft")
    assert any("abs_error" in h for h in history)


def test_mnli_scores_both_dev_sets_and_writes_the_test_server_files(glue_dir, tmp_path):
    from jaxlm import finetune
    cfg = glue_config("mnli", glue_dir)
    out = finetune.finetune(cfg, tmp_path / "ft")
    assert out["validation"]["examples"] == 12 and set(out["validation_mismatched"]) >= {"accuracy", "glue"}
    written = finetune.predict_glue(cfg, tmp_path / "ft", str(tmp_path / "submission"))
    assert sorted(p.name for p in written) == ["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv"]
    for name in ("MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"):
        lines = (tmp_path / "submission" / name).read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == 7
        assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(6)]
        assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "neutral", "contradiction"}
    # a bad test file: refused before anything is written
    break_file(glue_dir, "mnli", "test_mismatched.tsv", (1, "index\tsentence1\tsecond"))
    try:
        with pytest.raises(DataError, match=r"MNLI/test_mismatched.tsv:1: no column 'sentence2'"):
            finetune.predict_glue(cfg, tmp_path / "ft", str(tmp_path / "again"))
        assert not (tmp_path / "again").exists()
    finally:
        write_task(glue_dir, "mnli")


def test_a_gpt_classifier_reads_pairs_joined_by_its_separator(glue_dir, tmp_path):
    from jaxlm import finetune
    out = finetune.finetune(glue_config("rte", glue_dir, "configs/gpt/glue.py"), tmp_path / "ft")
    assert set(out["validation"]) >= {"accuracy", "glue", "f1"}
    assert out["validation"]["glue"] == out["validation"]["accuracy"]


# ----------------------------------------------------------------------------- the suite


def test_the_suite_dry_run_lists_a_sweep_per_task(glue_dir, tmp_path, capfd):
    code, errors = run_command("jaxlm.glue", f"--config={REPO}/configs/bert/glue.py",
                               f"--workdir={tmp_path}", f"--glue-dir={glue_dir}",
                               "--tasks=rte,stsb", "--lrs=1e-4,3e-4", "--seeds=0,1", "--dry-run")
    out = capfd.readouterr().out
    assert code == 0 and not errors
    assert out.count("-m jaxlm.finetune") == 8 and "--config.finetune.glue_task=stsb" in out
    assert f"--config.finetune.glue_dir={glue_dir}" in out
    code, errors = run_command("jaxlm.glue", f"--config={REPO}/configs/bert/glue.py",
                               f"--workdir={tmp_path}", "--lrs=1e-4", "--config.train.seed=3")
    assert code == 2 and "--config.train.seed: the suite sets it" in errors[0]
    code, errors = run_command("jaxlm.glue", f"--config={REPO}/configs/bert/glue.py",
                               f"--workdir={tmp_path}", "--lrs=fast", "--dry-run")
    assert code == 2 and "--lrs=fast: 'fast' is not a positive number" in errors[0]


def test_the_suite_table_picks_the_best_lr_by_mean_and_reports_its_seeds(tmp_path):
    """The table from finished runs' results.json (as the sweep leaves them)."""
    glue = importlib.import_module("jaxlm.glue")
    sweep = glue._sweep()

    def result(task, lr, seed, v, mm=None):
        folder = tmp_path / task / sweep.run_name([("finetune.learning_rate", lr), ("train.seed", seed)])
        folder.mkdir(parents=True)
        out = {"validation": {"accuracy": v, "glue": v}}
        if mm is not None:
            out["validation_mismatched"] = {"accuracy": mm, "glue": mm}
        (folder / "results.json").write_text(json.dumps(out))

    for seed, (a, b) in enumerate([(0.6, 0.7), (0.8, 0.5)]):  # means 0.7 and 0.6
        result("rte", "1e-4", str(seed), a)
        result("rte", "3e-4", str(seed), b)
        result("mnli", "1e-4", str(seed), 0.4 + seed / 10, mm=0.3)
    rows = [r for t in ("rte", "mnli") for r in glue.collect(
        tmp_path, glue_data.TASKS[t], ["1e-4", "3e-4"], ["0", "1"], sweep.run_name)]
    rte, m, mm = rows
    assert rte["learning_rate"] == "1e-4" and rte["runs"] == 2 and rte["best_seed"] == "1"
    assert rte["accuracy"]["mean"] == pytest.approx(0.7)
    assert rte["accuracy"]["sd"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert (m["task"], mm["task"]) == ("mnli-m", "mnli-mm") and mm["glue"]["mean"] == pytest.approx(0.3)
    score, missing = glue_eval.glue_score({r["task"]: r["glue"]["mean"] for r in rows})
    assert score == pytest.approx((0.7 + (0.45 + 0.3) / 2) / 2) and len(missing) == 7
    table = glue.markdown(rows, score, missing)
    assert "| rte | accuracy | 70.0 ± 14.1 | 70.0 ± 14.1 | 2 | 1e-4 |" in table
    assert "over 2 of 9 tasks (missing: cola" in table


def test_a_prepared_tfds_glue_task_reads_without_glue_dir(tmp_path):
    """config.finetune.glue_dir empty: TFDS glue/TASK prepared in config.data.data_dir (here
    a builder of glue/rte's name, version and features, prepared from memory)."""
    from data_helpers import require_tensorflow
    require_tensorflow()
    import tensorflow as tf
    import tensorflow_datasets as tfds
    rows = {"train": [("A cat sat.", "A cat.", 0), ("A dog ran.", "A cat ran.", 1)],
            "test": [("Big mat.", "Red rug.", -1)]}

    class Glue(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("2.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="rte", version="2.0.0")]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "sentence1": tfds.features.Text(), "sentence2": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["entailment", "not_entailment"]),
                "idx": tf.int32}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in rows}

        def _generate_examples(self, split):
            for i, (a, b, y) in enumerate(rows[split]):
                yield i, {"sentence1": a, "sentence2": b, "label": y, "idx": 10 + i}

    Glue(config="rte", data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
    data, _ = glue_data.read_split(glue_data.TASKS["rte"], "train", "", str(tmp_path))
    assert sorted(zip(data.texts, data.pairs, data.labels.tolist())) == sorted(rows["train"])
    test, ids = glue_data.read_split(glue_data.TASKS["rte"], "test", "", str(tmp_path))
    assert test.texts == ["Big mat."] and ids == ["10"]
    with pytest.raises(ConfigError, match=r"glue/rte has splits \['test', 'train'\]"):
        glue_data.read_split(glue_data.TASKS["rte"], "validation", "", str(tmp_path))


def test_the_suite_predicts_with_each_tasks_best_run(glue_dir, tmp_path, monkeypatch, capsys):
    """--predict: one `jaxlm.finetune --predict` per task (MNLI once, for m, mm and AX) on
    the best seed's run at the best learning rate; a task without test files is named."""
    glue = importlib.import_module("jaxlm.glue")
    sweep = glue._sweep()
    (tmp_path / "GLUE").mkdir()
    for name in ("mnli", "rte"):
        write_task(tmp_path / "GLUE", name)
    (tmp_path / "GLUE" / "RTE" / "test.tsv").unlink()
    calls = []
    monkeypatch.setattr(glue.subprocess, "run",
                        lambda cmd: calls.append(cmd) or type("Done", (), {"returncode": 0}))
    args = cli.Args(config=None, workdir=tmp_path / "suite", config_path="configs/bert/glue.py",
                    flags={})
    rows = [{"task": "mnli-m", "learning_rate": "3e-4", "best_seed": "2"},
            {"task": "mnli-mm", "learning_rate": "3e-4", "best_seed": "2"},
            {"task": "rte", "learning_rate": "1e-4", "best_seed": "0"}]
    glue.predict(args, rows, ["--config.finetune.glue_dir=X"], str(tmp_path / "GLUE"), sweep.run_name)
    assert len(calls) == 1 and "rte: no test files" in capsys.readouterr().out
    cmd = calls[0]
    assert f"--workdir={tmp_path / 'suite' / 'mnli' / 'finetune.learning_rate=3e-4,train.seed=2'}" in cmd
    assert f"--predict={tmp_path / 'suite' / 'submission'}" in cmd
    assert "--config.finetune.glue_task=mnli" in cmd and "--config.train.seed=2" in cmd
