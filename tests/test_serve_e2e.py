"""`python -m jaxlm.serve` as a user runs it, on a tiny random GPT export, against the
references: lm-evaluation-harness's own `local-completions` model (through the server,
with the server's tokenizer) scores the nine standard tasks as jaxlm's in-process
evaluator does; the `openai` SDK reads and streams the completions batch generation gives;
SIGTERM lets a running request finish and exits 0; a model that cannot load stops the
command before it listens (exit 2, one line)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
from conftest import REPO
from test_fewshot import needs_data, write_splits

from jaxlm import checkpoint
from jaxlm.config import apply_override, load_config
from jaxlm.evaluate import fewshot, tasks as tasks_lib
from jaxlm.evaluate.scoring import Scorer
from jaxlm.inference.generate import Generator
from jaxlm.setup import build

MAX_LEN = 1024  # the nine tasks at k = 2 fit, on their shorter documents
OVERRIDES = [f"--config.model.{k}={v}" for k, v in dict(
    num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=MAX_LEN).items()] + [
    "--config.data.seq_len=32", "--config.serve.slots=8", "--config.serve.shutdown_s=20"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, json.loads(r.read())


def serve_command(*args):
    return [sys.executable, "-m", "jaxlm.serve", "--config=configs/gpt/debug.py", *OVERRIDES, *args]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A random tiny GPT exported, and `python -m jaxlm.serve` serving it."""
    cfg = load_config(REPO / "configs/gpt/debug.py")
    for o in OVERRIDES:
        apply_override(cfg, *o.removeprefix("--config.").split("=", 1))
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(0))
    export = tmp_path_factory.mktemp("serve") / "export"
    checkpoint.export_params(export, params, checkpoint.make_export_meta(cfg, setup.tokenizer, 0))
    port = free_port()
    log = open(export.parent / "server.log", "w")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(serve_command(f"--config.evaluate.params={export}", f"--port={port}",
                                          "--name=tiny"), cwd=REPO, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            if get(url + "/health")[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError("the server did not come up:\n" + (export.parent / "server.log").read_text())
        time.sleep(0.5)
    yield {"url": url, "proc": proc, "cfg": cfg, "setup": setup, "params": params,
           "log": export.parent / "server.log"}
    if proc.poll() is None:
        proc.kill()


@needs_data
@pytest.mark.parametrize("k", [0, 2])
def test_lm_eval_through_the_server_scores_as_jaxlm_evaluate(served, tmp_path, k):
    """lm-eval 0.4.13's `local-completions` with the remote tokenizer (the server's
    /tokenize), the shipped task YAMLs on local files: per-request log-likelihoods equal
    the in-process scorer's within 1e-4, and acc / acc_norm are the same. Every request
    fits the model: a longer one is cut differently by lm-eval's API models (to
    max_length - 1 tokens, the server reading them all) and its local ones (max_length + 1
    tokens, the last not read), which jaxlm's scorer follows."""
    pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (test extra)")
    from jaxlm.evaluate.lm_eval_adapter import evaluate_local
    cfg, setup = served["cfg"], served["setup"]
    names = list(tasks_lib.STANDARD)
    split_folder = write_splits(tmp_path / "data", lambda name, d: len(json.dumps(d)) < 360)
    cfg.evaluate.update(tasks=tuple(names), data_dir=str(split_folder), num_examples=4)
    tasks = tasks_lib.get_tasks(cfg.evaluate)
    args = (f"model=tiny,base_url={served['url']}/v1/completions,tokenizer_backend=remote,"
            f"max_length={MAX_LEN},batch_size=8,max_retries=1,timeout=120")
    reference = evaluate_local("local-completions", names, split_folder, tmp_path / "lm_eval", k, 4, args)
    scorer = Scorer(setup.model, served["params"], setup.tokenizer, setup.mesh, cfg.mesh, batch_size=8)
    for name, task in tasks.items():
        result, records = fewshot.score_task(scorer, task, k, cfg.evaluate)
        assert result["truncated_requests"] == 0, name
        samples = sorted(reference["samples"][f"{name}_local"], key=lambda s: s["doc_id"])
        assert len(samples) == len(records) == 4, name
        for ours, theirs in zip(records, samples):
            assert [tuple(a) for a in ours["arguments"]] == [tuple(a) for a in theirs["arguments"]], name
            np.testing.assert_allclose(ours["loglikelihoods"], [float(r[0][0]) for r in theirs["resps"]],
                                       atol=1e-4, rtol=0, err_msg=name)
        metrics = reference["results"][f"{name}_local"]
        for metric in task.metrics:
            if metric != "perplexity":
                assert result[metric] == metrics[f"{metric},none"], (name, metric)


def test_openai_sdk_reads_and_streams_greedy_completions(served):
    openai = pytest.importorskip("openai", reason="the openai SDK is in the test extra")
    cfg, setup = served["cfg"], served["setup"]
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)
    prompts = ["Once upon a time", "The answer is", "x"]
    gen = Generator(setup.model, served["params"], setup.tokenizer, setup.mesh, cfg.mesh, batch_size=4)
    want = gen.generate(prompts, 12)  # EOS prefix (jaxlm-trained), greedy; cut at EOS
    got = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
    assert got.usage.completion_tokens <= 36
    stream = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=12,
                                       temperature=0, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == want[0] and len(pieces) > 1
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_sigterm_lets_a_running_request_finish_and_exits_0(served):
    """Last in this file: it stops the server."""
    import threading
    body = json.dumps({"prompt": "long", "max_tokens": 200, "temperature": 0}).encode()
    answer = {}

    def ask():
        req = urllib.request.Request(served["url"] + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer["status"], answer["body"] = r.status, json.loads(r.read())

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(0.3)
    served["proc"].send_signal(signal.SIGTERM)
    t.join(60)
    assert served["proc"].wait(60) == 0, served["log"].read_text()
    assert answer["status"] == 200 and answer["body"]["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_model_that_cannot_load_stops_before_listening(tmp_path):
    port = free_port()
    out = subprocess.run(serve_command(f"--workdir={tmp_path / 'nowhere'}", f"--port={port}"),
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nowhere" in lines[-1], out.stderr


@pytest.mark.parametrize("classes", [3, 1])
def test_a_classifier_is_served_as_its_model_scores_each_text_alone(tmp_path, classes):
    """A BERT with a class head (random): /v1/classify on texts and pairs, batched and
    padded, gives the probabilities of the model applied to each encoded example alone
    (a regression head, one output: its score)."""
    from fastapi.testclient import TestClient
    from conftest import tiny_bert_config
    from jaxlm.data.labelled import Encoder
    from jaxlm.serve.__main__ import load
    from jaxlm.serve.app import make_app
    cfg = tiny_bert_config(num_classes=classes)
    cfg.finetune.class_names = ("a", "b", "c") if classes == 3 else ()
    setup = build(cfg, jax.devices()[:1])
    params = jax.jit(setup.init_params)(jax.random.PRNGKey(1))
    export = tmp_path / "export"
    checkpoint.export_params(export, params, checkpoint.make_export_meta(cfg, setup.tokenizer, 0))
    cfg.evaluate.params = str(export)
    service = load(cfg, tmp_path)
    texts, pairs = ["a fine film", "dull", "x" * 80, "y", "z", "w", "v", "u", "t"], ["pair"] * 9
    encode = Encoder(setup.tokenizer, cfg.data.seq_len, pooled=True)
    with TestClient(make_app(service)) as client:
        for pair in (None, pairs):
            body = {"input": texts} | ({"pair": pair} if pair else {})
            out = client.post("/v1/classify", json=body).json()["data"]
            for i, text in enumerate(texts):
                row = encode(text, pair[i] if pair else None)
                logits = setup.model.apply({"params": params}, row["tokens"][None], None,
                                           row["segments"][None], row["types"][None], output="classes")
                if classes == 1:
                    assert set(out[i]) == {"index", "score"}
                    np.testing.assert_allclose(out[i]["score"], logits[0, 0], rtol=1e-5, atol=1e-6)
                    continue
                want = np.asarray(jax.nn.softmax(logits, axis=-1))[0]
                np.testing.assert_allclose(out[i]["probabilities"], want, rtol=1e-5, atol=1e-6)
                assert out[i]["label_name"] == "abc"[int(want.argmax())]


def test_a_port_in_use_is_named_before_anything_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(serve_command(f"--workdir={tmp_path}", f"--port={port}"), cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --host=127.0.0.1 --port={port}: cannot listen there (Address already in use)")
