"""SQuAD files, windows over long contexts, span decoding and the official metrics."""

import json

import numpy as np
import pytest

from jaxlm.data import squad
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import DataError
from jaxlm.evaluate import squad as squad_eval

CONTEXT = ("The river Tesmor rises in the northern hills of Bako and flows for three hundred "
           "kilometres before it reaches the sea near the old harbour town of Kazrel, where "
           "the fishermen of 1990s built a stone bridge.")


def squad_file(tmp_path, qas, context=CONTEXT, version="v2.0"):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": version, "data": [
        {"title": "Tesmor", "paragraphs": [{"context": context, "qas": qas}]}]}))
    return path


def qa(qid, question, answer=None, impossible=False):
    answers = [] if answer is None else [{"text": answer, "answer_start": CONTEXT.index(answer)}]
    return {"id": qid, "question": question, "answers": answers, "is_impossible": impossible}


@pytest.mark.parametrize("prediction, gold, em, f1", [
    ("The  Cat, sat!", "cat sat", 1.0, 1.0),
    ("the cat sat on mat", "a cat on the mat", 0.0, 6 / 7),  # P 3/4, R 1
    ("dog", "cat", 0.0, 0.0),
    ("", "", 1.0, 1.0),  # v2.0: no answer, rightly
    ("cat", "", 0.0, 0.0),
    ("an apple", "apple", 1.0, 1.0),
])
def test_official_normalisation_exact_match_and_f1(prediction, gold, em, f1):
    assert squad_eval.exact(prediction, gold) == em
    assert squad_eval.f1(prediction, gold) == pytest.approx(f1)


def test_scores_take_the_best_gold_answer_and_split_has_and_no_answer(tmp_path):
    path = squad_file(tmp_path, [qa("1", "Where does it rise?", "northern hills of Bako"),
                                 qa("2", "How long?", "three hundred kilometres"),
                                 qa("3", "Who rules?", impossible=True)])
    questions = squad.read(path)
    questions[0].answers.append("the northern hills")
    scores = squad_eval.score(questions, {"1": "northern hills", "2": "three hundred", "3": ""})
    f1_2 = 2 * 1 * (2 / 3) / (1 + 2 / 3)  # "three hundred" in "three hundred kilometres"
    assert scores["exact"] == pytest.approx(100 * 2 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + f1_2 + 1) / 3)
    assert (scores["HasAns_total"], scores["NoAns_total"]) == (2, 1)
    assert scores["NoAns_exact"] == 100 and scores["HasAns_exact"] == 50
    assert squad_eval.score(questions, {"1": "northern hills"})["exact"] == pytest.approx(100 / 3)


@pytest.mark.parametrize("tokenizer", ["byte:bert", "wordpiece"])
def test_windows_label_an_answer_only_where_it_is_whole_and_decoding_recovers_it(
        tmp_path, tokenizer):
    if tokenizer == "wordpiece":  # the context's words, "1990s" as 1990 ##s
        words = {w.strip(",.").lower() for w in (CONTEXT + " how far which town built when who "
                                                  "rules").split()} - {"1990s"}
        (tmp_path / "wp").mkdir()
        (tmp_path / "wp" / "vocab.txt").write_text("\n".join(
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "?", "1990", "##s",
             *sorted(words)]) + "\n")
        tokenizer = f"wordpiece:{tmp_path / 'wp'}"
    tok = get_tokenizer(tokenizer)
    path = squad_file(tmp_path, [qa("1", "How far?", "three hundred kilometres"),
                                 qa("2", "Which town?", "Kazrel"),
                                 qa("3", "Built when?", "1990s"),
                                 qa("4", "Who rules?", impossible=True)])
    questions = squad.read(path)
    seq_len, stride = (96, 24) if tokenizer == "byte:bert" else (20, 5)
    win = squad.windows(questions, tok, seq_len=seq_len, doc_stride=stride, max_query_len=16)
    assert len(win.ids) > 2 * len(questions)  # long contexts: several windows each
    crossing = 0
    for w in range(len(win.ids)):
        q = questions[win.question[w]]
        ctx = win.contexts[win.question[w]]
        c0, n = win.context_start[w], win.context_len[w]
        # the window's context tokens are the context's, after [CLS] question [SEP]
        first = win.context_offset[w]
        assert list(win.ids[w, first:first + n]) == ctx.ids[c0:c0 + n]
        assert (win.token_types[w, :first] == 0).all()
        assert (win.token_types[w, first:first + n + 1] == 1).all()
        if q.impossible:
            assert win.starts[w] == win.ends[w] == 0
            continue
        a, b = q.answer_starts[0], q.answer_starts[0] + len(q.answers[0])
        covered = [ctx.starts[c0 + i] < b and ctx.ends[c0 + i] > a for i in range(n)]
        if win.starts[w]:
            i, j = win.starts[w] - first, win.ends[w] - first
            assert q.context[ctx.starts[c0 + i]:ctx.ends[c0 + j]].strip() == q.answers[0]
            assert sum(covered) == j - i + 1
        elif any(covered):
            crossing += 1  # part of the answer in this window: labelled "no answer here"
    assert crossing > 0
    for qi, q in enumerate(questions):  # every answer is whole in at least one window
        assert q.impossible or win.starts[win.question == qi].any()

    # one-hot logits at the labels: decoding gives back the gold answers, v1.1 and v2.0
    start, end = np.zeros(win.ids.shape), np.zeros(win.ids.shape)
    start[np.arange(len(win.ids)), win.starts] = 10
    end[np.arange(len(win.ids)), win.ends] = 10
    answerable = [q for q in questions if not q.impossible]
    keep = np.isin(win.question, [qi for qi, q in enumerate(questions) if not q.impossible])
    sub = squad.windows(answerable, tok, seq_len=seq_len, doc_stride=stride, max_query_len=16)
    got = squad_eval.decode(answerable, sub, start[keep], end[keep])
    assert {k: v.strip() for k, v in got.items()} == {"1": "three hundred kilometres",
                                                     "2": "Kazrel", "3": "1990s"}
    got = squad_eval.decode(questions, win, start, end, null_threshold=0.0)
    assert squad_eval.score(questions, got)["exact"] == 100


