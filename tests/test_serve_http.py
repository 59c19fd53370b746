"""The HTTP layer (jaxlm.serve.app) against mock_service: no model, outputs by hand.

MockEngine's rules (jaxlm.inference.service): the first new token is the last prompt
token + 1, each next one the previous + 1; every generated token has logprob -0.5 and the
alternatives (itself, -0.5), (itself + 1, -1.5); prompt token j (after the first) scores -j.
The byte tokenizer reads text as UTF-8 bytes, EOS is 256 and the service's prefix is [EOS],
so "ab" is [256, 97, 98] and continues "cdef...".
"""

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from jaxlm.inference.engine import Request
from jaxlm.inference.service import mock_service
from jaxlm.serve.app import _Choice, _Metrics, make_app
from jaxlm.serve.protocol import parse_completion

EOS = "<|endoftext|>"


@pytest.fixture
def serve():
    """serve(api_key=None, **mock_service kwargs) -> a started TestClient; .service is its
    Service. Every client is shut down (its batcher stopped) at the end of the test."""
    with contextlib.ExitStack() as stack:
        def make(api_key=None, max_n=8, **mock):
            service = mock.pop("service", None) or mock_service(**mock)
            app = make_app(service, api_key=api_key, shutdown_s=2.0, max_n=max_n)
            client = stack.enter_context(TestClient(app))
            client.service = service
            return client
        yield make


@contextlib.contextmanager
def uvicorn_server(app):
    """A real server on 127.0.0.1 (a free port) in a thread: its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="the server to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until(condition, timeout_s=3.0, what="the condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def complete(client, **body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse(text: str) -> list:
    """The events of a streamed response: dicts, then the string "[DONE]"."""
    assert text.endswith("\n\n"), text[-50:]
    out = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: "), event
        data = event.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_good_request_works(client):
    assert complete(client, prompt="ab", max_tokens=2)["choices"][0]["text"] == "cd"


# ----------------------------------------------------------------------------- completions


def test_string_prompt(serve):
    client = serve()
    out = complete(client, prompt="ab", max_tokens=5, model="mock")
    assert out["object"] == "text_completion" and out["model"] == "mock"
    assert out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    assert out["choices"] == [{"index": 0, "text": "cdefg", "logprobs": None,
                               "finish_reason": "length"}]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_token_id_prompts_and_defaults(serve):
    client = serve()
    out = complete(client, prompt=[104, 105], max_tokens=3)  # "hi", no prefix: used as given
    assert out["choices"][0]["text"] == "jkl"
    assert out["usage"]["prompt_tokens"] == 2
    out = complete(client, prompt=[[104], [120, 121]])       # max_tokens defaults to 16
    assert [c["text"] for c in out["choices"]] == ["ijklmnopqrstuvwx", "z{|}~\x7f" + "\ufffd" * 10]
    assert out["usage"]["completion_tokens"] == 32


def test_n_and_a_list_of_prompts(serve):
    client = serve()
    out = complete(client, prompt=["ab", "xy"], n=2, max_tokens=3)
    # choice index = prompt index * n + j
    assert [(c["index"], c["text"]) for c in out["choices"]] == [
        (0, "cde"), (1, "cde"), (2, "z{|"), (3, "z{|")]
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}


def test_stop_strings_cut_the_text_and_free_the_slot(serve):
    client = serve(delay_s=0.01)
    out = complete(client, prompt="ab", max_tokens=50, stop="ef")
    assert out["choices"][0]["text"] == "cd" and out["choices"][0]["finish_reason"] == "stop"
    # Stopped at "f", the 4th token, not at max_tokens: the slot was freed at once.
    assert out["usage"]["completion_tokens"] == 4
    wait_until(lambda: not client.service.batcher.running, 1.0, "the slot to be freed")
    out = complete(client, prompt="ab", max_tokens=50, stop=["e", "zz", "cde"])
    assert out["choices"][0]["text"] == ""  # the earliest stop string wins
    out = complete(client, prompt="ab", max_tokens=3, stop=["c"])
    assert out["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}


def test_eos_ends_with_stop(serve):
    client = serve()
    out = complete(client, prompt=[250], max_tokens=20)
    # 251..255 (bytes that are not UTF-8: U+FFFD each), then 256 = EOS, which is not text.
    assert out["choices"][0]["text"] == "\ufffd" * 5
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 6  # EOS is a generated token (it has a logprob)


def test_ids_past_the_tokenizer_have_no_text(serve):
    """A model table padded past the tokenizer's 258 ids (GPT-2 shapes with the byte
    tokenizer): such ids are generated, counted and scored, and have no text."""
    client = serve(vocab_size=300)
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": [257], "max_tokens": 3, "logprobs": 1,
                                                 "stream": stream})
        assert r.status_code == 200
    out = complete(client, prompt=[257], max_tokens=3, logprobs=1)["choices"][0]
    assert out["text"] == "" and out["logprobs"]["tokens"] == ["", "", ""]
    assert out["logprobs"]["token_logprobs"] == [-0.5] * 3


def test_echo_logprobs_without_new_tokens(serve):
    """lm-eval scores a prompt so: echo, max_tokens 0; the arrays are the prompt's tokens."""
    client = serve()
    out = complete(client, prompt="abc", max_tokens=0, echo=True, logprobs=1)
    choice = out["choices"][0]
    assert choice["text"] == "abc" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {
        "tokens": [EOS, "a", "b", "c"],
        "token_logprobs": [None, -1.0, -2.0, -3.0],
        "top_logprobs": [None, {"a": -1.0}, {"b": -2.0}, {"c": -3.0}],
        "text_offset": [0, 0, 1, 2]}
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}


