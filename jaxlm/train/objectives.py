"""Objectives: what a model learns from the examples the data sources give.

A source (jaxlm.data.sources) hands out examples as windows of token ids: `tokens`, of
length L + `extra_tokens`, and for packed data `segments` (document ids from 1, 0 =
padding) and `positions` for the window's first L tokens. An objective

  - turns an example into the model's inputs and the loss's targets and weights
    (`example(window, index)`, numpy, on the host: it runs in the data thread, and anything
    random in it is drawn from the run seed and the example's global index, so resuming
    stays exact on any number of hosts);
  - declares the batch that results (`batch_spec`: keys, shapes, dtypes), the one
    description shared by the data pipeline, jaxlm.plan and the tests;
  - computes a batch's summed loss, its summed weight and summed metrics (`loss`, inside
    the jitted step). Sums, not means, so that microbatches and devices add up exactly; the
    step divides by the total weight (`metrics` names what it reports besides the loss).
    `aux` holds the step's auxiliary inputs, e.g. a distillation teacher's params: jit
    arguments that are not trained. An objective that reads them declares their shapes in
    `aux_spec` (a tree of jax.ShapeDtypeStruct), and the step refuses inputs that differ.

Objectives, by `config.train.objective`:
  causal_lm       next-token prediction (GPT): inputs tokens[:L], targets tokens[1:L+1]
                  (the window carries one extra token), weight 1 wherever the input is
                  not padding.
  masked_lm       masked-token prediction (BERT): the window in BERT's format ([CLS] first,
                  [SEP] between documents), then 15% of the real tokens, never a special
                  or padding one, are chosen (whole words with `whole_word`); of those 80%
                  become [MASK], 10% a random token and 10% stay; the loss and accuracy
                  count the chosen positions only. With `sentence_pairs` the window is
                  [CLS] A [SEP] B [SEP], cut at a random point, with token types 0 on
                  [CLS] A [SEP] and 1 on B [SEP]; with `next_sentence` as well, half the
                  B's are replaced by the same stretch of another example and the pooled
                  [CLS] learns to tell (next-sentence prediction, BERT's second task).
  classification  a label per sequence (fine-tuning): examples carry `tokens`, `types`,
                  `segments` and `label`; the loss is the cross-entropy of the class logits
                  (with config.model.num_classes = 1: `Regression`, the squared error of
                  one score, e.g. GLUE's STS-B).
  span_extraction an answer span per window (SQuAD fine-tuning, BERT's span head):
                  examples carry `tokens`, `types`, `segments` and the answer's first and
                  last position `start`, `end` (0, [CLS]: no answer in this window); the
                  loss is the mean of the start and end cross-entropies over positions.
  distill         the model's own objective (causal_lm, or classification with a class
                  head) taught by a frozen teacher as well (`Distill`, config.distill).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import models
from jaxlm.errors import ConfigError

# Seed-sequence tags of the masking and sentence-pair draws (data streams use 1 and 2,
# jaxlm.data.sources).
_MASK_STREAM, _PAIR_STREAM = 3, 4

# Next-sentence prediction draws B from an example at most this far ahead of A's: source
# windows that near in the (permuted) order are random windows of the corpus, and the
# source's cached epoch permutation or mixture block still holds them.
_PARTNER_RANGE = 1024


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights), both fp32 scalars."""
    nll_BxL = token_nll(logits_BxLxV, targets_BxL)
    return jnp.sum(nll_BxL * weights_BxL), jnp.sum(weights_BxL)


@jax.custom_vjp
def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position, in fp32: logsumexp minus the target's
    logit. Its gradient, softmax - one_hot(target), is formed from the logits in the
    backward pass, so the step keeps one [B, L, V] array (the logits) for it, where
    autodiff of log_softmax keeps a second one (logits minus their max, fp32): 0.4 GB a
    sequence at GPT-2's vocabulary and 2048 tokens (BENCHMARKS.md, fit table)."""
    return _nll_forward(logits_BxLxV, targets_BxL)[0]