@pytest.mark.parametrize("seed", [0, 6, 8])  # 6 and 8: the best margin is a tie
def test_the_best_no_answer_threshold_is_the_best_of_every_threshold_tried(tmp_path, seed):
    """best_threshold against trying each threshold with decode's rule and score()."""
    answers = ["northern hills of Bako", "three hundred kilometres", "Kazrel", "1990s"]
    qas = [qa(str(i), "Q?", answers[i % 4] if i % 3 else None, impossible=not i % 3)
           for i in range(24)]
    questions = squad.read(squad_file(tmp_path, qas))
    rng = np.random.default_rng(seed)
    guesses = ["", "northern hills", "three hundred kilometres", "Kazrel", "dog", "1990s"]
    spans = {q.id: (str(rng.choice(guesses)), float(rng.integers(-4, 5)))  # ties included
             for q in questions}
    got = squad_eval.best_threshold(questions, spans)
    for name in ("exact", "f1"):
        tried = {t: squad_eval.score(questions, {qid: "" if margin > t else text for qid,
                                                 (text, margin) in spans.items()})[name]
                 for t in [min(m for _, m in spans.values()) - 1.0]
                 + sorted({m for _, m in spans.values()})}
        assert got[f"best_{name}"] == pytest.approx(max(tried.values()))
        assert tried[got[f"best_{name}_thresh"]] == pytest.approx(got[f"best_{name}"])
    assert got["best_f1"] > squad_eval.score(questions, {q.id: "" for q in questions})["f1"]


def test_a_token_seen_by_two_windows_is_judged_in_the_one_where_it_is_central(tmp_path):
    tok = get_tokenizer("byte:bert")
    questions = squad.read(squad_file(tmp_path, [qa("1", "Which?", "Kazrel")]))
    win = squad.windows(questions, tok, seq_len=64, doc_stride=20, max_query_len=8)
    holders = [w for w in range(len(win.ids)) if win.starts[w]]
    assert len(holders) > 1
    # the answer's first token is in each of them; exactly one judges it
    central = [w for w in holders if squad_eval._most_context(
        win, w, int(win.starts[w] - win.context_offset[w]))]
    assert len(central) == 1


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=3),
     r"qas\[0\] \(id 1\)\.answers\[0\]: answer_start 3 does not point at 'Kazrel'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("question"),
     r"qas\[0\] \(id 1\): missing field 'question'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"].append(
        d["data"][0]["paragraphs"][0]["qas"][0]), r"qas\[1\] \(id 1\): the id is used again"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=[]),
     r"no answers and not marked is_impossible"),
    (lambda d: d.pop("data"), r"not a SQuAD file"),
])
def test_bad_files_are_one_line_naming_the_file_and_question(tmp_path, edit, match):
    path = squad_file(tmp_path, [qa("1", "Which town?", "Kazrel")])
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=match) as e:
        squad.read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_stride_longer_than_a_window_is_refused(tmp_path):
    questions = squad.read(squad_file(tmp_path, [qa("1", "Which town?", "Kazrel")]))
    with pytest.raises(DataError, match=r"config\.finetune\.doc_stride=40 is longer than"):
        squad.windows(questions, get_tokenizer("byte:bert"), seq_len=32, doc_stride=40,
                      max_query_len=8)