def test_echo_with_one_new_token_as_lm_eval_asks(serve):
    """lm-eval's local-completions loglikelihood payload: ids, echo, max_tokens 1, logprobs 1;
    it reads token_logprobs[ctxlen:-1] and is_greedy = logprob == max(top_logprobs)."""
    client = serve()
    out = complete(client, model="mock", prompt=[[104, 105], [120, 121, 122]], temperature=0,
                   max_tokens=1, logprobs=1, seed=1234, echo=True)
    first, second = out["choices"]
    assert first["text"] == "hij" and second["text"] == "xyz{"
    assert first["logprobs"]["token_logprobs"] == [None, -1.0, -0.5]
    assert first["logprobs"]["top_logprobs"] == [None, {"i": -1.0}, {"j": -0.5}]
    assert len(second["logprobs"]["tokens"]) == 3 + 1
    for choice in out["choices"]:
        lps = choice["logprobs"]
        for lp, top in zip(lps["token_logprobs"][1:], lps["top_logprobs"][1:]):
            assert lp == max(top.values())  # greedy, as the mock's tokens are


def test_top_logprobs(serve):
    client = serve()
    lps = complete(client, prompt="ab", max_tokens=2, logprobs=2)["choices"][0]["logprobs"]
    assert lps == {"tokens": ["c", "d"], "token_logprobs": [-0.5, -0.5],
                   "top_logprobs": [{"c": -0.5, "d": -1.5}, {"d": -0.5, "e": -1.5}],
                   "text_offset": [0, 1]}
    lps = complete(client, prompt="ab", max_tokens=2, logprobs=0)["choices"][0]["logprobs"]
    assert lps["top_logprobs"] == [{"c": -0.5}, {"d": -0.5}]  # at least the most likely one
    out = complete(client, prompt="ab", max_tokens=4, logprobs=1, stop="e")
    assert out["choices"][0]["logprobs"]["tokens"] == ["c", "d"]  # not the stop string's token


