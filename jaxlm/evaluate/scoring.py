"""Log-likelihoods of text under a decoder model, computed as lm-evaluation-harness computes
them, batched so that the numbers do not depend on the batching.

Encoding (`encode_pair`, lm-eval's rule): spaces at the end of the context move to the
start of the continuation; `context + continuation` is encoded once and split after the
tokens of the context alone, so a token spanning the boundary belongs to the
continuation. Every sequence starts with the prefix token (config.evaluate.prefix: EOS,
or nothing); an empty context is the EOS token alone. Sequences longer than
model.max_len + 1 keep their end (the continuation and the nearest context; counted in
`truncated`).

Scoring: requests are sorted longest first, padded on the right to a multiple of
`LENGTH_BUCKET` tokens and to `batch_size` rows. Padding sits after the last real token,
and a causal model's outputs at real positions never see it, so a request's score is the
same in any batch and with any padding (tests/test_fewshot.py checks it against one
request at a time). One compiled program per padded length.
"""

from __future__ import annotations

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlm.inference.generate import Generator, Sampling, bucket, run_replicated

LENGTH_BUCKET = 32  # the same as generation's


def _weighted_scores(logits_BxLxV, targets_BxL, weights_BxL):
    """Per row: the summed log-probability of the targets where the weight is 1, and
    whether every one of them is the most likely token; replicated over the mesh."""
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
    total_B = jnp.sum(logp_BxL * weights_BxL, axis=-1)
    all_greedy_B = jnp.all(greedy_BxL | (weights_BxL == 0), axis=-1)
    return jax.lax.with_sharding_constraint((total_B, all_greedy_B), P())


def uses_prefix(setting: str, tokenizer) -> bool:
    """config.evaluate.prefix -> whether requests start with EOS."""
    if setting == "auto":
        return tokenizer.name != "gpt2"
    return setting == "eos"


class Scorer:
    """`loglikelihood`, `loglikelihood_rolling` and `generate` for a trained GPT."""

    def __init__(self, model: nn.Module, params, tokenizer, mesh, cfg_mesh, batch_size: int,
                 prefix_eos: bool = True):
        self.model, self.params, self.tok = model, params, tokenizer
        self.mesh, self.cfg_mesh, self.batch_size = mesh, cfg_mesh, batch_size
        self.prefix = [tokenizer.eos_id] if prefix_eos else []
        self.max_len = model.cfg.max_len
        self.generator = Generator(model, params, tokenizer, mesh, cfg_mesh, batch_size, prefix_eos)
        self._truncated = 0  # scoring requests cut on the left to fit max_len
        self.traces: collections.Counter = collections.Counter()  # one per compiled shape

    @property
    def truncated(self) -> int:
        """Requests (scored or generated) whose context was cut on the left to fit."""
        return self._truncated + self.generator.truncated

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        return self.prefix + self.tok.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens), as lm-eval splits them."""
        if context == "":
            cont = self.tok.encode(continuation)
            return [self.tok.eos_id], cont
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ log-likelihood

    @functools.partial(jax.jit, static_argnums=(0,))
    def _score(self, params, inputs_BxL, targets_BxL, weights_BxL):
        self.traces["score"] += 1
        return _weighted_scores(self.model.apply({"params": params}, inputs_BxL),
                                targets_BxL, weights_BxL)

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context tokens, continuation tokens): the summed log-probability of the
        continuation, and whether greedy decoding produces exactly it."""
        encoded = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError(f"a request with an empty continuation (context ends "
                                 f"{self.tok.decode(ctx[-20:])!r})")
            seq = list(ctx) + list(cont)
            if len(seq) > self.max_len + 1:  # keep the end: continuation and nearest context
                seq = seq[-(self.max_len + 1):]
                self._truncated += 1
            encoded.append((seq, len(cont)))
        out: list[tuple[float, bool]] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            L = bucket(max(len(encoded[i][0]) - 1 for i in idx), self.max_len)
            inputs = np.zeros((self.batch_size, L), np.int32)
            targets = np.zeros((self.batch_size, L), np.int32)
            weights = np.zeros((self.batch_size, L), np.float32)
            for row, i in enumerate(idx):
                seq, n_cont = encoded[i]
                n = len(seq) - 1
                inputs[row, :n], targets[row, :n] = seq[:-1], seq[1:]
                weights[row, n - min(n_cont, n):n] = 1.0
            total, greedy = run_replicated(self.mesh, self.cfg_mesh, self._score, self.params,
                                           inputs, targets, weights)
            for row, i in enumerate(idx):
                out[i] = (float(total[row]), bool(greedy[row]))
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): (log p(continuation | context), is greedy)."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests])

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """A document's tokens as disjoint scoring windows of at most max_len predictions
        each (lm-eval's loglikelihood_rolling): the first window predicts the first tokens
        from the EOS token; each later one predicts the next tokens from as much preceding
        text as fits."""
        windows, done, L = [], 0, self.max_len
        while done < len(tokens):
            n = min(L, len(tokens) - done)
            targets = tokens[done:done + n]
            context = tokens[:done][-(L + 1 - n):] if done else [self.tok.eos_id]
            windows.append((context, targets))
            done += n
        return windows

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """The log-likelihood of each whole text (document perplexity), from sliding
        windows of the model's context; no prefix is scored."""
        pairs, owner = [], []
        for i, text in enumerate(texts):
            for w in self.rolling_windows(self.tok.encode(text)):
                pairs.append(w)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.score_tokens(pairs)):
            totals[i] += ll
        return totals

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[str], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop=()) -> list[str]:
        """Continuations of each prompt (jaxlm.inference.generate), cut at the stops."""
        return self.generator.generate(prompts, max_new_tokens,
                                       Sampling(temperature, top_k, top_p), seed, stop)


