"""The HTTP layer of the server: OpenAI's wire format over a Service, and nothing of models.

    app = make_app(service, api_key="secret")   # then: uvicorn.run(app, port=8000)

Endpoints (every one but /health wants `Authorization: Bearer <api_key>` when api_key is set):

  POST /v1/completions   OpenAI completions: prompts as text or token ids, n, stop, echo,
                         logprobs (with echo, the prompt's too: what lm-eval's
                         local-completions reads), stream (server-sent events)
  GET  /v1/models        the one model, service.name
  POST /v1/classify      class probabilities (a model with a class head; a regression
                         head answers its score)
  GET  /tokenizer_info, POST /tokenize, POST /detokenize
                         lm-eval's remote tokenizer (tokenizer_backend=remote)
  GET  /health           200 while the process serves (no auth: for load balancers)
  GET  /metrics          Prometheus text: requests, tokens, queue, latencies

Every error is OpenAI's body, {"error": {"message", "type", "param", "code"}}, with the
request field at fault in "param" (jaxlm.serve.protocol checks the fields); a bad request
never touches the batcher.

Each choice of a completion is one engine Request. Its events arrive in the batcher's thread
(`_Choice.on_event`), which decodes the text, finds stop strings (returning False frees the
slot at once) and hands the handler pieces of final text through
loop.call_soon_threadsafe into an asyncio.Queue. A non-streamed response joins the pieces;
a streamed one sends each as an event, so the two give the same text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import time
import uuid
from typing import Any, NamedTuple

import anyio
import fastapi
import prometheus_client as prom
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from jaxlm.inference.engine import Done, Failed, PromptScores, QueueFull, Request, Stopping, Token
from jaxlm.inference.service import EOS_TEXT
from jaxlm.serve.protocol import (ApiError, Completion, bool_field, check_model, error_response,
                                  ids_field, json_body, parse_completion, text_field, texts_field)

log = logging.getLogger("jaxlm")

_FINISH = {"length": "length", "eos": "stop", "stopped": "abort", "cancelled": "abort"}


class _Entry(NamedTuple):
    """One token of a choice's logprobs."""
    id: int
    logprob: float | None           # None: the first prompt token (nothing before it)
    top: tuple | None               # Token.top; None for the first prompt token
    offset: int                     # where its text starts in the choice's text


@dataclasses.dataclass
class _Piece:
    """Final text (and its tokens' entries) of one choice, sent from the batcher's thread."""
    index: int
    text: str = ""
    entries: list = dataclasses.field(default_factory=list)
    finish: str | None = None       # set on the choice's last piece
    generated: int = 0              # with finish: tokens the choice generated
    error: BaseException | None = None