# ----------------------------------------------------------------------------- fine-tuning

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def marker_file(path, n, seed, impossible=0):
    """A SQuAD file the tiny BERT can learn in a few dozen steps: each context is random
    lower-case words of 2-4 letters and one code like X42Y (its first and last byte mark
    the span), and the question "n?" asks for the code. The last `impossible` questions
    (v2.0) have no code and no answer."""
    rng = np.random.default_rng(seed)
    paragraphs = []
    for i in range(n):
        words = ["".join(rng.choice(list(LETTERS), rng.integers(2, 5)))
                 for _ in range(rng.integers(6, 11))]
        qa_ = {"id": f"q{i}", "question": "n?", "answers": [], "is_impossible": True}
        if i < n - impossible:
            at = int(rng.integers(0, len(words)))
            words.insert(at, f"X{rng.integers(10, 100)}Y")
            start = len(" ".join(words[:at])) + (at > 0)
            qa_.update(is_impossible=False, answers=[{"text": words[at], "answer_start": start}])
        paragraphs.append({"context": " ".join(words), "qas": [qa_]})
    path.write_text(json.dumps({"version": "v2.0" if impossible else "v1.1",
                                "data": [{"title": "marker", "paragraphs": paragraphs}]}))
    return path


def squad_config(data_dir, init="", v2=False, **finetune):
    from conftest import tiny_bert_config
    cfg = tiny_bert_config(span_head=True)
    cfg.finetune.update(init=init, train_data=str(data_dir / "train.json"),
                        validation_data=str(data_dir / "dev.json"), squad_v2=v2, epochs=4,
                        batch_size=16, learning_rate=3e-3, warmup_ratio=0.1, doc_stride=12,
                        max_query_len=8, max_answer_len=4, n_best=5)
    cfg.finetune.update(**finetune)
    cfg.evaluate.batch_size = 32
    return cfg


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny BERT after 2 steps of masked-LM pretraining: no span head in its checkpoint."""
    import jax
    from conftest import tiny_bert_config

    from jaxlm.train import loop
    path = tmp_path_factory.mktemp("pretrained") / "run"
    cfg = tiny_bert_config()
    cfg.train.steps, cfg.checkpoint.every = 2, 2
    loop.train(cfg, path, jax.devices()[:1])
    return path


@pytest.fixture(scope="module")
def marker_data(tmp_path_factory):
    """v2.0 marker files: 64 training questions (16 without an answer), 24 validation."""
    folder = tmp_path_factory.mktemp("marker")
    marker_file(folder / "train.json", 64, seed=0, impossible=16)
    marker_file(folder / "dev.json", 24, seed=1, impossible=6)
    return folder


def test_span_head_gives_start_and_end_logits_and_exists_only_when_asked():
    import jax
    import jax.numpy as jnp
    from conftest import tiny_bert_config

    from jaxlm import models
    tokens_BxL = jnp.ones((2, 16), jnp.int32)
    for span_head in (False, True):
        cfg = tiny_bert_config(span_head=span_head)
        model = models.family("bert").module(cfg.model)
        params = model.init(jax.random.PRNGKey(0), tokens_BxL)["params"]
        assert ("span_head" in params) == span_head
    start_BxL, end_BxL = model.apply({"params": params}, tokens_BxL, output="spans")
    assert start_BxL.shape == end_BxL.shape == (2, 16)
    assert start_BxL.dtype == end_BxL.dtype == jnp.float32
    kernel = params["span_head"]["kernel"]  # partitioned like the other dense heads
    assert kernel.value.shape == (32, 2) and kernel.names == ("embed", None)
    assert not np.allclose(start_BxL, end_BxL)


def test_span_loss_is_the_mean_of_start_and_end_cross_entropy_without_padding():
    import jax
    import jax.numpy as jnp

    from jaxlm.train.objectives import SpanExtraction

    rng = np.random.default_rng(0)
    start_BxL, end_BxL = rng.normal(size=(2, 2, 6)).astype(np.float32) * 3
    segments_BxL = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    start_BxL[0, 4] = end_BxL[0, 5] = 50.0  # the argmax, but padding: ignored
    batch = {"inputs": jnp.zeros((2, 6), jnp.int32), "types": jnp.zeros((2, 6), jnp.int32),
             "segments": jnp.asarray(segments_BxL), "starts": jnp.array([2, 0]),
             "ends": jnp.array([3, 0]), "weights": jnp.array([1.0, 1.0])}

    class Logits:  # a model that outputs the hand-made logits
        def apply(self, variables, *args, output, **kw):
            assert output == "spans"
            return jnp.asarray(start_BxL), jnp.asarray(end_BxL)

    def ce(logits, target, n):
        z = logits[:n] - logits[:n].max()
        return -(z[target] - np.log(np.exp(z).sum()))

    total, (weight, metrics) = SpanExtraction(6).loss(Logits(), None, batch,
                                                      jax.random.PRNGKey(0), deterministic=True)
    want = sum((ce(start_BxL[b], s, n) + ce(end_BxL[b], e, n)) / 2
               for b, s, e, n in ((0, 2, 3, 4), (1, 0, 0, 6)))
    assert float(total) == pytest.approx(want, rel=1e-5) and float(weight) == 2
    hits = [start_BxL[0, :4].argmax() == 2 and end_BxL[0, :4].argmax() == 3,
            start_BxL[1].argmax() == 0 and end_BxL[1].argmax() == 0]
    assert float(metrics["exact_span"]) == sum(hits)
    start_BxL[0, 2] = end_BxL[0, 3] = 40.0  # now the labels win among the real positions
    _, (_, metrics) = SpanExtraction(6).loss(Logits(), None, batch, jax.random.PRNGKey(0),
                                             deterministic=True)
    assert float(metrics["exact_span"]) == 1 + hits[1]


def test_squad_v2_end_to_end_from_a_pretrained_mlm_checkpoint(pretrained, marker_data, tmp_path):
    from jaxlm import squad
    cfg = squad_config(marker_data, init=str(pretrained), v2=True)
    out = squad.squad(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
    questions = squad.read_questions(cfg, "validation_data")
    assert set(predictions) == {q.id for q in questions}
    assert results["validation"] == out["validation"]
    official = squad_eval.score(questions, predictions)
    assert {k: v for k, v in results["validation"].items() if k in official} == official
    # the threshold search: never worse than the threshold used (0), which it also tries
    assert results["validation"]["best_f1"] >= official["f1"] - 1e-9
    null_odds = json.loads((tmp_path / "run" / "null_odds.json").read_text())
    assert set(null_odds) == set(predictions)
    assert all(text == "" for qid, text in predictions.items() if null_odds[qid] > 0)
    assert all(null_odds[qid] <= 0 for qid, text in predictions.items() if text)
    assert len(results["epochs"]) == 4 and 1 <= results["best_epoch"] <= 4
    best = max(e["f1"] for e in results["epochs"])
    assert results["validation"]["f1"] == pytest.approx(best)
    # Baselines: "" everywhere scores exact 25 (6 of 24), a random context word ~1 in 9
    # of the answerable ones.
    v = results["validation"]
    assert v["exact"] >= 80 and v["HasAns_exact"] >= 80, v
    assert v["NoAns_exact"] >= 80, v  # "" for (almost) every question without an answer
    assert results["epochs"][0]["exact"] < v["exact"]
    # the training windows cut some answers: those windows are labelled "no answer here"
    win = squad.windows(cfg, squad_data_tokenizer(), squad.read_questions(cfg, "train_data"))
    assert crossing_windows(squad.read_questions(cfg, "train_data"), win) > 0
    print("SQuAD v2 code task:", {k: round(x, 1) for k, x in v.items()})
    # the fine-tuned params (with a span head) start only a model that has one
    from jaxlm.errors import CheckpointError
    from jaxlm.setup import build
    from jaxlm.train.init import pretrained_params
    plain = squad_config(marker_data)
    plain.model.span_head = False
    with pytest.raises(CheckpointError, match="has a span-extraction head, and "
                                              "config.model.span_head is false"):
        pretrained_params(plain, build(plain), str(tmp_path / "run" / "best"),
                          "config.finetune.init")


def squad_data_tokenizer():
    return get_tokenizer("byte:bert")


def crossing_windows(questions, win) -> int:
    """Windows that hold part of their question's answer but not all of it (labelled 0)."""
    n = 0
    for w in range(len(win.ids)):
        q, ctx = questions[win.question[w]], win.contexts[win.question[w]]
        if q.impossible:
            continue
        a, b = q.answer_starts[0], q.answer_starts[0] + len(q.answers[0])
        c0, length = win.context_start[w], win.context_len[w]
        covered = [ctx.starts[i] < b and ctx.ends[i] > a for i in range(c0, c0 + length)]
        n += any(covered) and win.starts[w] == 0
    return n