@pytest.mark.parametrize("body", [
    dict(prompt="ab", max_tokens=6, logprobs=2),
    dict(prompt=["ab", "xy"], n=2, max_tokens=5, stop=["{|", "ef"]),
    dict(prompt=[250], max_tokens=20, echo=True, logprobs=1),   # U+FFFD held back, EOS
    dict(prompt="hello", max_tokens=0, echo=True, logprobs=3),
], ids=["logprobs", "n-stop", "eos-echo", "echo-only"])
def test_stream_pieces_join_to_the_response(serve, body):
    client = serve()
    whole = complete(client, **body)
    r = client.post("/v1/completions", json=dict(body, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    texts, lps, finishes = {}, {}, {}
    for e in events[:-1]:
        assert e["object"] == "text_completion" and e["model"] == "mock" and len(e["choices"]) == 1
        c = e["choices"][0]
        assert c["index"] not in finishes, "a chunk after the choice's final one"
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        if c["logprobs"] is not None:
            for k, v in c["logprobs"].items():
                lps.setdefault(c["index"], {}).setdefault(k, []).extend(v)
        if c["finish_reason"] is not None:
            finishes[c["index"]] = c["finish_reason"]
    for choice in whole["choices"]:
        i = choice["index"]
        assert texts[i] == choice["text"] and finishes[i] == choice["finish_reason"]
        assert lps.get(i) == choice["logprobs"]


def _feed(tokens, stop=()):
    """The pieces a _Choice delivers for these generated ids (the batcher's side alone)."""
    service = mock_service()
    c = parse_completion({"prompt": "a", "stop": list(stop)}, service, 8)
    pieces = []
    choice = _Choice(0, service, [256, 97], "", c, pieces.append, _Metrics(None))
    for t in tokens:
        choice.on_event(service.batcher.engine.token(t))
        pieces.append("|")  # marks each token
    return "".join(p if p == "|" else p.text for p in pieces)


def test_incremental_text_is_released_only_when_final():
    assert _feed("é".encode()) == "|é|"               # half a character waits
    assert _feed(b"aXYb", stop=["XYZ"]) == "a|||XYb|"  # a stop string's start waits
    assert _feed(b"aXYZ", stop=["XYZ"]) == "a||||"     # ... and is cut when complete


# ----------------------------------------------------------------------------- other endpoints


def test_models_and_health(serve):
    client = serve()
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
        ("mock", "model", "jaxlm")]


def test_api_key(serve):
    client = serve(api_key="sesame")
    assert client.get("/health").status_code == 200  # never asks for the key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("GET", "/metrics"), ("POST", "/tokenize")):
            r = client.request(method, path, headers=headers, json={"prompt": "ab"})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
    good = {"Authorization": "Bearer sesame"}
    assert client.get("/v1/models", headers=good).status_code == 200
    r = client.post("/v1/completions", headers=good, json={"prompt": "ab", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "c"


def test_metrics(serve):
    client = serve()
    complete(client, prompt="ab", max_tokens=3)
    assert client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2,
                                                "stream": True}).status_code == 200
    client.post("/v1/completions", json={"prompt": 5})
    text = client.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    requests = lambda status: samples["jaxlm_requests_total", (("endpoint", "/v1/completions"),
                                                               ("status", status))]
    assert requests("200") == 2 and requests("400") == 1
    assert samples["jaxlm_prompt_tokens_total", ()] == 6
    assert samples["jaxlm_generated_tokens_total", ()] == 5
    assert samples["jaxlm_queue_depth", ()] == 0 and samples["jaxlm_running_slots", ()] == 0
    assert samples["jaxlm_time_to_first_token_seconds_count", ()] == 2
    assert samples["jaxlm_time_per_output_token_seconds_count", ()] == 3


def test_tokenizer_endpoints(serve):
    client = serve()
    info = client.get("/tokenizer_info").json()
    assert info == {"eos_token": EOS, "bos_token": None, "pad_token": None,
                    "chat_template": None, "model_max_length": 64}
    assert client.post("/tokenize", json={"prompt": EOS}).json()["tokens"][0] == 256
    out = client.post("/tokenize", json={"prompt": "héllo", "add_special_tokens": False}).json()
    assert out == {"tokens": [256, 104, 195, 169, 108, 108, 111], "count": 7, "max_model_len": 64}
    back = client.post("/detokenize", json={"tokens": out["tokens"]}).json()
    assert back == {"prompt": "héllo"}


def test_classify(serve):
    client = serve()
    out = client.post("/v1/classify", json={"input": "abc", "model": "mock"}).json()
    assert out["object"] == "list" and out["model"] == "mock"
    # The mock: P(class 1) = n / (n + 1) for n characters (of text and pair).
    assert out["data"] == [{"index": 0, "label": 1, "label_name": "positive",
                            "probabilities": [0.25, 0.75]}]
    out = client.post("/v1/classify", json={"input": ["", "ab"]}).json()
    assert [(d["index"], d["label_name"], d["probabilities"]) for d in out["data"]] == [
        (0, "negative", [1.0, 0.0]), (1, "positive", [1 / 3, 2 / 3])]
    out = client.post("/v1/classify", json={"input": ["ab", "a"], "pair": ["cde", "b"]}).json()
    assert [d["probabilities"] for d in out["data"]] == [[1 / 6, 5 / 6], [1 / 3, 2 / 3]]


def test_a_model_that_only_classifies_or_only_generates(serve):
    generator = mock_service()
    generator.classify = None
    client = serve(service=generator)
    r = client.post("/v1/classify", json={"input": "a"})
    assert r.status_code == 404 and "does not classify" in r.json()["error"]["message"]
    assert_good_request_works(client)
    classifier = mock_service()
    classifier.batcher = None
    client = serve(service=classifier)
    r = client.post("/v1/completions", json={"prompt": "a"})
    assert r.status_code == 404 and "does not generate" in r.json()["error"]["message"]
    assert client.post("/v1/classify", json={"input": "a"}).status_code == 200


def test_a_batcher_started_by_the_caller(serve):
    service = mock_service()
    service.batcher.start()
    assert_good_request_works(serve(service=service))


# ----------------------------------------------------------------------------- bad requests

# (path, body: a dict sent as JSON or raw bytes, status, the field named: in "param", or
# None when the body as a whole is at fault, and words of the message)
BAD = [
    ("/v1/completions", b"{not json", 400, None, "not JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None, "UTF-8"),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": NaN}', 400, None, "not JSON"),
    ("/v1/completions", b"[" * 100000, 400, None, "not JSON"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens", '"ten"'),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens", ">= 0"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2.0}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "ab", "max_tokens": 63}, 400, "max_tokens", "context of 64"),
    ("/v1/completions", {"prompt": "x" * 64}, 400, "prompt",
     "prompt of 65 tokens; the model's context is 64"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "got 5"),
    ("/v1/completions", {}, 400, "prompt", "got null"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt", "non-empty"),
    ("/v1/completions", {"prompt": ["a", 5]}, 400, "prompt", "token ids"),
    ("/v1/completions", {"prompt": [1, 258]}, 400, "prompt", "258"),
    ("/v1/completions", {"prompt": [1, True]}, 400, "prompt", "token ids"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "prompt", "surrogate"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model", "'gpt-4'"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature", '"hot"'),
    ("/v1/completions", {"prompt": "a", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "a", "top_k": -1}, 400, "top_k", ">= 0"),
    ("/v1/completions", {"prompt": "a", "stop": 3}, 400, "stop", "got 3"),
    ("/v1/completions", {"prompt": "a", "stop": ""}, 400, "stop", "non-empty"),
    ("/v1/completions", {"prompt": "a", "stop": ["s"] * 17}, 400, "stop", "at most 16"),
    ("/v1/completions", {"prompt": "a", "n": 9}, 400, "n", "[1, 8]"),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n", "[1, 8]"),
    ("/v1/completions", {"prompt": "a", "logprobs": 6}, 400, "logprobs", "[0, 5]"),
    ("/v1/completions", {"prompt": "a", "echo": "yes"}, 400, "echo", "true or false"),
    ("/v1/completions", {"prompt": "a", "stream": 1}, 400, "stream", "true or false"),
    ("/v1/completions", {"prompt": "a", "seed": -1}, 400, "seed", "integer"),
    ("/v1/completions", {"prompt": ["a"] * 5, "n": 2}, 400, "prompt", "queues at most 8"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "a string"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "token ids"),
    ("/detokenize", {"tokens": [999]}, 400, "tokens", "999"),
    ("/v1/classify", {"input": 5}, 400, "input", "strings"),
    ("/v1/classify", {"input": []}, 400, "input", "non-empty"),
    ("/v1/classify", {"input": ["a", "b"], "pair": ["c"]}, 400, "pair", "1 texts for 2"),
    ("/v1/classify", {"input": "a", "model": "other"}, 404, "model", "'other'"),
]


