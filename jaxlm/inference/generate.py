"""Text generation with a KV cache.

    gen = Generator(model, params, tokenizer, mesh, config.mesh, batch_size=8)
    gen.generate(["Once upon a time"], max_new_tokens=64,
                 sampling=Sampling(temperature=0.8, top_k=40, top_p=0.95), stop=("\n\n",))

One compiled program per (padded prompt length, max_new_tokens): prompts are left-padded
to a multiple of `LENGTH_BUCKET` and batches to `batch_size` rows, and the sampling
settings are traced values, so changing them compiles nothing. A step:

  prefill   the prompts (left padding is segment 0: no token attends to it) fill the
            cache and give the first token's logits;
  decode    max_new_tokens - 1 one-token steps against the cache (jax.lax.scan).

The token after logits l is greedy (argmax) when temperature == 0; otherwise a draw from
softmax(l / temperature) restricted to the top_k most likely tokens (0: all) and to the
smallest set whose probability reaches top_p (1: all). Text ends at the tokenizer's EOS
(a document boundary) and at the earliest of the stop sequences.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlm import sharding

LENGTH_BUCKET = 32


def bucket(n: int, limit: int) -> int:
    """n rounded up to a multiple of LENGTH_BUCKET, at most `limit`."""
    return min(-(-n // LENGTH_BUCKET) * LENGTH_BUCKET, limit)


def run_replicated(mesh, cfg_mesh, fn, params, *args):
    """Calls a jitted `fn(params, *args)` on host inputs; returns numpy outputs.

    Inputs go in as global arrays replicated over the mesh and outputs come back
    replicated, so with several processes each one passes the same inputs and reads the
    answers from its own devices."""
    rep = sharding.replicated(mesh)
    args = [jax.make_array_from_process_local_data(rep, np.asarray(a))
            if isinstance(a, (np.ndarray, jax.Array)) else a for a in args]
    with sharding.activate(mesh, cfg_mesh):
        out = fn(params, *args)
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), out)


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: no limit
    top_p: float = 1.0        # 1: no limit

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling settings out of range: {self}")


def next_token(logits_BxV: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """The next token of each row under the sampling settings (module docstring)."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    V = logits_BxV.shape[-1]
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]            # most likely first
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth_B = sorted_BxV[:, k - 1]
    scaled_BxV = sorted_BxV / jnp.maximum(temperature, 1e-6)
    probs_BxV = jax.nn.softmax(scaled_BxV, axis=-1)
    # Keep a token if the tokens more likely than it have not yet reached top_p.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = ((before_BxV < top_p) | (top_p >= 1)) & (jnp.arange(V) < k)
    floor_B = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1)
    floor_B = jnp.maximum(floor_B, kth_B)
    masked_BxV = jnp.where(logits_BxV >= floor_B[:, None], logits_BxV, -jnp.inf)
    sampled_B = jax.random.categorical(key, masked_BxV / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1))


