"""Few-shot scores equal lm-evaluation-harness's, and cannot drift.

The reference is lm-eval 0.4 itself (an optional test dependency): its own task definitions
as shipped, pointed at files cut from the development slices in ../shared/data/fewshot, run
through jaxlm's lm-eval adapter; jaxlm's in-process evaluator runs on the same model and
files. Requests must be the same strings, log-likelihoods equal to a relative 1e-6,
accuracies identical.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_config

from jaxlm.errors import ConfigError, DataError
from jaxlm.evaluate import fewshot, tasks as tasks_lib
from jaxlm.evaluate.scoring import Scorer
from jaxlm.evaluate.tasks import hellaswag
from jaxlm.evaluate.tasks.base import contexts, demonstration, requests
from jaxlm.setup import build

FEWSHOT = SHARED_DATA / "fewshot"
needs_data = pytest.mark.skipif(not (FEWSHOT / "piqa" / "validation.jsonl").is_file(),
                                reason=f"shared data absent: {FEWSHOT} not found")

# Four HellaSwag lines written here in the published format (no copy of the dataset could
# be had offline), brackets and capitalisation included to exercise the cleaning.
HELLASWAG = [
    {"ind": 1, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "ctx": "", "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow on his car."], "source_id": "x", "split": "val", "split_type": "indomain", "label": "3"},
    {"ind": 2, "activity_label": "Baking cookies", "ctx_a": "A woman mixes flour and butter in a bowl.", "ctx_b": "SHE", "ctx": "", "endings": ["pours the batter into a tray [title] and bakes it.", "throws the bowl out of the window.", "starts  singing to the oven.", "paints the cookies blue [step] then eats them."], "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"},
    {"ind": 3, "activity_label": "Playing guitar", "ctx_a": "A man sits on a chair holding a guitar.", "ctx_b": "he", "ctx": "", "endings": ["tunes the strings and starts to play.", "eats the guitar.", "flies away on the chair.", "turns into a guitar."], "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"},
    {"ind": 4, "activity_label": "Washing dishes", "ctx_a": "A girl fills the sink with water.", "ctx_b": "she", "ctx": "", "endings": ["plants a tree in the sink.", "adds soap and scrubs the plates.", "sets the water on fire.", "reads the sink a story."], "source_id": "x", "split": "val", "split_type": "indomain", "label": "1"},
]


@pytest.fixture(scope="module")
def scorer():
    """A tiny random GPT (byte tokens, 256 positions): enough to tell requests apart."""
    cfg = tiny_config(max_len=256)
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(0))
    return Scorer(setup.model, params, setup.tokenizer, setup.mesh, cfg.mesh, batch_size=8)


def eval_config(data_dir, names, limit=12):
    cfg = tiny_config(max_len=256)
    cfg.evaluate.update(tasks=tuple(names), data_dir=str(data_dir), num_examples=limit)
    return cfg


def write_jsonl(path: pathlib.Path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


# ----------------------------------------------------------------------------- lm-eval

LIMIT = 12


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    """The nine standard tasks with all three splits, cut from the shared slices (HellaSwag:
    the four lines above in each): validation and test hold different documents, and the
    train split holds some of both, so that whichever split a task scores, lm-eval's rule
    for dropping the scored document from its demonstrations is exercised."""
    return write_splits(tmp_path_factory.mktemp("splits"))


def write_splits(root, keep=lambda name, doc: True):
    """split_folder's files under `root`, of the shared documents `keep` accepts."""
    for name in tasks_lib.STANDARD:
        if name == "hellaswag":
            docs = {split: HELLASWAG for split in ("train", "validation", "test")}
        else:
            (only,) = (FEWSHOT / name).glob("*.jsonl")
            rows = [d for d in map(json.loads, only.read_text().splitlines()) if keep(name, d)]
            docs = {"validation": rows[:LIMIT], "test": rows[LIMIT:2 * LIMIT],
                    "train": rows[2 * LIMIT:5 * LIMIT] + rows[:3] + rows[LIMIT:LIMIT + 3]}
        for split, rows in docs.items():
            write_jsonl(root / name / f"{split}.jsonl", rows)
    return root