class _Choice:
    """One choice: engine events in (the batcher's thread), final pieces out (`deliver`).

    Text is final once no later token can change it: the generated ids are decoded whole
    after each token, and the end is held back while it is U+FFFD (part of a UTF-8
    character) or could be the start of a stop string. A logprob entry goes out with the
    text it starts in, so after a stop string the tokens past it are not reported."""

    def __init__(self, index: int, service, ids: list[int], head: str, c: Completion,
                 deliver, metrics: "_Metrics"):
        self.index, self.service, self.deliver, self.metrics = index, service, deliver, metrics
        self.prompt, self.head, self.stops = ids, head, c.stop   # head: the echoed prompt text
        self.with_logprobs, self.echo = c.logprobs is not None, c.echo
        self.ids: list[int] = []          # generated ids
        self.text = ""                    # their text, decoded whole
        self.sent = 0                     # characters of head + text delivered
        self.pending: list[_Entry] = []   # entries not delivered yet
        self.closed = False               # the client left: stop at the next event
        self.request: Request | None = None
        self.last = time.monotonic()      # submit time, then the last token's

    def close(self):
        self.closed = True
        if self.request is not None:
            self.request.cancel()

    def on_event(self, event) -> bool:
        if self.closed:
            return False
        if isinstance(event, Token):
            return self._token(event)
        if isinstance(event, PromptScores):
            self._prompt_entries(event.tokens)
            self._release(len(self.head))
        elif isinstance(event, Done):
            self._release(len(self.head) + len(self.text), _FINISH[event.reason], everything=True)
        elif isinstance(event, Failed):
            self.deliver(_Piece(self.index, error=event.error))
        return True

    def _prompt_entries(self, scored: list[Token]):
        """The prompt's tokens (echo): the first unscored, then the engine's scores."""
        if not (self.echo and self.with_logprobs):
            return
        offsets, at = [], 0
        for i in self.prompt:
            offsets.append(at)
            at += len(self.service.decode([i]))
        self.pending.append(_Entry(self.prompt[0], None, None, 0))
        self.pending += [_Entry(t.id, t.logprob, t.top, o) for t, o in zip(scored, offsets[1:])]

    def _token(self, token: Token) -> bool:
        now = time.monotonic()
        (self.metrics.ttft if not self.ids else self.metrics.tpot).observe(now - self.last)
        self.metrics.generated.inc()
        self.last = now
        offset = len(self.head) + len(self.text.rstrip("\ufffd"))
        self.ids.append(token.id)
        self.text = self.service.decode(self.ids)
        if self.with_logprobs:
            self.pending.append(_Entry(token.id, token.logprob, token.top, offset))
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=None)
        if cut is not None:  # the text ends before the stop string; the slot is freed now
            self._release(len(self.head) + cut, "stop")
            return False
        self._release(len(self.head) + len(self.text) - self._held())
        return True

    def _held(self) -> int:
        """How many characters at the end of the text may still change."""
        t = self.text
        held = len(t) - len(t.rstrip("\ufffd"))
        for s in self.stops:
            held = max([held] + [k for k in range(1, min(len(s), len(t) + 1)) if t.endswith(s[:k])])
        return held

    def _release(self, upto: int, finish: str | None = None, everything: bool = False):
        """Delivers head + text up to `upto` and the entries that start before it."""
        text = (self.head + self.text)[self.sent:upto]
        k = len(self.pending) if everything else sum(e.offset < upto for e in self.pending)
        entries, self.pending = self.pending[:k], self.pending[k:]
        self.sent = max(self.sent, upto)
        if text or finish:
            self.deliver(_Piece(self.index, text, entries, finish, len(self.ids)))
        else:
            self.pending = entries + self.pending  # they go with the next text


def _finite(x: float | None) -> float | None:
    """JSON has no -inf or NaN: -inf is -9999.0 (vLLM's choice), NaN null."""
    return x if x is None or math.isfinite(x) else (-9999.0 if x < 0 else None)


def _logprobs(entries: list[_Entry], k: int, service) -> dict:
    """OpenAI's logprobs object; top_logprobs hold the first max(k, 1) alternatives, so
    lm-eval's is_greedy (token_logprob == max(top)) reads the engine's values unchanged."""
    def top(pairs):
        if pairs is None:
            return None
        out: dict[str, float] = {}
        for i, lp in pairs[:max(k, 1)]:  # most likely first: a text two ids share keeps its best
            out.setdefault(service.token_text(i), _finite(lp))
        return out

    return {"tokens": [service.token_text(e.id) for e in entries],
            "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [top(e.top) for e in entries],
            "text_offset": [e.offset for e in entries]}


_GONE = object()  # put in a handler's queue when its client has left


