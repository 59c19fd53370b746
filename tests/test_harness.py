"""lm-evaluation-harness's own catalog through jaxlm (config.evaluate.harness_tasks): a
multiple-choice task (piqa, from the shared slices) and a generate_until task (gsm8k, rows
written here) run offline on local files through jaxlm.evaluate on a tiny random export;
the requests are the strings lm-eval's YAMLs build from those rows, and every error is one
line."""

import importlib.util
import json
import sys

import jax
import pytest
from conftest import SHARED_DATA, tiny_config

from jaxlm import checkpoint
from jaxlm.errors import ConfigError, DataError
from jaxlm.evaluate import fewshot, harness as harness_lib
from jaxlm.setup import build

PIQA = SHARED_DATA / "fewshot" / "piqa" / "validation.jsonl"
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is in the test extra: pip install -e '.[test]'")
needs_data = pytest.mark.skipif(not PIQA.is_file(), reason=f"shared data absent: {PIQA} not found")

# Grade-school questions in gsm8k's fields (question; answer ending "#### <number>").
GSM8K_TEST = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
               "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
              for a, b in ((2, 3), (5, 7), (10, 4), (6, 6))]
GSM8K_TRAIN = [{"question": "A box holds 3 pens. How many pens are in 2 boxes?",
                "answer": "2 * 3 = <<2*3=6>>6 pens.\n#### 6"}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def harness_config(tmp_path, **evaluate):
    cfg = tiny_config(max_len=128)
    cfg.evaluate.update(tasks=(), shots=(0, 1), num_examples=4, num_samples=0, **evaluate)
    return cfg


@needs_lm_eval
@needs_data
def test_catalog_tasks_run_offline_on_local_data(tmp_path, capsys):
    piqa = [json.loads(x) for x in PIQA.read_text().splitlines()[:6]]
    write_jsonl(tmp_path / "data" / "piqa_dev.jsonl", piqa)        # one file: the scored split
    write_jsonl(tmp_path / "data" / "gsm8k" / "test.jsonl", GSM8K_TEST)
    write_jsonl(tmp_path / "data" / "gsm8k" / "train.jsonl", GSM8K_TRAIN)
    own = tmp_path / "my_tasks"                                    # config.evaluate.harness_include
    write_jsonl(own / "sums.jsonl", [{"q": f"{a}+{a}=", "choices": [str(2 * a), str(a)], "label": 0}
                                     for a in range(5)])
    (own / "my_sums.yaml").write_text(
        f"task: my_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {own / 'sums.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    cfg = harness_config(tmp_path, harness_tasks=("piqa", "gsm8k", "my_sums"), log_samples=True,
                         params=str(tmp_path / "export"), harness_include=str(own),
                         harness_data=(f"piqa={tmp_path / 'data' / 'piqa_dev.jsonl'}",
                                       f"gsm8k={tmp_path / 'data' / 'gsm8k'}"))
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(0))
    meta = checkpoint.make_export_meta(cfg, setup.tokenizer, 0)
    checkpoint.export_params(tmp_path / "export", params, meta)

    fewshot.evaluate(cfg, tmp_path / "run")
    out = json.loads((tmp_path / "run" / "results.json").read_text())["harness"]
    assert set(out) == {"piqa", "gsm8k", "my_sums"}
    assert out["my_sums"]["shots"]["1"]["num_examples"] == 4 and "acc_stderr" in out["my_sums"]["shots"]["1"]
    assert out["piqa"]["kind"] == "multiple_choice" and out["gsm8k"]["kind"] == "generate_until"
    assert out["piqa"]["metric"] == "acc" and out["gsm8k"]["metric"] == "strict-match/exact_match"
    assert out["piqa"]["source"].endswith("piqa_dev.jsonl")
    for k in ("0", "1"):
        p, g = out["piqa"]["shots"][k], out["gsm8k"]["shots"][k]
        assert p["num_examples"] == g["num_examples"] == 4 and p["k"] == int(k)
        assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(p)
        assert {"strict-match/exact_match", "flexible-extract/exact_match_stderr"} <= set(g)
        assert 0 <= p["acc"] <= 1 and 0 <= g["strict-match/exact_match"] <= 1
        # piqa's train split was not given: lm-eval's fallback, marked; gsm8k has its splits.
        assert "no train split" in p["nonstandard"][0] and "nonstandard" not in g
    printed = capsys.readouterr().out
    assert "lm-evaluation-harness tasks at step 0:" in printed and "piqa*" in printed

    # The requests lm-eval built, from the rows and the shipped YAMLs (piqa.yaml, gsm8k.yaml).
    samples = lambda name, k: [json.loads(x) for x in (
        tmp_path / "run" / "samples" / f"harness_{name}_{k}shot.jsonl").read_text().splitlines()]
    for s in samples("piqa", 0):
        doc = piqa[s["doc_id"]]
        assert s["doc"] == doc and [tuple(a) for a in s["arguments"]] == [
            (f"Question: {doc['goal']}\nAnswer:", f" {doc[sol]}") for sol in ("sol1", "sol2")]
    for k, prefix in ((0, ""), (1, f"Question: {GSM8K_TRAIN[0]['question']}\nAnswer: "
                                   f"{GSM8K_TRAIN[0]['answer']}\n\n")):
        got = samples("gsm8k", k)                   # one record per document and filter
        assert sorted((s["filter"], s["doc_id"]) for s in got) == [
            (f, i) for f in ("flexible-extract", "strict-match") for i in range(4)]
        for s in got:
            context, kwargs = s["arguments"][0]
            assert context == prefix + f"Question: {GSM8K_TEST[s['doc_id']]['question']}\nAnswer:"
            assert "Question:" in kwargs["until"] and isinstance(s["resps"][0][0], str)