def test_a_resumed_squad_run_equals_an_uninterrupted_one(tmp_path):
    import shutil

    from jaxlm import squad
    from jaxlm.runlog import read_history
    marker_file(tmp_path / "train.json", 32, seed=2)  # v1.1: every question has an answer
    marker_file(tmp_path / "dev.json", 8, seed=3)
    cfg = squad_config(tmp_path, epochs=2)
    full = squad.squad(cfg, tmp_path / "full")
    every = json.loads((tmp_path / "full" / "config.json").read_text())["checkpoint"]["every"]
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(2 * every))
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln)["step"] <= every]
    (tmp_path / "resumed" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    resumed = squad.squad(cfg, tmp_path / "resumed")
    a, b = read_history(tmp_path / "full"), read_history(tmp_path / "resumed")
    assert [h.get("loss") for h in a] == [h.get("loss") for h in b]
    assert [h.get("validation_f1") for h in a] == [h.get("validation_f1") for h in b]
    assert full["validation"] == resumed["validation"]
    assert (tmp_path / "full" / "predictions.json").read_text() == \
        (tmp_path / "resumed" / "predictions.json").read_text()


def squad_command(*args):
    """`python -m jaxlm.squad --config=configs/bert/squad.py args` in this process: (exit
    code, its "error:" lines)."""
    import contextlib
    import io

    from conftest import REPO

    from jaxlm import cli, squad
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.run(squad.main, [f"--config={REPO}/configs/bert/squad.py", *args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


def _shift_offset(data):
    data["data"][0]["paragraphs"][3]["qas"][0]["answers"][0]["answer_start"] += 1


def _impossible_in_v1(data):
    data["data"][0]["paragraphs"][2]["qas"][0].update(answers=[], is_impossible=True)


@pytest.mark.parametrize("edit, flags, match", [
    (_shift_offset, [], "train.json: data[0].paragraphs[3].qas[0] (id q3).answers[0]: "
                        "answer_start"),
    (_impossible_in_v1, [], "train.json: data[0].paragraphs[2].qas[0] (id q2): a question "
                            "without an answer (SQuAD v2.0), and config.finetune.squad_v2=false"),
    (None, ["--config.finetune.doc_stride=100"], "config.finetune.doc_stride=100 is longer than "
                                                 "the context part of a window"),
    (None, ["--config.model.span_head=false"], "config.model.span_head=false: SQuAD trains"),
    (None, ["--config.lora.rank=4", "--config.lora.targets=attn/qkv"],
     "config.lora.rank=4: LoRA trains a classification head"),
    (None, ["--config.finetune.squad_v2=true", "--config.finetune.null_threshold=5000"],
     "config.finetune.null_threshold=5000.0 must be in [-1000, 1000]"),
    (None, ["--config.finetune.train_data=nothing.json"],
     "config.finetune.train_data='nothing.json': no such file"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, edit, flags, match):
    from test_main import tree_digest
    marker_file(tmp_path / "train.json", 8, seed=4)
    marker_file(tmp_path / "dev.json", 4, seed=5)
    if edit is not None:
        data = json.loads((tmp_path / "train.json").read_text())
        edit(data)
        (tmp_path / "train.json").write_text(json.dumps(data))
    (tmp_path / "old").mkdir()  # an existing workdir, and a new one
    (tmp_path / "old" / "notes.txt").write_text("kept\n")
    for workdir in (tmp_path / "old", tmp_path / "new"):
        before = tree_digest(tmp_path)
        code, errors = squad_command(
            f"--workdir={workdir}", f"--config.finetune.train_data={tmp_path / 'train.json'}",
            f"--config.finetune.validation_data={tmp_path / 'dev.json'}", *flags)
        assert code == 2 and len(errors) == 1, (code, errors)
        assert match in errors[0], errors[0]
        if edit is not None:
            assert str(tmp_path / "train.json") in errors[0]
        assert tree_digest(tmp_path) == before and not (tmp_path / "new").exists()