class PseudoLikelihoodScorer(Scorer):
    """`loglikelihood` for a masked LM (BERT): the pseudo-log-likelihood of the continuation
    (Salazar et al. 2020), the sum over its tokens of log p(token | the sequence with that
    token alone replaced by [MASK]). A request is `[CLS] context continuation [SEP]` (the
    split as lm-eval's, so both families score the same tokens); each continuation token
    is one row, and rows of many requests share a forward pass (padding is segment 0,
    which no position attends to). "Greedy" means every masked token is the model's top
    prediction. Long requests keep their end."""

    def __init__(self, model, params, tokenizer, mesh, cfg_mesh, batch_size: int):
        super().__init__(model, params, tokenizer, mesh, cfg_mesh, batch_size, prefix_eos=False)
        ids = tokenizer.bert_ids
        self.cls_id, self.sep_id, self.mask_id = ids["cls"], ids["sep"], ids["mask"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            return [], self.tok.encode(continuation)
        return super().encode_pair(context, continuation)

    @functools.partial(jax.jit, static_argnums=(0,))
    def _score_masked(self, params, inputs_BxL, segments_BxL, targets_BxL, weights_BxL):
        self.traces["score"] += 1
        return _weighted_scores(self.model.apply({"params": params}, inputs_BxL, None, segments_BxL),
                                targets_BxL, weights_BxL)

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows = []  # (request, sequence, masked position)
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("a request with an empty continuation")
            body = list(ctx) + list(cont)
            if len(body) > self.max_len - 2:  # keep the end: continuation and nearest context
                body = body[-(self.max_len - 2):]
                self._truncated += 1
            seq = [self.cls_id] + body + [self.sep_id]
            first = len(seq) - 1 - min(len(cont), len(body))
            rows += [(i, seq, p) for p in range(first, len(seq) - 1)]
        totals, greedy = [0.0] * len(pairs), [True] * len(pairs)
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            L = bucket(max(len(rows[r][1]) for r in idx), self.max_len)
            inputs = np.zeros((self.batch_size, L), np.int32)
            segments = np.zeros((self.batch_size, L), np.int32)
            targets = np.zeros((self.batch_size, L), np.int32)
            weights = np.zeros((self.batch_size, L), np.float32)
            segments[:, 0] = 1  # filler rows: one real token keeps attention finite
            for row, r in enumerate(idx):
                _, seq, p = rows[r]
                inputs[row, :len(seq)], segments[row, :len(seq)] = seq, 1
                inputs[row, p], targets[row, p], weights[row, p] = self.mask_id, seq[p], 1.0
            total, ok = run_replicated(self.mesh, self.cfg_mesh, self._score_masked, self.params,
                                       inputs, segments, targets, weights)
            for row, r in enumerate(idx):
                i = rows[r][0]
                totals[i] += float(total[row])
                greedy[i] &= bool(ok[row])
        return list(zip(totals, greedy))

    def loglikelihood_rolling(self, texts):
        raise NotImplementedError("document perplexity is not defined for a masked LM")

    def generate(self, *args, **kwargs):
        raise NotImplementedError("a masked LM does not generate text")


def make_scorer(setup, params, cfg_evaluate) -> Scorer:
    """The scorer of the model family: log-likelihoods for a causal LM (GPT), pseudo-log-
    likelihoods through the masked-LM head for an encoder (BERT)."""
    e, mesh = cfg_evaluate, setup.cfg.mesh
    if not setup.family.causal:
        return PseudoLikelihoodScorer(setup.model, params, setup.tokenizer, setup.mesh, mesh,
                                      e.batch_size)
    return Scorer(setup.model, params, setup.tokenizer, setup.mesh, mesh, e.batch_size,
                  uses_prefix(e.prefix, setup.tokenizer))