@needs_data
@pytest.mark.parametrize("k", [0, 2])
def test_scores_equal_lm_evaluation_harness(scorer, split_folder, tmp_path, k):
    """lm-eval's task YAMLs as shipped (only the data's location replaced) and jaxlm's
    tasks on the same files: each picks its own scored split, demonstration pool and
    sampler, and the requests come out the same strings. Log-likelihoods are fp32 sums of
    up to a few hundred terms scored in differently composed batches: equal to a relative
    1e-6. Accuracies (and their standard errors) are then identical."""
    pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")
    from jaxlm.evaluate.lm_eval_adapter import JaxlmLM, evaluate_local
    names = list(tasks_lib.STANDARD)
    cfg = eval_config(split_folder, names, LIMIT)
    all_tasks = tasks_lib.get_tasks(cfg.evaluate)
    reference = evaluate_local(JaxlmLM(scorer), names, split_folder, tmp_path, k, LIMIT)
    for name, task in all_tasks.items():
        result, records = fewshot.score_task(scorer, task, k, cfg.evaluate)
        assert "nonstandard" not in result, (name, result.get("nonstandard"))
        samples = sorted(reference["samples"][f"{name}_local"], key=lambda s: s["doc_id"])
        assert len(samples) == len(records) == min(LIMIT, len(task.docs)), name
        for ours_r, theirs_r in zip(records, samples):
            assert [tuple(a) for a in ours_r["arguments"]] == [tuple(a) for a in theirs_r["arguments"]], name
            their_lls = [float(r[0][0]) for r in theirs_r["resps"]]
            np.testing.assert_allclose(ours_r["loglikelihoods"], their_lls, rtol=1e-6, atol=0)
        metrics = reference["results"][f"{name}_local"]
        for metric in task.metrics:
            want = metrics[f"{metric},none"]
            assert result[metric] == pytest.approx(want, rel=1e-6, abs=1e-12), (name, metric)
            if metric != "perplexity":  # lm-eval bootstraps perplexity's standard error
                want = metrics[f"{metric}_stderr,none"]
                assert result[f"{metric}_stderr"] == pytest.approx(want, rel=1e-9), (name, metric)


def _own_demonstrations(task, k):
    """How many documents are shown as their own demonstration at k shots."""
    shown = contexts(task, k, 1234, LIMIT)
    return sum(demonstration(task, doc) in ctx for doc, ctx in zip(task.docs, shown))


@needs_data
def test_lambada_shows_a_passage_its_own_demonstration_unless_told_not_to(split_folder, scorer):
    """lm-eval's lambada_openai has no few-shot split: demonstrations come from the scored
    test split and may include the passage itself (the cross-check above shows jaxlm does
    the same). config.evaluate.fewshot_exclude_self forbids it and marks the results."""
    cfg = eval_config(split_folder, ["lambada_openai", "piqa"], LIMIT)
    cfg.evaluate.shots = (0, 2)
    lam = tasks_lib.get_tasks(cfg.evaluate)["lambada_openai"]
    assert lam.fewshot_from_docs and not lam.exclude_self and _own_demonstrations(lam, 2) > 0
    cfg.evaluate.fewshot_exclude_self = True
    tasks = tasks_lib.get_tasks(cfg.evaluate)
    assert _own_demonstrations(tasks["lambada_openai"], 2) == 0
    assert not tasks["piqa"].nonstandard_shots       # demonstrated from train: unchanged
    results = fewshot.run_fewshot(scorer, {"lambada_openai": tasks["lambada_openai"]}, cfg.evaluate)
    shots = results["lambada_openai"]["shots"]
    assert "nonstandard" not in shots["0"] and "fewshot_exclude_self" in shots["2"]["nonstandard"][0]
    table = fewshot.format_table(results, [0, 2])
    assert "lambada_openai*" in table and "* lambada_openai: config.evaluate.fewshot_exclude_self" in table