async def _watch(request: fastapi.Request, queue: asyncio.Queue, every_s: float = 1.0):
    """Puts _GONE in the queue once the client has disconnected."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    queue.put_nowait(_GONE)


class _ClientGone(Exception):
    pass


async def _pieces(queue: asyncio.Queue, choices: int):
    """The pieces of every choice, until each has finished; raises on a failed choice."""
    left = choices
    while left:
        piece = await queue.get()
        if piece is _GONE:
            raise _ClientGone()
        if piece.error is not None:
            raise ApiError(500, f"generation failed: {piece.error}", kind="server_error")
        left -= piece.finish is not None
        yield piece


# ----------------------------------------------------------------------------- metrics


class _Metrics:
    """Prometheus metrics in a registry of their own (several apps share a test process)."""

    def __init__(self, batcher):
        r = self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("jaxlm_requests_total", "HTTP responses",
                                     ["endpoint", "status"], registry=r)
        self.prompt = prom.Counter("jaxlm_prompt_tokens_total", "prompt tokens the engine read",
                                   registry=r)
        self.generated = prom.Counter("jaxlm_generated_tokens_total", "tokens generated",
                                      registry=r)
        prom.Gauge("jaxlm_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: len(batcher.waiting) if batcher else 0)
        prom.Gauge("jaxlm_running_slots", "slots generating", registry=r).set_function(
            lambda: len(batcher.running) if batcher else 0)
        self.ttft = prom.Histogram("jaxlm_time_to_first_token_seconds",
                                   "from submit to a choice's first token", registry=r)
        self.tpot = prom.Histogram("jaxlm_time_per_output_token_seconds",
                                   "between a choice's successive tokens", registry=r,
                                   buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))


class _CountRequests:
    """ASGI middleware: jaxlm_requests_total{endpoint, status} of every HTTP response."""

    def __init__(self, app, counter, paths: set[str]):
        self.app, self.counter, self.paths = app, counter, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.paths else "other"
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counter.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:  # answered 500 by the server's error middleware, outside this one
                self.counter.labels(endpoint, "500").inc()
            raise


# ----------------------------------------------------------------------------- the app


def make_app(service, api_key: str | None = None, shutdown_s: float = 30.0,
             max_n: int = 8) -> fastapi.FastAPI:
    """The server's app over `service`. Its lifespan starts the batcher (unless started)
    and stops it at shutdown, letting running requests finish for up to shutdown_s."""
    batcher, created = service.batcher, int(time.time())
    metrics = _Metrics(batcher)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if batcher is not None:
            batcher.start()  # unless the caller started it
        yield
        if batcher is not None:
            await anyio.to_thread.run_sync(batcher.stop, shutdown_s)

    async def authorize(request: fastapi.Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header "
                           "'Authorization: Bearer <key>'", kind="authentication_error")

    app = fastapi.FastAPI(title="jaxlm", lifespan=lifespan, docs_url=None, redoc_url=None,
                          openapi_url=None)
    api = fastapi.APIRouter(dependencies=[fastapi.Depends(authorize)])

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.kind, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown path, wrong method
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @api.get("/metrics")
    async def get_metrics():
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model",
                                            "created": created, "owned_by": "jaxlm"}]}

    # lm-eval's remote tokenizer. The model's prefix is always added, whatever
    # add_special_tokens says: it is how this model reads text (Service.encode).
    @api.get("/tokenizer_info")
    async def tokenizer_info():
        return {"eos_token": EOS_TEXT, "bos_token": None, "pad_token": None,
                "chat_template": None, "model_max_length": service.max_len}

    @api.post("/tokenize")
    async def tokenize(request: fastapi.Request):
        body = await json_body(request)
        text = text_field(body.get("prompt"), "prompt")
        bool_field(body, "add_special_tokens")
        ids = service.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": service.max_len}

    @api.post("/detokenize")
    async def detokenize(request: fastapi.Request):
        body = await json_body(request)
        tokens = body.get("tokens")
        ids = [] if tokens == [] else ids_field(tokens, "tokens", service.tokenizer.vocab_size)
        return {"prompt": service.decode(ids)}

    @api.post("/v1/classify")
    async def classify(request: fastapi.Request):
        body = await json_body(request)
        if service.classify is None:
            raise ApiError(404, f"model {service.name!r} does not classify (it has no class head)")
        check_model(body, service)
        texts, pairs = texts_field(body, "input"), texts_field(body, "pair", required=False)
        if pairs is not None and len(pairs) != len(texts):
            raise ApiError(400, f"pair holds {len(pairs)} texts for {len(texts)} inputs",
                           param="pair")
        try:
            probs = await anyio.to_thread.run_sync(service.classify, texts, pairs)
        except Exception as e:
            log.exception("serving: classify failed")
            raise ApiError(500, f"classification failed: {e}", kind="server_error") from None
        data = []
        for i, p in enumerate(probs):
            if len(p) == 1:  # a regression head (e.g. STS-B): its score, no classes
                data.append({"index": i, "score": float(p[0])})
                continue
            label = max(range(len(p)), key=lambda c: p[c])
            name = service.class_names[label] if label < len(service.class_names) else str(label)
            data.append({"index": i, "label": label, "label_name": name,
                         "probabilities": [float(x) for x in p]})
        return {"object": "list", "model": service.name, "data": data}

    @api.post("/v1/completions")
    async def completions(request: fastapi.Request):
        body = await json_body(request)
        if batcher is None:
            raise ApiError(404, f"model {service.name!r} does not generate (it classifies: "
                           "POST /v1/classify)")
        c = parse_completion(body, service, max_n)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(piece):  # in the batcher's thread
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        choices = [_Choice(i * c.n + j, service, ids, head if c.echo else "", c, deliver, metrics)
                   for i, (ids, head) in enumerate(c.prompts) for j in range(c.n)]
        watcher = asyncio.create_task(_watch(request, queue))
        try:
            for choice, settings in zip(choices, c.settings):
                choice.request = Request(choice.prompt, c.max_tokens, choice.on_event, settings,
                                         prompt_logprobs=c.echo and c.logprobs is not None)
                try:
                    batcher.submit(choice.request)
                except QueueFull as e:
                    raise ApiError(429, f"the server is busy: {e}; retry later",
                                   kind="rate_limit_error", headers={"Retry-After": "1"}) from None
                except Stopping as e:
                    raise ApiError(503, f"{e}; retry on another server", kind="server_error") from None
                metrics.prompt.inc(len(choice.prompt))
            pieces = _pieces(queue, len(choices))
            if c.stream:  # the first piece before the 200, so an early failure is a 500
                first = await anext(pieces)
                return StreamingResponse(_events(first, pieces, choices, c, service),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return _response([p async for p in pieces], c, service)
        except _ClientGone:
            _close(choices)
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except BaseException:
            _close(choices)
            raise
        finally:
            watcher.cancel()

    app.include_router(api)
    paths = {getattr(route, "path", None) for route in [*app.routes, *api.routes]} - {None}
    app.add_middleware(_CountRequests, counter=metrics.requests, paths=paths)
    app.state.metrics = metrics
    return app


def _close(choices: list[_Choice]):
    for choice in choices:
        choice.close()


def _response(pieces: list[_Piece], c: Completion, service) -> JSONResponse:
    """The non-streamed response: each choice's pieces joined."""
    out: dict[int, dict[str, Any]] = {}
    for p in pieces:
        o = out.setdefault(p.index, {"text": "", "entries": [], "finish": None, "generated": 0})
        o["text"] += p.text
        o["entries"] += p.entries
        if p.finish:
            o["finish"], o["generated"] = p.finish, p.generated
    lps = lambda entries: None if c.logprobs is None else _logprobs(entries, c.logprobs, service)
    choices = [{"index": i, "text": o["text"], "logprobs": lps(o["entries"]),
                "finish_reason": o["finish"]} for i, o in sorted(out.items())]
    prompt_tokens = sum(len(ids) for ids, _ in c.prompts)
    generated = sum(o["generated"] for o in out.values())
    return JSONResponse({
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": service.name, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                  "total_tokens": prompt_tokens + generated}})


async def _events(first: _Piece, pieces, choices: list[_Choice], c: Completion, service):
    """Server-sent events: one chunk per piece, then [DONE]. Leaving early (the client
    disconnected: Starlette cancels this) cancels the requests, freeing their slots."""
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(p: _Piece) -> str:
        lp = None if c.logprobs is None else _logprobs(p.entries, c.logprobs, service)
        return "data: " + json.dumps({
            "id": cid, "object": "text_completion", "created": created, "model": service.name,
            "choices": [{"index": p.index, "text": p.text, "logprobs": lp,
                         "finish_reason": p.finish}]}) + "\n\n"

    try:
        yield chunk(first)
        try:
            async for piece in pieces:
                yield chunk(piece)
        except _ClientGone:
            return
        except ApiError as e:  # a failure after the 200: an error event ends the stream
            yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind,
                                                   "param": None, "code": None}}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        _close(choices)
