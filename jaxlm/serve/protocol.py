"""What a request to the server may say, checked field by field, and OpenAI's error body.

Every check raises ApiError with one line naming the field (OpenAI's "param"); the app
turns it into {"error": {"message", "type", "param", "code"}} with its status code.
`parse_completion` reads a POST /v1/completions body into a `Completion` (OpenAI's
defaults), or refuses it before anything reaches the batcher.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random

import fastapi
from fastapi.responses import JSONResponse

from jaxlm.inference.engine import Settings

# OpenAI allows 4 stop strings; lm-eval's local-completions sends its task's whole `until`
# list plus the EOS text, uncut, so a few more are accepted.
MAX_STOP = 16


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's body; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers


def error_response(status: int, message: str, param=None, kind="invalid_request_error",
                    headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def bad_field(name: str, expected: str, value) -> ApiError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return ApiError(400, f"{name} must be {expected}, got {shown}", param=name)


# ----------------------------------------------------------------------------- fields
# One function per kind of field; null means the default, as OpenAI's clients send it.


def int_field(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise bad_field(name, f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]", v)
    return v


def float_field(body: dict, name: str, default: float, ok, expected: str) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise bad_field(name, expected, v)
    return float(v)


def bool_field(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_field(name, "true or false", v)
    return v


def text_field(v, name: str) -> str:
    """A string that is valid Unicode (JSON's \\ud800 escapes make ones UTF-8 cannot hold)."""
    if not isinstance(v, str):
        raise bad_field(name, "a string", v)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{name} holds a lone surrogate (\\ud800-\\udfff): not Unicode text",
                       param=name) from None
    return v


def texts_field(body: dict, name: str, required: bool = True) -> list[str] | None:
    """A string or a non-empty list of strings, as a list."""
    v = body.get(name)
    if v is None and not required:
        return None
    if isinstance(v, list) and v:
        return [text_field(t, name) for t in v]
    if isinstance(v, str):
        return [text_field(v, name)]
    raise bad_field(name, "a string or a non-empty list of strings", v)


def ids_field(v, name: str, vocab_size: int) -> list[int]:
    if not isinstance(v, list) or not v or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise bad_field(name, "a non-empty list of token ids (integers)", v)
    bad = next((i for i in v if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"{name} holds token id {bad}: ids are 0..{vocab_size - 1}", param=name)
    return v


def check_model(body: dict, service) -> None:
    v = body.get("model")
    if v is not None and v != service.name:
        if not isinstance(v, str):
            raise bad_field("model", "a string", v)
        raise ApiError(404, f"model {v!r} does not exist: this server serves {service.name!r}",
                       param="model")


async def json_body(request: fastapi.Request) -> dict:
    """The request's JSON object; 400 for bytes that are not UTF-8, not JSON or not an object."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 (byte {e.start})") from None

    def no_constant(name):  # Python's json takes NaN and Infinity; JSON does not
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


# ----------------------------------------------------------------------------- completions


@dataclasses.dataclass(frozen=True)
class Completion:
    """A validated /v1/completions request."""
    prompts: list[tuple[list[int], str]]   # (ids the engine reads, the text `echo` shows)
    max_tokens: int
    settings: list[Settings]               # one per choice (its own seed)
    n: int
    stop: tuple[str, ...]
    logprobs: int | None
    echo: bool
    stream: bool


def prompts_field(body: dict, service) -> list[tuple[list[int], str]]:
    """`prompt`: a string, a list of strings, a list of ids or a list of lists of ids."""
    v, vocab = body.get("prompt"), service.tokenizer.vocab_size
    if isinstance(v, list) and not v:
        raise ApiError(400, "prompt is an empty list", param="prompt")
    if isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, str) for p in v)):
        texts = texts_field(body, "prompt")
        try:
            return [(service.encode(t), t) for t in texts]
        except (ValueError, TypeError, UnicodeError) as e:
            raise ApiError(400, f"prompt cannot be tokenized: {e}", param="prompt") from None
    if isinstance(v, list) and all(isinstance(p, list) for p in v):
        prompts = [ids_field(p, "prompt", vocab) for p in v]
    elif isinstance(v, list):
        prompts = [ids_field(v, "prompt", vocab)]
    else:
        raise bad_field("prompt", "a string, a list of strings, a list of token ids or a list of lists "
                   "of them", v)
    return [(ids, service.decode(ids)) for ids in prompts]


def parse_completion(body: dict, service, max_n: int) -> Completion:
    """The request's fields, checked (OpenAI's defaults; 400 naming the first bad field)."""
    check_model(body, service)
    prompts = prompts_field(body, service)
    max_tokens = int_field(body, "max_tokens", 16, 0)
    temperature = float_field(body, "temperature", 1.0, lambda t: t >= 0, "a number >= 0")
    top_p = float_field(body, "top_p", 1.0, lambda p: 0 < p <= 1, "a number in (0, 1]")
    top_k = int_field(body, "top_k", 0, 0)
    n = int_field(body, "n", 1, 1, max_n)
    logprobs = int_field(body, "logprobs", None, 0, service.max_logprobs)
    seed = int_field(body, "seed", None, 0, 2**31 - 1)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP
            and all(s and isinstance(s, str) for s in stop)):
        raise bad_field("stop", f"a non-empty string or a list of at most {MAX_STOP} of them",
                   body.get("stop"))
    echo, stream = bool_field(body, "echo"), bool_field(body, "stream")

    # The model reads the prompt and every new token but the last: those must fit.
    context = service.max_len
    for i, (ids, _) in enumerate(prompts):
        where = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
        if len(ids) > context:
            raise ApiError(400, f"{where} of {len(ids)} tokens; the model's context is {context}",
                           param="prompt")
        if len(ids) + max_tokens - 1 > context:
            raise ApiError(400, f"max_tokens={max_tokens} with a {where} of {len(ids)} tokens is "
                           f"over the model's context of {context} tokens (the last new token "
                           "is not read back, so prompt + max_tokens may be one more)",
                           param="max_tokens")
    queue = service.batcher.max_queue
    if len(prompts) * n > queue:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} is {len(prompts) * n} requests; the "
                       f"server queues at most {queue}", param="prompt")
    # n choices of one prompt differ by seed: seed + j when a seed is given, else random.
    seeds = [(seed + j) % 2**31 if seed is not None else random.getrandbits(31)
             for _ in prompts for j in range(n)]
    try:
        settings = [Settings(temperature=temperature, top_k=top_k, top_p=top_p, seed=s)
                    for s in seeds]
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return Completion(prompts, max_tokens, settings, n, tuple(stop), logprobs, echo, stream)