def test_missing_splits_fall_back_and_say_so(tmp_path, scorer):
    """Without the split lm-eval's config names, jaxlm scores validation for test (ARC) and
    demonstrates from the scored split, never a document's own; the results, the log and
    the table say how they depart from lm-eval's protocol."""
    arc_doc = lambda i: {"id": str(i), "answerKey": "A", "question": {
        "stem": f"q{i}", "choices": [{"text": f"a{i}", "label": "A"}, {"text": f"b{i}", "label": "B"}]}}
    write_jsonl(tmp_path / "arc_easy" / "validation.jsonl", [arc_doc(i) for i in range(4)])
    write_jsonl(tmp_path / "sst2" / "validation.jsonl",
                [{"sentence": f"s{i}", "label": i % 2} for i in range(4)])
    write_jsonl(tmp_path / "sst2" / "train.jsonl", [{"sentence": "t", "label": 1}] * 3)
    cfg = eval_config(tmp_path, ["arc_easy", "sst2"])
    cfg.evaluate.shots = (0, 2)
    tasks = tasks_lib.get_tasks(cfg.evaluate)
    arc = tasks["arc_easy"]
    assert arc.source.endswith("arc_easy/validation.jsonl") and arc.fewshot_from_docs and arc.exclude_self
    assert _own_demonstrations(arc, 2) == 0
    sst2 = tasks["sst2"]                             # lm-eval's layout: nothing to say
    assert sst2.fewshot_source.endswith("train.jsonl") and not sst2.nonstandard + sst2.nonstandard_shots
    results = fewshot.run_fewshot(scorer, tasks, cfg.evaluate)
    k0, k2 = results["arc_easy"]["shots"]["0"]["nonstandard"], results["arc_easy"]["shots"]["2"]["nonstandard"]
    assert k0 == [k2[0]] and "scored on validation: lm-eval's arc_easy scores test" in k0[0]
    assert "demonstrations from validation, never a document's own: lm-eval draws them from train" in k2[1]
    assert "nonstandard" not in results["sst2"]["shots"]["2"]
    assert "arc_easy*" in fewshot.format_table(results, [0, 2])


def test_rolling_windows_match_lm_evaluation_harness(scorer):
    utils = pytest.importorskip("lm_eval.utils")
    eos = scorer.tok.eos_id
    for n in (1, 5, 256, 257, 700):
        tokens = list(np.random.default_rng(n).integers(0, 256, n))
        want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
            tokens, prefix_token=eos, max_seq_len=scorer.max_len, context_len=1)]
        assert scorer.rolling_windows(tokens) == [(list(a), list(b)) for a, b in want]
    text = "a document " * 60
    total = scorer.loglikelihood_rolling([text])[0]
    direct = sum(ll for ll, _ in scorer.score_tokens(scorer.rolling_windows(scorer.tok.encode(text))))
    assert total == pytest.approx(direct) and total < 0


# ----------------------------------------------------------------------------- no drift

def test_scores_do_not_depend_on_batching_or_padding(scorer):
    """Per-request log-likelihoods equal one request at a time in any batch size, with any
    neighbours (so any padding and length bucket)."""
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "slept", "quietly"]
    reqs = [(" ".join(rng.choice(words, rng.integers(1, 60))), " " + " ".join(rng.choice(words, rng.integers(1, 4))))
            for _ in range(40)]
    one = Scorer(scorer.model, scorer.params, scorer.tok, scorer.mesh, scorer.generator.cfg_mesh, batch_size=1)
    reference = [one.loglikelihood([r])[0] for r in reqs[:10]] + one.loglikelihood(reqs[10:])
    for batch_size, order in ((8, reqs), (3, reqs[::-1])):
        other = Scorer(scorer.model, scorer.params, scorer.tok, scorer.mesh, scorer.generator.cfg_mesh,
                       batch_size=batch_size)
        got = other.loglikelihood(order)
        if order is not reqs:
            got = got[::-1]
        np.testing.assert_allclose([g[0] for g in got], [r[0] for r in reference], rtol=1e-6, atol=1e-5)
        assert [g[1] for g in got] == [r[1] for r in reference]


# ----------------------------------------------------------------------------- tasks

