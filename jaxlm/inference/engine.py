"""The slot engine a server drives: continuous batching over a fixed number of decode slots.

    engine = Engine(model, params, tokenizer, mesh, config.mesh, slots=16)
    p = engine.prefill(prompt_ids, Settings(temperature=0.8, seed=1))  # first token too
    engine.insert(p, slot=3)            # the prompt's KV-cache row into slot 3
    step = engine.generate()            # one new token for every slot

(the interface of JetStream's engine). `Batcher` runs that loop in a thread for a stream of
requests: a waiting request is prefilled and inserted as soon as a slot is free, one
decode step advances every running slot, and a finished slot is free for the next request
at the next step.

The KV cache is preallocated: `slots` rows of model.cache_len (else max_len) cells. A
prompt is prefilled alone (batch 1), right-padded to a length bucket (powers of two from
32 up to the cache length, so few programs compile); its row is copied into the slot with
the row's write index at the prompt's length, so the padding cells (segment 0: masked)
are overwritten by the generated tokens. Every row has its own write index, position,
sampling settings and random stream: token j of a request is drawn with key
fold_in(PRNGKey(seed), j). A request's arithmetic is the same whatever the other rows hold,
so its tokens do not depend on which requests share the batch.

Compiled programs, all made during `warm_up`: prefill per bucket (with and without the
prompt's log-probabilities), one insert, one decode step. `traces` counts them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import sharding
from jaxlm.inference.generate import LENGTH_BUCKET, Sampling, next_token
from jaxlm.models.layers import with_cache_index

log = logging.getLogger("jaxlm")


@dataclasses.dataclass(frozen=True)
class Settings(Sampling):
    """A request's sampling settings (generate.Sampling) and the seed of its random stream."""
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Token:
    id: int
    logprob: float                     # log-probability under the model (no temperature)
    top: tuple[tuple[int, float], ...]  # the engine's max_logprobs most likely (id, logprob)


@dataclasses.dataclass
class Prefilled:
    cache: Any                          # the prompt's KV-cache row (batch 1)
    length: int                         # prompt tokens
    first: Token                        # the first new token
    prompt: list[Token] | None          # each prompt token after the first, scored
    settings: Settings


class SlotState(NamedTuple):
    """Per-slot decoding state, on the devices; row i is slot i."""
    tokens: jax.Array       # [S] the token the next step feeds
    positions: jax.Array    # [S] its position
    counts: jax.Array       # [S] tokens drawn so far (the random stream's index)
    keys: jax.Array         # [S, 2] the request's PRNG key
    temperature: jax.Array  # [S]
    top_k: jax.Array        # [S]
    top_p: jax.Array        # [S]


def buckets(limit: int) -> list[int]:
    """Prompt lengths that compile: LENGTH_BUCKET, twice that, ..., up to `limit`."""
    out, n = [], LENGTH_BUCKET
    while n < limit:
        out.append(n)
        n *= 2
    return out + [limit]


def _next_tokens(logits_SxV, keys_Sx2, temperature_S, top_k_S, top_p_S):
    """next_token with each row's own settings and key. When every row is greedy the
    sampling path (a sort of the vocabulary per row) is skipped: same tokens, less work."""
    one = lambda logits, key, t, k, p: next_token(logits[None], key, t, k, p)[0]
    sample = lambda: jax.vmap(one)(logits_SxV, keys_Sx2, temperature_S, top_k_S, top_p_S)
    return jax.lax.cond(jnp.any(temperature_S > 0), sample,
                        lambda: jnp.argmax(logits_SxV, axis=-1).astype(jnp.int32))


def _scored(logits_NxV, chosen_N, top: int):
    """(log-probability of each chosen token, the `top` most likely ids and theirs)."""
    logp_NxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp_NxV, chosen_N[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp_NxV, top)
    return chosen, top_ids, top_lp


def _tokens(ids, logprobs, top_ids, top_lps) -> list[Token]:
    return [Token(int(i), float(lp), tuple(zip(map(int, ti), map(float, tl))))
            for i, lp, ti, tl in zip(ids, logprobs, top_ids, top_lps)]