def cut_at_stops(text: str, stop) -> str:
    """`text` up to the earliest occurrence of any stop sequence."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text


class Generator:
    """Decodes continuations of text prompts with a decoder model (GPT)."""

    def __init__(self, model: nn.Module, params, tokenizer, mesh, cfg_mesh, batch_size: int,
                 prefix_eos: bool = True):
        self.model, self.params, self.tok = model, params, tokenizer
        self.mesh, self.cfg_mesh, self.batch_size = mesh, cfg_mesh, batch_size
        self.prefix = [tokenizer.eos_id] if prefix_eos else []
        # Prompt + new tokens must fit the KV cache (config.model.cache_len, else max_len).
        self.max_len = min(model.cfg.get("cache_len") or model.cfg.max_len, model.cfg.max_len)
        self.truncated = 0  # prompts cut on the left to leave room for the new tokens
        self.traces: collections.Counter = collections.Counter()  # one per compiled shape

    @functools.partial(jax.jit, static_argnums=(0, 5))
    def _decode(self, params, prompt_BxP, valid_BxP, rng, max_new: int, temperature, top_k, top_p):
        self.traces["generate"] += 1
        positions_BxP = jnp.maximum(jnp.cumsum(valid_BxP, axis=1) - 1, 0)
        logits_BxPxV, variables = self.model.apply(
            {"params": params}, prompt_BxP, positions_BxP, valid_BxP.astype(jnp.int32),
            decode=True, mutable=["cache"])

        def pick(logits_BxV, key):  # greedy skips the sampling path (a sort of the vocabulary)
            return jax.lax.cond(
                temperature > 0, lambda: next_token(logits_BxV, key, temperature, top_k, top_p),
                lambda: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32))

        def step(carry, key):
            cache, token_B, pos_B = carry
            logits_Bx1xV, new_vars = self.model.apply(
                {"params": params, "cache": cache}, token_B[:, None], pos_B[:, None],
                jnp.ones_like(token_B)[:, None], decode=True, mutable=["cache"])
            return (new_vars["cache"], pick(logits_Bx1xV[:, -1], key), pos_B + 1), token_B

        keys = jax.random.split(rng, max_new)
        first_B = pick(logits_BxPxV[:, -1], keys[0])
        # Step i feeds token i and emits it; the carry ends holding the last token.
        (_, last_B, _), tokens_NxB = jax.lax.scan(
            step, (variables["cache"], first_B, positions_BxP[:, -1] + 1), keys[1:])
        return jax.lax.with_sharding_constraint(
            jnp.concatenate([tokens_NxB.T, last_B[:, None]], axis=1), P())

    def generate_tokens(self, prompts: list[list[int]], max_new_tokens: int,
                        sampling: Sampling = Sampling(), seed: int = 0) -> list[list[int]]:
        """max_new_tokens new token ids for each prompt (token ids, prefix included)."""
        limit = self.max_len - max_new_tokens
        if limit < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt "
                             f"within the {self.max_len} slots of the KV cache "
                             "(config.model.cache_len, else max_len)")
        out = []
        for b in range(0, len(prompts), self.batch_size):
            chunk = []
            for ids in prompts[b:b + self.batch_size]:
                if len(ids) > limit:
                    ids = ids[-limit:]
                    self.truncated += 1
                chunk.append(ids)
            length = bucket(max(map(len, chunk)), limit)
            prompt = np.full((self.batch_size, length), self.tok.pad_id, np.int32)
            valid = np.zeros((self.batch_size, length), np.int32)
            for row, ids in enumerate(chunk):
                prompt[row, length - len(ids):], valid[row, length - len(ids):] = ids, 1
            valid[len(chunk):, -1] = 1  # filler rows: one valid token keeps softmax finite
            tokens = run_replicated(self.mesh, self.cfg_mesh, self._decode, self.params, prompt,
                                    valid, jax.random.PRNGKey(seed + b), max_new_tokens,
                                    np.float32(sampling.temperature), np.int32(sampling.top_k),
                                    np.float32(sampling.top_p))
            out += [tokens[row].tolist() for row in range(len(chunk))]
        return out

    def generate(self, prompts: list[str], max_new_tokens: int, sampling: Sampling = Sampling(),
                 seed: int = 0, stop=()) -> list[str]:
        """The continuation of each prompt, ended at EOS and at the earliest stop sequence."""
        # An empty prompt without the EOS prefix still needs one token: EOS, as lm-eval does.
        encoded = [self.prefix + self.tok.encode(p) or [self.tok.eos_id] for p in prompts]
        texts = []
        for ids in self.generate_tokens(encoded, max_new_tokens, sampling, seed):
            if self.tok.eos_id in ids:  # a document ends at EOS
                ids = ids[:ids.index(self.tok.eos_id)]
            texts.append(cut_at_stops(self.tok.decode([t for t in ids if t < self.tok.vocab_size]),
                                      stop))
        return texts