def test_lm_eval_encoding_rules(scorer):
    """The trailing space of a context goes to the continuation; EOS starts every
    sequence; an empty context is EOS alone."""
    eos = scorer.tok.eos_id
    ctx, cont = scorer.encode_pair("Answer: ", "yes")
    assert ctx == [eos] + scorer.tok.encode("Answer:") and cont == scorer.tok.encode(" yes")
    assert scorer.encode_pair("", "hello") == ([eos], scorer.tok.encode("hello"))
    no_prefix = Scorer(scorer.model, scorer.params, scorer.tok, scorer.mesh, scorer.generator.cfg_mesh, 4,
                       prefix_eos=False)
    assert no_prefix.encode_pair("Q:", " a") == (scorer.tok.encode("Q:"), scorer.tok.encode(" a"))


def test_hellaswag_reader_on_lines_in_the_published_format(tmp_path):
    write_jsonl(tmp_path / "hellaswag" / "validation.jsonl", HELLASWAG)
    task = tasks_lib.get_tasks(eval_config(tmp_path, ["hellaswag"]).evaluate)["hellaswag"]
    assert hellaswag.query(HELLASWAG[0]) == ("Removing ice from car: Then, the man writes over the snow "
                                            "covering the window of a car, and a woman wearing winter "
                                            "clothes smiles. Then")
    assert task.choices(HELLASWAG[1]) == ["pours the batter into a tray. and bakes it.",
                                          "throws the bowl out of the window.", "starts singing to the oven.",
                                          "paints the cookies blue then eats them."]
    assert hellaswag.query(HELLASWAG[1]).endswith("bowl. She")      # capitalize: "SHE" -> "She"
    assert [task.gold(d) for d in task.docs] == [3, 0, 0, 1]
    assert task.metrics == ("acc", "acc_norm") and task.chance == 0.25


@needs_data
def test_standard_tasks_read_the_shared_slices():
    names = [n for n in tasks_lib.STANDARD if n != "hellaswag"]
    got = tasks_lib.get_tasks(eval_config(FEWSHOT, names).evaluate)
    sizes = {n: len(t.docs) for n, t in got.items()}
    assert sizes == {"piqa": 500, "arc_easy": 500, "arc_challenge": 299, "winogrande": 500,
                     "lambada_openai": 500, "copa": 50, "boolq": 500, "sst2": 500}
    piqa = got["piqa"]
    first = requests(piqa, piqa.docs[0], contexts(piqa, 0, 1234, 1)[0])
    assert first[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first[0][1].startswith(" Provide the guinea pig") and len(first) == 2
    wino = got["winogrande"]
    (c1, x1), (c2, x2) = requests(wino, wino.docs[0], contexts(wino, 0, 1234, 1)[0])
    assert (c1, c2) == ("Sarah was a much better surgeon than Maria so Sarah",
                        "Sarah was a much better surgeon than Maria so Maria")
    assert x1 == x2 == " always got the easier cases." and wino.gold(wino.docs[0]) == 1
    lam = got["lambada_openai"]
    ((ctx, target),) = requests(lam, lam.docs[0], contexts(lam, 0, 1234, 1)[0])
    assert target == " signs" and ctx.endswith("I don't care about")


@pytest.mark.parametrize("line,message", [
    ("not json", "piqa/validation.jsonl:2: not JSON"),
    ('{"goal": "g", "sol1": "a"}', "piqa/validation.jsonl:2: missing field(s) ['sol2', 'label']"),
    ('{"goal": "g", "sol1": "a", "sol2": "a", "label": 0}', "piqa/validation.jsonl:2: duplicate choices"),
    ('{"goal": "g", "sol1": "a", "sol2": " ", "label": 0}', "piqa/validation.jsonl:2: an empty choice"),
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', "piqa/validation.jsonl:2: gold answer 2 out of range"),
])
def test_malformed_task_files_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0})
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tasks_lib.get_tasks(eval_config(tmp_path, ["piqa"]).evaluate)