def _nll_forward(logits_BxLxV, targets_BxL):
    lse_BxL = jax.nn.logsumexp(logits_BxLxV.astype(jnp.float32), axis=-1)
    # The target's logit is picked before widening it: picked from the fp32 copy, XLA
    # writes that whole copy out (a [B, L, V] fp32 array) for the gather to read.
    picked_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    picked_BxL = picked_BxL.astype(jnp.float32)
    return lse_BxL - picked_BxL, (logits_BxLxV, targets_BxL, lse_BxL)


def _nll_backward(saved, g_BxL):
    logits_BxLxV, targets_BxL, lse_BxL = saved
    p_BxLxV = jnp.exp(logits_BxLxV.astype(jnp.float32) - lse_BxL[..., None])
    hit_BxLxV = (jax.lax.broadcasted_iota(jnp.int32, p_BxLxV.shape, p_BxLxV.ndim - 1)
                 == targets_BxL[..., None])
    grad = (p_BxLxV - hit_BxLxV.astype(jnp.float32)) * g_BxL[..., None]
    return grad.astype(logits_BxLxV.dtype), None


token_nll.defvjp(_nll_forward, _nll_backward)


def _correct(logits, targets, weights) -> jax.Array:
    """Weighted count of positions whose most likely output is the target."""
    return jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)


def _apply(model, params, batch: dict, rng, deterministic: bool, output):
    return model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                       batch.get("segments"), batch.get("types"), deterministic=deterministic,
                       rngs={"dropout": rng}, output=output)


def _token_loss(self, model, params, batch: dict, rng: jax.Array, *, deterministic: bool,
                aux=None):
    """(summed cross-entropy of the weighted token targets, (their weight, {accuracy}))."""
    logits = _apply(model, params, batch, rng, deterministic, "logits")
    total, weight = cross_entropy(logits, batch["targets"], batch["weights"])
    return total, (weight, {"accuracy": _correct(logits, batch["targets"], batch["weights"])})


def chunked_token_loss(hidden_BxLxD, logits_of, targets_BxL, weights_BxL, chunk: int):
    """`_token_loss`'s sums with logits made `chunk` positions at a time by
    `logits_of(hidden_BxCxD) -> logits_BxCxV` (the model's head): each chunk's
    [B, chunk, V] logits are recomputed in the backward pass (jax.checkpoint) instead of
    stored, so peak memory holds one chunk's logits, not the whole batch's."""
    B, L, D = hidden_BxLxD.shape
    n = L // chunk
    split = lambda x: jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def sums(h_BxCxD, t_BxC, w_BxC):
        logits_BxCxV = logits_of(h_BxCxD)
        total, weight = cross_entropy(logits_BxCxV, t_BxC, w_BxC)
        return total, weight, _correct(logits_BxCxV, t_BxC, w_BxC)

    def body(carry, chunk_args):
        return jax.tree_util.tree_map(jnp.add, carry, sums(*chunk_args)), None

    zero = jnp.zeros((), jnp.float32)
    (total, weight, correct), _ = jax.lax.scan(
        body, (zero, zero, zero), (split(hidden_BxLxD), split(targets_BxL), split(weights_BxL)))
    return total, weight, correct