@pytest.mark.parametrize("path, body, status, field, words", BAD,
                         ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_are_answered_and_harmless(serve, path, body, status, field, words):
    client = serve()
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert error["param"] == field and words in error["message"], error
    if field:
        assert field in error["message"]
    assert_good_request_works(client)


def test_unknown_paths_and_methods(serve):
    client = serve()
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_full_queue_is_429(serve):
    client = serve(slots=1, max_queue=1, delay_s=0.02)
    batcher = client.service.batcher
    running = batcher.submit(Request([256, 97], 40, lambda e: None))
    wait_until(lambda: batcher.running, what="the first request to take the slot")
    waiting = batcher.submit(Request([256, 97], 40, lambda e: None))  # the queue is full
    r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert "busy" in r.json()["error"]["message"]
    running.cancel(), waiting.cancel()
    wait_until(lambda: not batcher.running and not batcher.waiting, what="the queue to empty")
    assert_good_request_works(client)


def test_a_failing_request_is_500_and_the_next_succeeds(serve):
    client = serve(fail_on=ord("x"))
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "xa", "stream": stream})
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and "breaks the engine" in error["message"]
        assert_good_request_works(client)


def test_a_client_leaving_mid_stream_frees_its_slot():
    service = mock_service(slots=1, delay_s=0.05)  # 60 tokens would take 3 s
    with uvicorn_server(make_app(service)) as url:
        started = time.monotonic()
        body = {"prompt": "a", "max_tokens": 60, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as r:
            assert r.status_code == 200
            assert next(r.iter_raw()).startswith(b"data: ")
        # Leaving the block closed the connection.
        wait_until(lambda: not service.batcher.running, 2.0, "the slot to be freed")
        assert time.monotonic() - started < 2.5
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "cd"


def test_a_client_leaving_before_a_whole_response_frees_its_slot():
    service = mock_service(slots=1, delay_s=0.05)
    with uvicorn_server(make_app(service)) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"prompt": "a", "max_tokens": 60}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: service.batcher.running, what="the request to start")
        wait_until(lambda: not service.batcher.running, 2.0, "the slot to be freed")
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200