class Engine:
    """prefill / insert / generate over `slots` decode slots (module docstring)."""

    def __init__(self, model: nn.Module, params, tokenizer, mesh, cfg_mesh, slots: int,
                 max_logprobs: int = 5):
        self.model, self.params, self.tok = model, params, tokenizer
        self.mesh, self.cfg_mesh, self.slots = mesh, cfg_mesh, slots
        self.max_len = min(model.cfg.get("cache_len") or model.cfg.max_len, model.cfg.max_len)
        self.max_logprobs = min(max_logprobs, model.cfg.vocab_size)
        self.buckets = buckets(self.max_len)
        self.traces: collections.Counter = collections.Counter()
        self.reset()

    def _call(self, fn, *args):
        with sharding.activate(self.mesh, self.cfg_mesh):
            return fn(*args)

    def reset(self):
        """An empty cache and idle slots (also after a failed step)."""
        # Made on the devices as the steps' outputs are, so the steps see one input kind.
        self.cache, self.state = self._call(self._empty, self.params)

    @functools.partial(jax.jit, static_argnums=0)
    def _empty(self, params):
        S = self.slots
        one = jnp.zeros((S, 1), jnp.int32)
        _, variables = self.model.apply({"params": params}, one, one, one + 1, decode=True,
                                        mutable=["cache"])
        zeros = jnp.zeros(S, jnp.int32)
        state = SlotState(zeros, zeros, zeros, jnp.zeros((S, 2), jnp.uint32),
                          jnp.zeros(S, jnp.float32), zeros, jnp.ones(S, jnp.float32))
        return jax.tree_util.tree_map(jnp.zeros_like, variables["cache"]), state

    # ------------------------------------------------------------------ prefill

    @functools.partial(jax.jit, static_argnums=(0, 4))
    def _prefill(self, params, tokens_1xL, length, with_prompt: bool, temperature, top_k, top_p,
                 key):
        L = tokens_1xL.shape[1]
        self.traces[("prefill", L, with_prompt)] += 1
        positions_1xL = jnp.arange(L)[None]
        valid_1xL = (positions_1xL < length).astype(jnp.int32)
        logits_1xLxV, variables = self.model.apply(
            {"params": params}, tokens_1xL, positions_1xL, valid_1xL, decode=True,
            mutable=["cache"])
        cache = with_cache_index(variables["cache"], length[None])
        logits_LxV = logits_1xLxV[0].astype(jnp.float32)
        last_1xV = jax.lax.dynamic_slice_in_dim(logits_LxV, length - 1, 1)
        first_1 = _next_tokens(last_1xV, jax.random.fold_in(key, 0)[None], temperature[None],
                               top_k[None], top_p[None])
        first = (first_1,) + _scored(last_1xV, first_1, self.max_logprobs)
        # Prompt token j + 1 given the tokens up to j (the last row is padding's).
        prompt = (_scored(logits_LxV, jnp.roll(tokens_1xL[0], -1), self.max_logprobs)
                  if with_prompt else None)
        return cache, first, prompt

    def prefill(self, tokens: list[int], settings: Settings = Settings(),
                prompt_logprobs: bool = False) -> Prefilled:
        """One prompt (token ids, at least one) through the model: its cache row and first
        new token; with prompt_logprobs, each prompt token after the first scored."""
        n = len(tokens)
        if not 0 < n <= self.max_len:
            raise ValueError(f"a prompt of {n} tokens: the engine takes 1 to {self.max_len}")
        length = next(b for b in self.buckets if b >= n)
        padded = np.full((1, length), self.tok.pad_id, np.int32)
        padded[0, :n] = tokens
        key = jax.random.PRNGKey(settings.seed)
        cache, first, prompt = self._call(
            self._prefill, self.params, padded, np.int32(n), prompt_logprobs,
            np.float32(settings.temperature), np.int32(settings.top_k),
            np.float32(settings.top_p), key)
        first = _tokens(*jax.device_get(first))[0]
        if prompt is not None:
            chosen, top_ids, top_lp = jax.device_get(prompt)
            prompt = _tokens(tokens[1:], chosen[:n - 1], top_ids[:n - 1], top_lp[:n - 1])
        return Prefilled(cache, n, first, prompt, settings)

    # ------------------------------------------------------------------ insert

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
    def _insert(self, cache, state: SlotState, row_cache, slot, token, position, key, temperature,
                top_k, top_p):
        self.traces["insert"] += 1

        def put(big, row):  # the row goes in along the axis where the shapes differ (batch)
            axis = next((a for a, (m, r) in enumerate(zip(big.shape, row.shape)) if m != r), None)
            return row if axis is None else jax.lax.dynamic_update_index_in_dim(big, row, slot, axis)

        state = SlotState(state.tokens.at[slot].set(token), state.positions.at[slot].set(position),
                          state.counts.at[slot].set(1), state.keys.at[slot].set(key),
                          state.temperature.at[slot].set(temperature),
                          state.top_k.at[slot].set(top_k), state.top_p.at[slot].set(top_p))
        return jax.tree_util.tree_map(put, cache, row_cache), state

    def insert(self, prefilled: Prefilled, slot: int):
        """The prefilled prompt into `slot` (its row replaced whole: the slot's earlier
        request leaves nothing behind); the next step feeds its first token. The caller keeps
        prompt + fed tokens within max_len (a write past the end lands on the last cell)."""
        s = prefilled.settings
        self.cache, self.state = self._call(
            self._insert, self.cache, self.state, prefilled.cache, np.int32(slot),
            np.int32(prefilled.first.id), np.int32(prefilled.length), jax.random.PRNGKey(s.seed),
            np.float32(s.temperature), np.int32(s.top_k), np.float32(s.top_p))

    # ------------------------------------------------------------------ generate

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(2, 3))
    def _generate(self, params, cache, state: SlotState):
        self.traces["generate"] += 1
        logits_Sx1xV, variables = self.model.apply(
            {"params": params, "cache": cache}, state.tokens[:, None], state.positions[:, None],
            jnp.ones_like(state.tokens)[:, None], decode=True, mutable=["cache"])
        logits_SxV = logits_Sx1xV[:, -1].astype(jnp.float32)
        keys = jax.vmap(jax.random.fold_in)(state.keys, state.counts)
        new_S = _next_tokens(logits_SxV, keys, state.temperature, state.top_k, state.top_p)
        # An idle slot decodes too (fixed shapes); its position stays within the model.
        state = state._replace(tokens=new_S, counts=state.counts + 1,
                               positions=jnp.minimum(state.positions + 1, self.max_len - 1))
        return variables["cache"], state, (new_S,) + _scored(logits_SxV, new_S, self.max_logprobs)

    def generate(self) -> list[Token]:
        """One decode step for every slot: slot i's new token is element i."""
        self.cache, self.state, out = self._call(self._generate, self.params, self.cache, self.state)
        return _tokens(*jax.device_get(out))

    def warm_up(self):
        """Compiles every program a server can need, before it listens."""
        for n in self.buckets:
            for with_prompt in (False, True):
                p = self.prefill([self.tok.eos_id] * n, prompt_logprobs=with_prompt)
        self.insert(p, 0)
        self.generate()
        self.reset()