class CausalLM:
    """Next-token prediction (GPT). Packed windows keep their segments and positions, so
    attention stays inside each document; unpacked batches carry neither (the model
    attends causally over the whole window from position 0). With `loss_chunk` the
    cross-entropy is computed that many positions at a time (chunked_token_loss)."""

    name = "causal_lm"
    extra_tokens = 1  # the last target
    tokens_loss = True  # the loss is a mean over tokens: exp(loss) is a perplexity
    metrics = ("accuracy",)

    def __init__(self, seq_len: int, packed: bool, loss_chunk: int = 0):
        if loss_chunk and seq_len % loss_chunk:
            raise ConfigError(f"config.train.loss_chunk={loss_chunk} does not divide "
                              f"config.data.seq_len={seq_len}")
        self.seq_len, self.packed = seq_len, packed
        self.loss_chunk = loss_chunk if loss_chunk and loss_chunk < seq_len else 0

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return _token_spec(batch_size, self.seq_len, self.packed)

    def example(self, window: dict, index: int = 0, read=None) -> dict:
        L, tokens = self.seq_len, window["tokens"]
        segments = window.get("segments")
        out = {"inputs": tokens[:L], "targets": tokens[1:L + 1],
               "weights": (np.ones(L, np.float32) if segments is None
                           else (segments != 0).astype(np.float32))}
        return _with_packing(out, window, self.packed, L)

    def loss(self, model, params, batch: dict, rng: jax.Array, *, deterministic: bool,
             aux=None):
        if not self.loss_chunk:
            return _token_loss(self, model, params, batch, rng, deterministic=deterministic)
        hidden = _apply(model, params, batch, rng, deterministic, "hidden")
        # The head through the model (tied embedding or lm_head), not its weight read here:
        # its matmul then runs in the module that owns the weight, where a transform
        # (quantization, LoRA) sees it.
        logits_of = lambda h: model.apply({"params": params}, None, hidden_BxLxD=h)  # noqa: E731
        total, weight, correct = chunked_token_loss(hidden, logits_of, batch["targets"],
                                                    batch["weights"], self.loss_chunk)
        return total, (weight, {"accuracy": correct})