def test_more_shots_than_the_pool_and_unknown_tasks_are_refused(tmp_path):
    docs = [{"sentence": f"s{i}", "label": i % 2} for i in range(4)]
    write_jsonl(tmp_path / "sst2" / "validation.jsonl", docs)
    cfg = eval_config(tmp_path, ["sst2"])
    cfg.evaluate.shots = (0, 3)
    assert len(fewshot.make_tasks(cfg)["sst2"].docs) == 4      # 3 others for each document
    cfg.evaluate.shots = (4,)
    with pytest.raises(ConfigError, match="config.evaluate.shots: task sst2: 4 demonstrations requested"):
        fewshot.make_tasks(cfg)
    cfg.evaluate.tasks = ("sst2", "mmlu")
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['mmlu'\]; known tasks: rule_mc"):
        fewshot.make_tasks(cfg)
    cfg.evaluate.tasks = ("lambada",)                # lm-eval's group name
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['lambada'\] \(near: lambada_openai\)"):
        fewshot.make_tasks(cfg)
    cfg.evaluate.update(tasks=("piqa",), data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere/piqa/validation.jsonl: no such task file"):
        fewshot.make_tasks(cfg)


def test_log_samples_and_table(scorer, tmp_path):
    write_jsonl(tmp_path / "sst2" / "validation.jsonl",
                [{"sentence": f"sentence {i}", "label": i % 2} for i in range(6)])
    cfg = eval_config(tmp_path, ["sst2"])
    cfg.evaluate.shots = (0, 1)
    tasks = tasks_lib.get_tasks(cfg.evaluate)
    results = fewshot.run_fewshot(scorer, tasks, cfg.evaluate, tmp_path / "samples")
    r = results["sst2"]["shots"]["1"]
    assert set(r) >= {"acc", "acc_stderr", "num_examples", "fewshot_seed", "k"} and r["num_examples"] == 6
    lines = (tmp_path / "samples" / "sst2_1shot.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["arguments"][1][1] == " positive"
    assert np.mean([json.loads(x)["acc"] for x in lines]) == r["acc"]
    table = fewshot.format_table(results, [0, 1])
    assert "sst2" in table and f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}" in table




@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("case", ["dp", "fsdp", "tp", "fsdp_tp", "dp_sequence", "fsdp_sequence_tp"])
def test_sharded_scores_equal_one_device(case):
    """Evaluation on the training mesh of every strategy scores as one device does."""
    from test_sharding import sharded_config
    cfg = sharded_config(case)
    one = build(tiny_config(vocab_size=264), jax.devices()[:1])
    params = jax.jit(one.init_params)(jax.random.PRNGKey(0))
    sharded = build(cfg)
    placed = jax.device_put(jax.device_get(params), sharded.param_shardings)
    reqs = [(f"question {i}: how many legs has a cat?", " four legs" if i % 2 else " two") for i in range(12)]
    ref = Scorer(one.model, params, one.tokenizer, one.mesh, cfg.mesh, 8).loglikelihood(reqs)
    got = Scorer(sharded.model, placed, sharded.tokenizer, sharded.mesh, cfg.mesh, 8).loglikelihood(reqs)
    np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], rtol=1e-5, atol=1e-5)
    assert [g[1] for g in got] == [r[1] for r in ref]


def test_in_training_evaluation_logs_the_scores_evaluate_gives(tmp_path):
    """config.evaluate.every: few-shot scores in metrics.jsonl at steps 5 and 10, equal to
    what jaxlm.evaluate reports for the final checkpoint."""
    from jaxlm.train import loop
    from jaxlm.runlog import read_history
    # As jaxlm.train and jaxlm.main wire it: the loop itself imports no evaluation.
    hooks = lambda cfg: loop.Hooks(evaluate=fewshot.during_training(cfg),
                                   evaluate_every=cfg.evaluate.every)
    cfg = tiny_config()
    cfg.train.update(steps=10)
    cfg.evaluate.update(every=5, every_tasks=("rule_mc", "arithmetic_mc"), every_shots=(0, 2),
                        num_examples=16, num_samples=0, tasks=("rule_mc", "arithmetic_mc"),
                        shots=(0, 2))
    loop.train(cfg, tmp_path, jax.devices()[:1], hooks(cfg))
    logged = {h["step"]: h for h in read_history(tmp_path) if "fewshot_rule_mc_k0_acc" in h}
    assert sorted(logged) == [5, 10]
    assert set(logged[10]) >= {"fewshot_rule_mc_k2_acc", "fewshot_arithmetic_mc_k0_acc_norm"}
    final = fewshot.evaluate(cfg, tmp_path)["tasks"]
    for name in ("rule_mc", "arithmetic_mc"):
        for k in (0, 2):
            assert logged[10][f"fewshot_{name}_k{k}_acc"] == final[name]["shots"][str(k)]["acc"]
    cfg.evaluate.update(every_tasks=("nope",))
    with pytest.raises(ConfigError, match="unknown task"):
        loop.train(cfg, tmp_path / "other", jax.devices()[:1], hooks(cfg))
    assert not (tmp_path / "other").exists()


