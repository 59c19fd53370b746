"""Batched log-likelihood of continuations, and greedy/sampled generation with a KV cache.

Both compile once per padded shape: requests are padded to a multiple of `LENGTH_BUCKET`
tokens and a fixed batch size, so an evaluation of thousands of prompts compiles a handful
of programs. Every sequence starts with the EOS token, which the training data puts
before each document.
"""

from __future__ import annotations

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlm import sharding

LENGTH_BUCKET = 32


def _bucket(n: int, limit: int) -> int:
    return min(-(-n // LENGTH_BUCKET) * LENGTH_BUCKET, limit)


class Scorer:
    """Runs a trained GPT for evaluation: `loglikelihood` and `generate`."""

    def __init__(self, model: nn.Module, params, tokenizer, mesh, cfg_mesh, batch_size: int):
        self.model, self.params, self.tok = model, params, tokenizer
        self.mesh, self.cfg_mesh = mesh, cfg_mesh
        self.batch_size = batch_size
        self.max_len = model.cfg.max_len
        self.truncated = 0  # requests whose context was cut on the left to fit max_len
        # Traces per jitted function: one per padded shape, or something recompiles.
        self.traces: collections.Counter = collections.Counter()

    def _run(self, fn, *args):
        """Calls a jitted scoring function on host inputs; returns numpy outputs.

        Inputs go in as global arrays replicated over the mesh and outputs come back
        replicated, so with several processes each one passes the same requests and reads
        the answers from its own devices.
        """
        rep = sharding.replicated(self.mesh)
        args = [jax.make_array_from_process_local_data(rep, np.asarray(a))
                if isinstance(a, (np.ndarray, jax.Array)) else a for a in args]
        with sharding.activate(self.mesh, self.cfg_mesh):
            out = fn(self.params, *args)
        return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), out)

    # ------------------------------------------------------------------ log-likelihood

    @functools.partial(jax.jit, static_argnums=(0,))
    def _score(self, params, inputs_BxL, targets_BxL, weights_BxL):
        self.traces["score"] += 1
        logits_BxLxV = self.model.apply({"params": params}, inputs_BxL)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
        total_B = jnp.sum(logp_BxL * weights_BxL, axis=-1)
        all_greedy_B = jnp.all(greedy_BxL | (weights_BxL == 0), axis=-1)
        return jax.lax.with_sharding_constraint((total_B, all_greedy_B), P())

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): (sum of log p(continuation | context), whether
        greedy decoding would produce exactly the continuation)."""
        encoded = []
        for context, continuation in requests:
            ctx = [self.tok.eos_id] + self.tok.encode(context)
            cont = self.tok.encode(continuation)
            if not cont:
                raise ValueError(f"empty continuation for context {context[-40:]!r}")
            seq = ctx + cont
            if len(seq) > self.max_len + 1:  # keep the end: the continuation and nearest context
                seq = seq[-(self.max_len + 1):]
                self.truncated += 1
            encoded.append((seq, len(cont)))
        out: list[tuple[float, bool]] = [None] * len(encoded)
        # Longest first so each batch pads to a similar length.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            L = _bucket(max(len(encoded[i][0]) - 1 for i in idx), self.max_len)
            inputs = np.zeros((self.batch_size, L), np.int32)
            targets = np.zeros((self.batch_size, L), np.int32)
            weights = np.zeros((self.batch_size, L), np.float32)
            for row, i in enumerate(idx):
                seq, n_cont = encoded[i]
                n = len(seq) - 1
                inputs[row, :n], targets[row, :n] = seq[:-1], seq[1:]
                weights[row, n - n_cont:n] = 1.0
            total, greedy = self._run(self._score, inputs, targets, weights)
            for row, i in enumerate(idx):
                out[i] = (float(total[row]), bool(greedy[row]))
        return out

    # ------------------------------------------------------------------ generation

    @functools.partial(jax.jit, static_argnums=(0, 5))
    def _generate(self, params, prompt_BxP, valid_BxP, rng, max_new: int, temperature):
        """Prefills the KV cache with left-padded prompts, then decodes max_new tokens."""
        self.traces["generate"] += 1
        positions_BxP = jnp.maximum(jnp.cumsum(valid_BxP, axis=1) - 1, 0)
        logits_BxPxV, variables = self.model.apply(
            {"params": params}, prompt_BxP, positions_BxP, valid_BxP.astype(jnp.int32),
            decode=True, mutable=["cache"])

        def pick(logits_BxV, key):
            sampled = jax.random.categorical(key, logits_BxV / jnp.maximum(temperature, 1e-6))
            return jnp.where(temperature > 0, sampled, jnp.argmax(logits_BxV, axis=-1))

        def body(carry, key):
            cache, token_B, pos_B = carry
            logits_Bx1xV, new_vars = self.model.apply(
                {"params": params, "cache": cache}, token_B[:, None], pos_B[:, None],
                jnp.ones_like(token_B)[:, None], decode=True, mutable=["cache"])
            nxt = pick(logits_Bx1xV[:, -1], key)
            return (new_vars["cache"], nxt, pos_B + 1), token_B

        keys = jax.random.split(rng, max_new)
        first_B = pick(logits_BxPxV[:, -1], keys[0])
        # Step i feeds token i and emits it; the carry ends holding the last token.
        (_, last_B, _), tokens_NxB = jax.lax.scan(
            body, (variables["cache"], first_B, positions_BxP[:, -1] + 1), keys[1:])
        return jax.lax.with_sharding_constraint(
            jnp.concatenate([tokens_NxB.T, last_B[:, None]], axis=1), P())

    def generate(self, prompts: list[str], max_new_tokens: int, *, temperature: float = 0.0,
                 seed: int = 0, stop: str | None = None) -> list[str]:
        """Continuations of each prompt (greedy when temperature == 0), cut at `stop`."""
        limit = self.max_len - max_new_tokens
        if limit < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt "
                             f"within model.max_len={self.max_len}")
        results = []
        for b in range(0, len(prompts), self.batch_size):
            chunk = prompts[b:b + self.batch_size]
            encoded = []
            for p in chunk:
                ids = [self.tok.eos_id] + self.tok.encode(p)
                if len(ids) > limit:
                    ids = ids[-limit:]
                    self.truncated += 1
                encoded.append(ids)
            P = _bucket(max(map(len, encoded)), limit)
            prompt = np.full((self.batch_size, P), self.tok.pad_id, np.int32)
            valid = np.zeros((self.batch_size, P), np.int32)
            for row, ids in enumerate(encoded):
                prompt[row, P - len(ids):], valid[row, P - len(ids):] = ids, 1
            valid[len(encoded):, -1] = 1  # filler rows: one valid token keeps softmax finite
            rng = jax.random.PRNGKey(seed + b)
            tokens = self._run(self._generate, prompt, valid, rng, max_new_tokens,
                               np.float32(temperature))
            for row in range(len(chunk)):
                ids = tokens[row].tolist()
                if self.tok.eos_id in ids:  # a document ends at EOS
                    ids = ids[:ids.index(self.tok.eos_id)]
                text = self.tok.decode([t for t in ids if t < self.tok.vocab_size])
                if stop is not None and stop in text:
                    text = text[:text.index(stop)]
                results.append(text)
        return results