class MaskedLM:
    """Masked-token prediction (BERT), with dynamic masking: example i of the run is masked
    (and, with sentence pairs, cut and paired) the same way whenever and wherever it is read
    (seed, i), and differently in every epoch."""

    name = "masked_lm"
    extra_tokens = 0
    tokens_loss = True

    def __init__(self, seq_len: int, packed: bool, tokenizer, seed: int,
                 mask_prob: float = 0.15, whole_word: bool = False,
                 sentence_pairs: bool = False, next_sentence: bool = False):
        missing = {"cls", "sep", "mask"} - set(tokenizer.bert_ids)
        if missing:
            raise ConfigError(f"config.data.tokenizer={tokenizer.name!r} has no "
                              f"{', '.join(sorted(missing))} token: BERT needs [CLS], [SEP] and "
                              "[MASK] (use 'byte:bert', or a SentencePiece model trained by "
                              "python -m jaxlm.data.tokenizers train)")
        if next_sentence and not sentence_pairs:
            raise ConfigError("config.train.next_sentence=True needs "
                              "config.train.sentence_pairs=True (the task is about pairs)")
        if sentence_pairs and packed:
            raise ConfigError("config.train.sentence_pairs=True needs config.data.packing=False: "
                              "a pair is cut from one window of the token stream, and packing "
                              "keeps the documents of a window from attending to each other")
        if sentence_pairs and seq_len < 8:
            raise ConfigError(f"config.data.seq_len={seq_len}: sentence pairs need at least 8 "
                              "tokens ([CLS] A [SEP] B [SEP])")
        self.seq_len, self.packed, self.seed = seq_len, packed, seed
        self.mask_prob, self.whole_word = mask_prob, whole_word
        self.sentence_pairs, self.next_sentence = sentence_pairs, next_sentence
        self.metrics = ("accuracy",) + (("next_sentence_loss", "next_sentence_accuracy")
                                        if next_sentence else ())
        self.mask_id = tokenizer.bert_ids["mask"]
        self.cls_id, self.sep_id, self.eos_id = (tokenizer.bert_ids["cls"],
                                                 tokenizer.bert_ids["sep"], tokenizer.eos_id)
        self.special = np.asarray(sorted(tokenizer.special_ids), np.int64)
        self.replacements = np.setdiff1d(np.arange(tokenizer.vocab_size), self.special)
        if whole_word:  # a token starts a word after whitespace or a special token
            pieces = tokenizer.piece_texts()
            self.starts_with_space = np.asarray([p[:1].isspace() for p in pieces])
            self.ends_with_space = np.asarray([p == "" or p[-1:].isspace() for p in pieces])

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        spec = _token_spec(batch_size, self.seq_len, self.packed)
        if self.sentence_pairs:
            spec["types"] = jax.ShapeDtypeStruct((batch_size, self.seq_len), jnp.int32)
        if self.next_sentence:
            spec["next_sentence"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        return spec

    def _words(self, tokens: np.ndarray) -> np.ndarray:
        """Word number of every token (whole-word masking)."""
        start = self.starts_with_space[tokens].copy()
        start[1:] |= self.ends_with_space[tokens[:-1]]
        start[0] = True
        return np.cumsum(start)

    def _pair(self, tokens: np.ndarray, index: int, read) -> tuple[np.ndarray, np.ndarray, int]:
        """[CLS] A [SEP] B [SEP] from the window's body (tokens 1..L-3), token types, and the
        next-sentence label (0: B follows A in the stream, 1: B is from another example)."""
        L = self.seq_len
        rng = np.random.default_rng([self.seed, _PAIR_STREAM, index])
        partner = index + 1 + int(rng.integers(_PARTNER_RANGE))
        body = tokens[1:L - 2]
        cut = int(rng.integers(1, L - 3))  # A = body[:cut], B = body[cut:], both non-empty
        label = int(self.next_sentence and rng.random() < 0.5)
        b = body[cut:]
        if label:
            if read is None:
                raise ValueError("next-sentence prediction reads a second example: pass the "
                                 "source's example function as `read`")
            other = np.array(read(partner)["tokens"][:L])
            other[other == self.eos_id] = self.sep_id
            b = other[1:L - 2][cut:]
        out = np.concatenate([[self.cls_id], body[:cut], [self.sep_id], b, [self.sep_id]])
        types = np.zeros(L, np.int32)
        types[cut + 2:] = 1
        return out.astype(tokens.dtype), types, label

    def example(self, window: dict, index: int = 0, read=None) -> dict:
        """`read(i)`: the source's example i (next-sentence prediction takes B from one)."""
        # BERT's input format: [CLS] first, [SEP] where the stream separates documents
        # (EOS), so that pretraining sees what fine-tuning inputs look like.
        L, tokens = self.seq_len, np.array(window["tokens"][:self.seq_len])
        tokens[tokens == self.eos_id] = self.sep_id
        tokens[0] = self.cls_id
        extra = {}
        if self.sentence_pairs:
            tokens, extra["types"], label = self._pair(tokens, index, read)
            if self.next_sentence:
                extra["next_sentence"] = np.int32(label)
        segments = window.get("segments")
        real = ~np.isin(tokens, self.special)
        if segments is not None:
            real &= segments != 0
        candidates = np.flatnonzero(real)
        rng = np.random.default_rng([self.seed, _MASK_STREAM, index])
        count = int(round(self.mask_prob * len(candidates)))
        if self.whole_word and count:
            words = self._words(tokens)[candidates]
            chosen, total = [], 0
            for w in rng.permutation(np.unique(words)):
                members = candidates[words == w]
                if total + len(members) > count and total:
                    continue  # the word would overshoot: try a shorter one
                chosen.append(members)
                total += len(members)
                if total >= count:
                    break
            chosen = np.sort(np.concatenate(chosen))
        else:
            chosen = np.sort(rng.choice(candidates, count, replace=False))
        inputs = tokens.copy()
        draw = rng.random(len(chosen))
        inputs[chosen[draw < 0.8]] = self.mask_id
        swap = chosen[(draw >= 0.8) & (draw < 0.9)]
        inputs[swap] = rng.choice(self.replacements, len(swap))
        weights = np.zeros(L, np.float32)
        weights[chosen] = 1.0
        out = {"inputs": inputs.astype(np.int32), "targets": tokens.astype(np.int32),
               "weights": weights, **extra}
        return _with_packing(out, window, self.packed, L)

    def loss(self, model, params, batch: dict, rng: jax.Array, *, deterministic: bool,
             aux=None):
        """Masked-LM sums; with next-sentence prediction, plus each example's NSP loss
        weighted by its number of masked tokens, so that after the step divides by the
        masked-token total the loss is mean MLM + (weighted) mean NSP, exactly additive
        over microbatches and devices."""
        if not self.next_sentence:
            return _token_loss(self, model, params, batch, rng, deterministic=deterministic)
        logits, nsp_Bx2 = _apply(model, params, batch, rng, deterministic,
                                 ("logits", "next_sentence"))
        total, weight = cross_entropy(logits, batch["targets"], batch["weights"])
        per_example_B = jnp.sum(batch["weights"], axis=-1)
        nsp_total, _ = cross_entropy(nsp_Bx2, batch["next_sentence"], per_example_B)
        return total + nsp_total, (weight, {
            "accuracy": _correct(logits, batch["targets"], batch["weights"]),
            "next_sentence_loss": nsp_total,
            "next_sentence_accuracy": _correct(nsp_Bx2, batch["next_sentence"], per_example_B)})


class Classification:
    """One label per sequence. Examples hold `tokens` [L] ([CLS] a [SEP] (b [SEP]) for BERT),
    `types` (sentence A = 0, B = 1), `segments` (1 on the text, 0 on padding) and `label`."""

    name = "classification"
    tokens_loss = False  # exp(loss) of a class, span or regression loss is no perplexity
    extra_tokens = 0
    metrics = ("accuracy",)

    def __init__(self, seq_len: int, num_classes: int):
        if num_classes < 2:
            raise ConfigError(f"config.model.num_classes={num_classes}: classification needs "
                              "at least 2 classes")
        self.seq_len, self.num_classes = seq_len, num_classes

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        row, one = (batch_size, self.seq_len), (batch_size,)
        return {"inputs": jax.ShapeDtypeStruct(row, jnp.int32),
                "types": jax.ShapeDtypeStruct(row, jnp.int32),
                "segments": jax.ShapeDtypeStruct(row, jnp.int32),
                "labels": jax.ShapeDtypeStruct(one, jnp.int32),
                "weights": jax.ShapeDtypeStruct(one, jnp.float32)}

    def example(self, record: dict, index: int = 0, read=None) -> dict:
        return {"inputs": record["tokens"].astype(np.int32),
                "types": record["types"].astype(np.int32),
                "segments": record["segments"].astype(np.int32),
                "labels": np.int32(record["label"]), "weights": np.float32(1.0)}

    def loss(self, model, params, batch: dict, rng: jax.Array, *, deterministic: bool,
             aux=None):
        logits_BxC = _apply(model, params, batch, rng, deterministic, "classes")
        total, weight = cross_entropy(logits_BxC, batch["labels"], batch["weights"])
        return total, (weight, {"accuracy": _correct(logits_BxC, batch["labels"], batch["weights"])})


class Regression:
    """One real-valued target per sequence (GLUE's STS-B): a single-output head
    (config.model.num_classes = 1) trained by squared error. Examples as Classification's,
    the `label` a float; logged beside the loss: the mean absolute error."""

    name = "regression"  # config.train.objective=classification with a one-output head
    tokens_loss = False
    extra_tokens = 0
    metrics = ("abs_error",)

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        spec = Classification.batch_spec(self, batch_size)
        spec["labels"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
        return spec

    def example(self, record: dict, index: int = 0, read=None) -> dict:
        out = Classification.example(self, record, index, read)
        out["labels"] = np.float32(record["label"])
        return out

    def loss(self, model, params, batch: dict, rng: jax.Array, *, deterministic: bool,
             aux=None):
        scores_B = _apply(model, params, batch, rng, deterministic, "classes")[:, 0]
        error_B = scores_B.astype(jnp.float32) - batch["labels"]
        w_B = batch["weights"]
        return jnp.sum(error_B ** 2 * w_B), (jnp.sum(w_B), {"abs_error": jnp.sum(jnp.abs(error_B) * w_B)})


class SpanExtraction:
    """An answer span per window (SQuAD; jaxlm.data.squad makes the windows): the span
    head's start and end logits [B, L] each, padding positions (segment 0) masked out,
    trained by (CE(start) + CE(end)) / 2 per window. Position 0 ([CLS]) is the label of a
    window that holds no whole answer. Logged: `exact_span`, the share of windows whose
    argmax start and end both hit the labels."""

    name = "span_extraction"
    tokens_loss = False
    extra_tokens = 0
    metrics = ("exact_span",)

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        spec = Classification.batch_spec(self, batch_size)
        del spec["labels"]
        one = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        return {**spec, "starts": one, "ends": one}

    def example(self, record: dict, index: int = 0, read=None) -> dict:
        return {"inputs": record["tokens"].astype(np.int32),
                "types": record["types"].astype(np.int32),
                "segments": record["segments"].astype(np.int32),
                "starts": np.int32(record["start"]), "ends": np.int32(record["end"]),
                "weights": np.float32(1.0)}

    def loss(self, model, params, batch: dict, rng: jax.Array, *, deterministic: bool,
             aux=None):
        start_BxL, end_BxL = _apply(model, params, batch, rng, deterministic, "spans")
        start_BxL, end_BxL = (mask_padding(x, batch["segments"]) for x in (start_BxL, end_BxL))
        w_B = batch["weights"]
        start_total, weight = cross_entropy(start_BxL, batch["starts"], w_B)
        end_total, _ = cross_entropy(end_BxL, batch["ends"], w_B)
        hit_B = ((jnp.argmax(start_BxL, axis=-1) == batch["starts"])
                 & (jnp.argmax(end_BxL, axis=-1) == batch["ends"]))
        return (start_total + end_total) / 2, (weight, {"exact_span": jnp.sum(hit_B * w_B)})


def mask_padding(logits_BxL: jax.Array, segments_BxL: jax.Array) -> jax.Array:
    """fp32 logits with padding positions (segment 0) at the lowest finite value: they take
    no probability and are never an argmax."""
    logits_BxL = logits_BxL.astype(jnp.float32)
    return jnp.where(segments_BxL != 0, logits_BxL, jnp.finfo(jnp.float32).min)


class Distill:
    """Knowledge distillation (Hinton et al. 2015): a frozen teacher's predictions, softened
    by a temperature T, teach the student beside the usual targets. Summed over the base
    objective's weighted targets (every token of causal_lm, each example of classification):

        loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
               + (1 - alpha) * cross-entropy(student, targets)

    (T^2 keeps the soft term's gradient the same size as T changes). The teacher's params
    are the step's auxiliary input {"teacher": params} (jaxlm.train.build loads them from
    config.distill.teacher): a jit argument, sharded like the student's, never donated nor
    in the optimizer state; it runs in inference mode (no dropout) inside the step.
    Examples, batches and metrics are the base objective's, plus `distill_kl`: the KL term
    per target, at temperature T."""

    name = "distill"
    tokens_loss = False  # a KL term is mixed in, even over tokens

    def __init__(self, base, temperature: float, alpha: float):
        if not isinstance(base, (CausalLM, Classification)):
            raise ConfigError(f"config.train.objective='distill' distils next-token or class "
                              f"predictions; the model's objective here is {base.name}")
        self.base, self.temperature, self.alpha = base, temperature, alpha
        self.extra_tokens, self.metrics = base.extra_tokens, base.metrics + ("distill_kl",)
        self.teacher, self.aux_spec = None, None

    def with_teacher(self, model, abstract_params) -> "Distill":
        self.teacher, self.aux_spec = model, {"teacher": abstract_params}
        return self

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return self.base.batch_spec(batch_size)

    def example(self, window: dict, index: int = 0, read=None) -> dict:
        return self.base.example(window, index, read)

    def loss(self, model, params, batch: dict, rng: jax.Array, *, deterministic: bool,
             aux=None):
        classes = isinstance(self.base, Classification)
        output, targets = ("classes", batch["labels"]) if classes else ("logits", batch["targets"])
        student = _apply(model, params, batch, rng, deterministic, output).astype(jnp.float32)
        teacher = jax.lax.stop_gradient(
            _apply(self.teacher, aux["teacher"], batch, rng, True, output).astype(jnp.float32))
        hard, weight = cross_entropy(student, targets, batch["weights"])
        kl = jnp.sum(kl_divergence(teacher, student, self.temperature) * batch["weights"])
        total = self.alpha * self.temperature ** 2 * kl + (1 - self.alpha) * hard
        return total, (weight, {"accuracy": _correct(student, targets, batch["weights"]),
                                "distill_kl": kl})


def kl_divergence(teacher_logits, student_logits, temperature: float) -> jax.Array:
    """KL(softmax(teacher / T) || softmax(student / T)) over the last axis, per position."""
    log_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)


def check_aux_model(name: str, setup, aux_setup) -> None:
    """An auxiliary model whose predictions an objective compares with the trained model's
    (a distillation teacher; both jaxlm.setup.Setup) must predict over the same tokens:
    the same tokenizer and vocabulary size. Refused in one line otherwise."""
    ours, theirs = setup.tokenizer.to_dict(), aux_setup.tokenizer.to_dict()
    if ours != theirs:
        raise ConfigError(f"auxiliary model {name!r} reads tokenizer {theirs}, the trained model "
                          f"config.data.tokenizer gives {ours}: their predictions do not compare")
    if aux_setup.cfg.model.vocab_size != setup.cfg.model.vocab_size:
        raise ConfigError(f"auxiliary model {name!r} has vocab_size "
                          f"{aux_setup.cfg.model.vocab_size}, the trained model "
                          f"config.model.vocab_size={setup.cfg.model.vocab_size}")


def _token_spec(batch_size: int, seq_len: int, packed: bool) -> dict:
    spec = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
    if packed:
        spec.update(positions=jnp.int32, segments=jnp.int32)
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt) for k, dt in spec.items()}