def test_bert_pseudo_log_likelihood_equals_one_mask_at_a_time():
    """Batched PLL (many masked rows of many requests per forward pass, padded) equals
    masking each continuation token alone in an unpadded sequence of its own."""
    import jax.numpy as jnp
    from conftest import tiny_bert_config
    from jaxlm.evaluate.scoring import PseudoLikelihoodScorer, make_scorer
    cfg = tiny_bert_config()
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(1))
    scorer = make_scorer(setup, params, cfg.evaluate)
    assert isinstance(scorer, PseudoLikelihoodScorer)
    reqs = [("The cat sat on the", " mat"), ("Question: 2+2?\nAnswer:", " four"), ("", "hello"),
            ("a much longer context " * 3, " x")]
    got = scorer.loglikelihood(reqs)
    tok, ids = setup.tokenizer, setup.tokenizer.bert_ids
    for (ctx, cont), (ll, _) in zip(reqs, got):
        whole = tok.encode(ctx + cont)
        n_cont = len(whole) - len(tok.encode(ctx.rstrip()))
        body = whole[-(cfg.model.max_len - 2):]  # the longest request keeps its end
        seq = [ids["cls"]] + body + [ids["sep"]]
        want = 0.0
        for p in range(len(seq) - 1 - n_cont, len(seq) - 1):
            masked = list(seq)
            masked[p] = ids["mask"]
            logits = setup.model.apply({"params": params}, jnp.asarray([masked]))
            want += float(jax.nn.log_softmax(logits[0, p])[seq[p]])
        assert ll == pytest.approx(want, abs=1e-4)
    cfg.evaluate.tasks = ("rule_exact",)
    with pytest.raises(ConfigError, match="rule_exact generates text, which a masked LM"):
        fewshot.make_tasks(cfg)


@needs_data
def test_tasks_read_from_a_prepared_tfds_dataset(tmp_path):
    """config.evaluate.source=tfds: a dataset with TFDS ai2_arc's features (question text,
    choices{text, label}, class-id labels), prepared from the first shared ARC documents,
    gives the requests the JSONL files give."""
    from data_helpers import require_tensorflow
    require_tensorflow()
    import tensorflow_datasets as tfds
    from jaxlm.evaluate.tasks import arc
    from jaxlm.evaluate.tasks.base import JsonlFolder, TfdsDataset
    files = arc.load(JsonlFolder(FEWSHOT / "arc_easy"), "arc_easy")
    originals = [d for d in files.docs if d["answerKey"] in "ABCDE"][:5]
    letters = ["A", "B", "C", "D", "E"]

    class ArcLike(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "question": tfds.features.Text(),
                "choices": tfds.features.Sequence({"text": tfds.features.Text(),
                                                   "label": tfds.features.ClassLabel(names=letters)}),
                "answerKey": tfds.features.ClassLabel(names=letters)}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for i, d in enumerate(originals):
                q = d["question"]
                yield i, {"id": d["id"], "question": q["stem"], "answerKey": d["answerKey"],
                          "choices": {"text": [c["text"] for c in q["choices"]],
                                      "label": [c["label"] for c in q["choices"]]}}

    ArcLike(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    task = arc.load(TfdsDataset("arc_like", str(tmp_path), arc.from_tfds), "arc_easy")
    assert task.source == "tfds:arc_like:validation" and task.fewshot_from_docs
    by_id = {d["id"]: d for d in task.docs}          # array_record keeps no insertion order
    assert sorted(by_id) == sorted(d["id"] for d in originals)
    for d in originals:
        assert by_id[d["id"]] == d
    cfg = eval_config(tmp_path, ["arc_easy", "hellaswag"]).evaluate
    cfg.source = "tfds"
    with pytest.raises(ConfigError, match="source='tfds': hellaswag has no TFDS copy"):
        tasks_lib.get_tasks(cfg)