# ----------------------------------------------------------------------------- batching


class QueueFull(Exception):
    """The batcher's queue holds max_queue requests already."""


class Stopping(Exception):
    """The batcher is stopping: it takes no new requests."""


@dataclasses.dataclass(frozen=True)
class Done:
    reason: str          # "length" (max_tokens), "eos", "cancelled", "stopped" (shutdown)


@dataclasses.dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclasses.dataclass(frozen=True)
class PromptScores:
    tokens: list[Token]  # each prompt token after the first, scored


@dataclasses.dataclass
class Request:
    """What a caller asks of the batcher. `on_event` is called in the batcher's thread with,
    in order: PromptScores (when prompt_logprobs), one Token per new token (EOS too, the
    last), then Done or Failed. Returning False stops the request at once (a stop sequence was found, the
    client left): its slot is free for the next step and no further events come."""
    tokens: list[int]
    max_tokens: int
    on_event: Callable[[Any], bool | None]
    settings: Settings = Settings()
    prompt_logprobs: bool = False
    cancelled: bool = False          # set from any thread: ends at the next step

    def cancel(self):
        self.cancelled = True


class Batcher:
    """Continuous batching over an engine in a background thread (module docstring).

    submit() queues a request (QueueFull beyond max_queue); stop(deadline) stops taking
    new ones, lets running ones finish until the deadline and ends the others with
    Done("stopped")."""

    def __init__(self, engine, max_queue: int = 64, eos_id: int | None = None):
        self.engine, self.max_queue, self.eos_id = engine, max_queue, eos_id
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}
        self.produced: dict[int, int] = {}     # slot -> tokens given to its request
        self._cond = threading.Condition()
        self._stopping = False
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._loop, name="jaxlm-batcher", daemon=True)
        self.steps = 0

    def start(self) -> "Batcher":
        if not self.started:
            self._thread.start()
        return self

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def submit(self, request: Request) -> Request:
        with self._cond:
            if self._stopping:
                raise Stopping("the server is stopping")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue)")
            self.waiting.append(request)
            self._cond.notify()
        return request

    def stop(self, deadline_s: float) -> bool:
        """Stops; True if every running request finished within deadline_s seconds."""
        with self._cond:
            self._stopping, self._deadline = True, time.monotonic() + deadline_s
            for r in self.waiting:
                self._emit(r, Done("stopped"))
            self.waiting.clear()
            self._cond.notify()
        self._thread.join(deadline_s + 60)
        return self.finished_in_time

    finished_in_time = True

    # ------------------------------------------------------------------ the loop

    def _emit(self, request: Request, event) -> bool:
        """Gives the event to the request; False if it wants no more (or failed to take it)."""
        try:
            return request.on_event(event) is not False
        except Exception as e:  # a bug in one consumer ends that request only
            log.exception("serving: a request's consumer failed: %s", e)
            return False

    def _free(self, slot: int, event=None):
        request = self.running.pop(slot)
        self.produced.pop(slot)
        if event is not None:
            self._emit(request, event)

    def _give(self, slot: int, token: Token):
        """The slot's new token to its request; frees the slot when the request is done."""
        request = self.running[slot]
        if request.cancelled:
            return self._free(slot, Done("cancelled"))
        self.produced[slot] += 1
        if not self._emit(request, token):
            return self._free(slot)
        if token.id == self.eos_id:  # given (its log-probability counts), then the end
            self._free(slot, Done("eos"))
        elif self.produced[slot] >= request.max_tokens:
            self._free(slot, Done("length"))

    def _admit(self):
        free = [s for s in range(self.engine.slots) if s not in self.running]
        while free:
            with self._cond:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                self._emit(request, Done("cancelled"))
                continue
            try:
                p = self.engine.prefill(request.tokens, request.settings, request.prompt_logprobs)
            except Exception as e:  # this request's failure (e.g. a bad prompt), not the server's
                log.exception("serving: prefill failed")
                self._emit(request, Failed(e))
                continue
            if p.prompt is not None and not self._emit(request, PromptScores(p.prompt)):
                continue
            if request.max_tokens == 0:
                self._emit(request, Done("length"))
                continue
            slot = free.pop(0)
            self.running[slot], self.produced[slot] = request, 0
            self._give(slot, p.first)
            if slot in self.running:
                self.engine.insert(p, slot)
            else:
                free.insert(0, slot)

    def _step(self):
        try:
            tokens = self.engine.generate()
        except Exception as e:
            log.exception("serving: a decode step failed; its requests fail, the engine resets")
            for slot in list(self.running):
                self._free(slot, Failed(e))
            self.engine.reset()
            return
        self.steps += 1
        for slot in list(self.running):
            self._give(slot, tokens[slot])

    def _loop(self):
        while True:
            with self._cond:
                while not (self.waiting or self.running or self._stopping):
                    self._cond.wait()
                if self._stopping and (not self.running or time.monotonic() > self._deadline):
                    self.finished_in_time = not self.running
                    for slot in list(self.running):
                        self._free(slot, Done("stopped"))
                    return
            self._admit()
            if self.running:
                self._step()
