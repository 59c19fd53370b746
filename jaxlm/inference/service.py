"""What a server serves: a loaded model behind text-level operations, with no HTTP in it.

    service = Service(name, tokenizer, prefix, ...)   # python -m jaxlm.serve builds one
    service.encode("Once upon")         # token ids as the model reads text
    service.batcher.submit(Request(...))   # generation (a causal model)
    service.classify(["great film"])    # class probabilities (a model with a class head)

A causal model without a class head generates (an Engine of config.serve.slots slots driven
by a Batcher); a model with a class head (config.model.num_classes > 0, BERT or GPT)
classifies (jaxlm.inference.classify). Text becomes ids as jaxlm.evaluate reads it: the prefix token
(config.evaluate.prefix: EOS before every text for jaxlm-trained models, nothing for GPT-2
weights), then the tokenizer's ids.

`MockEngine` has the Engine's interface and outputs computable by hand (each new token is
the previous one + 1), so that batching and the HTTP layer are tested without a model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from jaxlm.inference.engine import Batcher, Prefilled, Settings, Token

EOS_TEXT = "<|endoftext|>"  # how the API names the end-of-text token


@dataclasses.dataclass
class Service:
    name: str                               # the model's name in the API
    tokenizer: object
    prefix: list[int]                       # ids before every text prompt
    max_len: int                            # prompt + new tokens fit in this many
    max_logprobs: int                       # most alternatives per token a request may ask
    batcher: Batcher | None = None          # generation (None: the model does not generate)
    classify: Callable | None = None        # (texts, pairs or None) -> probabilities [N, C]
    class_names: tuple[str, ...] = ()

    def encode(self, text: str) -> list[int]:
        """Ids as the model reads `text` (module docstring); the end-of-text name alone is
        that token. At least one id: an empty text is the EOS token, as lm-eval does."""
        if text == EOS_TEXT:
            return [self.tokenizer.eos_id]
        return self.prefix + self.tokenizer.encode(text) or [self.tokenizer.eos_id]

    def token_text(self, token: int) -> str:
        """One token's text (logprobs name tokens by it); EOS_TEXT for end of text, "" for
        an id beyond the tokenizer's vocabulary (a model's table may be padded past it)."""
        if token == self.tokenizer.eos_id:
            return EOS_TEXT
        return self.decode([token])

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t < self.tokenizer.vocab_size])


# ----------------------------------------------------------------------------- mock


class MockEngine:
    """The Engine interface with hand-computable outputs: the first new token is the last
    prompt token + 1, each next one the previous + 1 (mod vocab_size); a token's logprob is
    -0.5, its alternatives are itself and the token after it (-0.5, -1.5); prompt token j
    (after the first) scores -j. `fail_on` makes prefill of a prompt containing that id
    raise (a request that breaks); `delay_s` slows each step."""

    def __init__(self, vocab_size: int, slots: int, max_len: int, max_logprobs: int = 5,
                 fail_on: int | None = None, delay_s: float = 0.0):
        self.vocab_size, self.slots, self.max_len = vocab_size, slots, max_len
        self.max_logprobs, self.fail_on, self.delay_s = max_logprobs, fail_on, delay_s
        self.reset()

    def reset(self):
        self.last = [0] * self.slots

    def token(self, i: int) -> Token:
        i %= self.vocab_size
        return Token(i, -0.5, ((i, -0.5), ((i + 1) % self.vocab_size, -1.5)))

    def prefill(self, tokens, settings: Settings = Settings(), prompt_logprobs=False) -> Prefilled:
        if self.fail_on is not None and self.fail_on in tokens:
            raise RuntimeError(f"mock: token {self.fail_on} breaks the engine")
        prompt = [Token(t, -float(j), ((t, -float(j)),)) for j, t in enumerate(tokens[1:], 1)]
        return Prefilled(None, len(tokens), self.token(tokens[-1] + 1),
                         prompt if prompt_logprobs else None, settings)

    def insert(self, prefilled: Prefilled, slot: int):
        self.last[slot] = prefilled.first.id

    def generate(self) -> list[Token]:
        if self.delay_s:
            import time
            time.sleep(self.delay_s)
        self.last = [(t + 1) % self.vocab_size for t in self.last]
        return [self.token(t) for t in self.last]


@functools.lru_cache(maxsize=None)
def _byte():
    from jaxlm.data.tokenizers import get_tokenizer
    return get_tokenizer("byte")


def mock_service(slots: int = 4, max_len: int = 64, max_queue: int = 8, vocab_size: int = 0,
                 **engine) -> Service:
    """A byte-tokenizer Service on a MockEngine (not started; vocab_size: a model table
    larger than the tokenizer's 258), with a classifier that gives class 1 the probability
    len(text) / (len(text) + 1) (pairs: of text + pair)."""
    tok = _byte()
    engine = MockEngine(vocab_size or tok.vocab_size, slots, max_len, **engine)

    def classify(texts, pairs=None):
        n = np.array([len(t) + len(p or "") for t, p in zip(texts, pairs or [None] * len(texts))], float)
        return np.stack([1 / (n + 1), n / (n + 1)], axis=1)

    return Service(name="mock", tokenizer=tok, prefix=[tok.eos_id], max_len=max_len,
                   max_logprobs=engine.max_logprobs, batcher=Batcher(engine, max_queue, tok.eos_id),
                   classify=classify, class_names=("negative", "positive"))