def _with_packing(out: dict, window: dict, packed: bool, L: int) -> dict:
    """Packed batches carry positions and segments; an unpacked window in a packed batch
    (e.g. in a mixture) is one document from position 0."""
    if packed:
        segments = window.get("segments")
        out["positions"] = window.get("positions", np.arange(L, dtype=np.int32))
        out["segments"] = segments if segments is not None else np.ones(L, np.int32)
    return out


def make_objective(cfg, tokenizer):
    """The objective `config.train.objective` names, checked against the model family."""
    name, arch = cfg.train.objective, cfg.model.arch
    if name not in ("causal_lm", "masked_lm", "classification", "span_extraction", "distill"):
        raise ConfigError(f"config.train.objective={name!r}: expected one of "
                          "['causal_lm', 'classification', 'distill', 'masked_lm', "
                          "'span_extraction']")
    if name == "distill":  # the model's own objective, taught by a teacher (build_train)
        if cfg.train.loss_chunk:
            raise ConfigError("config.train.loss_chunk: distillation compares whole logits; "
                              "set it to 0 with config.train.objective='distill'")
        own = "classification" if cfg.model.num_classes else models.family(arch).objectives[0]
        return Distill(make_objective(_with_objective(cfg, own), tokenizer),
                       cfg.distill.temperature, cfg.distill.alpha)
    supported = models.family(arch).objectives
    if name not in supported:
        raise ConfigError(f"config.train.objective={name!r} does not fit config.model.arch="
                          f"{arch!r}, which trains with {', '.join(supported)}")
    if name == "causal_lm":
        return CausalLM(cfg.data.seq_len, cfg.data.packing, cfg.train.loss_chunk)
    if name == "masked_lm":
        return MaskedLM(cfg.data.seq_len, cfg.data.packing, tokenizer, cfg.train.seed,
                        cfg.train.mask_prob, cfg.train.whole_word_masking,
                        cfg.train.sentence_pairs, cfg.train.next_sentence)
    if name == "span_extraction":
        if not cfg.model.span_head:
            raise ConfigError("config.train.objective='span_extraction' trains the span head: "
                              "set config.model.span_head=true")
        return SpanExtraction(cfg.data.seq_len)
    if cfg.model.num_classes == 1:  # one output: a score, not classes
        return Regression(cfg.data.seq_len)
    return Classification(cfg.data.seq_len, cfg.model.num_classes)


def _with_objective(cfg, name: str):
    import copy
    out = copy.deepcopy(cfg)
    out.train.objective = name
    return out
