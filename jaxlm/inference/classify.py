"""Class probabilities of texts (and text pairs) from a model with a class head (a
regression head, config.model.num_classes = 1: its score, [N, 1]).

    classify = Classifier(model, params, tokenizer, mesh, config.mesh, seq_len=128, pooled=True)
    classify(["a fine film", "a dull one"])          # [2, num_classes] probabilities
    classify(["A man plays."], ["Someone plays."])   # pairs: sentence A, sentence B

Texts are encoded as fine-tuning encoded them (jaxlm.data.labelled.Encoder: [CLS] A [SEP]
B [SEP] for BERT, EOS-separated for GPT; cut longest part first to seq_len) and scored in
fixed batches of `batch_size` rows (one compiled program; the last batch padded).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxlm import sharding
from jaxlm.data.labelled import Encoder


class Classifier:
    def __init__(self, model, params, tokenizer, mesh, cfg_mesh, seq_len: int, *, pooled: bool,
                 batch_size: int = 8):
        self.model, self.params, self.mesh, self.cfg_mesh = model, params, mesh, cfg_mesh
        self.encoder = Encoder(tokenizer, seq_len, pooled=pooled)
        self.batch_size = batch_size
        self._probs = jax.jit(self._probabilities)

    def _probabilities(self, params, tokens, types, segments):
        logits = self.model.apply({"params": params}, tokens, None, segments, types, output="classes")
        if logits.shape[-1] == 1:  # a regression head: the score itself
            return logits.astype(np.float32)
        return jax.nn.softmax(logits.astype(np.float32), axis=-1)

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        rows = [self.encoder(t, None if pairs is None else p)
                for t, p in zip(texts, pairs if pairs is not None else [None] * len(texts))]
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            chunk += [chunk[-1]] * (self.batch_size - len(chunk))
            arrays = [np.stack([r[k] for r in chunk]) for k in ("tokens", "types", "segments")]
            with sharding.activate(self.mesh, self.cfg_mesh):
                out.append(np.asarray(jax.device_get(self._probs(self.params, *arrays))))
        return np.concatenate(out)[:len(rows)]