@needs_lm_eval
def test_unknown_task_names_lm_evals_near_names(tmp_path):
    cfg = harness_config(tmp_path, harness_tasks=("gsm8", "piqa"))
    with pytest.raises(ConfigError, match=r"^config.evaluate.harness_tasks: unknown lm-eval task\(s\) "
                                          r"\['gsm8'\] \(near: [^\n]*gsm8k[^\n]*\)$"):
        harness_lib.prepare(cfg)


@needs_lm_eval
def test_data_that_is_not_local_is_refused_in_one_line(tmp_path):
    cfg = harness_config(tmp_path, harness_tasks=("triviaqa",))
    with pytest.raises(DataError, match=r"^config.evaluate.harness_data: the data of lm-eval's "
                                        r"triviaqa is not local \(nothing is downloaded\)[^\n]*$"):
        harness_lib.prepare(cfg)


def test_harness_data_entries_and_a_missing_lm_eval_are_one_line(tmp_path, monkeypatch):
    cfg = harness_config(tmp_path, harness_tasks=("gsm8k",), harness_data=("gsm8k",))
    with pytest.raises(ConfigError, match=r"harness_data: 'gsm8k' is not TASK=PATH"):
        harness_lib.prepare(cfg)
    cfg.evaluate.harness_data = (f"gsm8k={tmp_path / 'nowhere'}",)
    with pytest.raises(ConfigError, match=r"harness_data: gsm8k=.*nowhere: no such file or folder"):
        harness_lib.prepare(cfg)
    cfg.evaluate.harness_data = ()
    for module in ("lm_eval", "lm_eval.tasks"):
        monkeypatch.setitem(sys.modules, module, None)             # import lm_eval fails
    with pytest.raises(ConfigError) as err:
        harness_lib.prepare(cfg)
    assert str(err.value) == ("config.evaluate.harness_tasks needs lm-evaluation-harness: "
                              "pip install lm_eval==0.4.13 (or the test extra)")


@needs_lm_eval
def test_a_prepared_datasets_folder_is_read_as_its_splits(tmp_path):
    """harness_data may name a `DatasetDict.save_to_disk` folder: its splits' arrow files."""
    import datasets
    datasets.DatasetDict({"test": datasets.Dataset.from_list(GSM8K_TEST),
                          "train": datasets.Dataset.from_list(GSM8K_TRAIN)}).save_to_disk(tmp_path / "gsm8k")
    builder, files = harness_lib.split_files("gsm8k", tmp_path / "gsm8k", {"test_split": "test"})
    assert builder == "arrow" and sorted(files) == ["test", "train"]
    loaded = datasets.load_dataset(builder, data_files=files)
    assert list(loaded["test"]) == GSM8K_TEST and list(loaded["train"]) == GSM8K_TRAIN
    write_jsonl(tmp_path / "rows.jsonl", GSM8K_TEST)                  # one file: the scored split
    assert harness_lib.split_files("gsm8k", tmp_path / "rows.jsonl", {"test_split": "test"}) == (
        "json", {"test": str(tmp_path / "rows.jsonl")})
