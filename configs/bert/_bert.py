"""BERT shapes (Devlin et al. 2019, Table/Section 3): base 12 layers x 768 (110M
parameters), large 24 x 1024 (340M); a 30,522-token WordPiece vocabulary, 512 positions,
2 token types, post-LayerNorm blocks, exact GELU, LayerNorm epsilon 1e-12, dropout 0.1.
Pretraining as in the paper's phase 1: sequences of 128 tokens, batch 256, Adam with
learning rate 1e-4, beta2 0.999, epsilon 1e-6, weight decay 0.01, 10,000 warmup steps.

The tokenizer is "byte:bert" (bytes plus [CLS], [SEP], [MASK]: nothing to download); with
a published vocab.txt on disk use --config.data.tokenizer=wordpiece:DIR (hf_bert_base.py
does). The model keeps BERT's vocabulary size either way, so parameter counts and
converted weights line up."""

from jaxlm.config import base_config

SIZES = {
    #        layers  d_model  heads
    "base":  (12,    768,     12),   # 110M parameters
    "large": (24,    1024,    16),   # 340M
}


def bert_model(c, layers: int, d_model: int, heads: int) -> None:
    """Sets config.model to a BERT of that shape (everything but the size is BERT's)."""
    c.model.update(arch="bert", num_layers=layers, d_model=d_model, num_heads=heads,
                   mlp_dim=4 * d_model, norm_position="post", activation="gelu",
                   type_vocab_size=2, layer_norm_eps=1e-12, dropout=0.1, attention_dropout=0.1,
                   position="learned", tie_embeddings=True)
    c.train.objective = "masked_lm"
    c.data.tokenizer = "byte:bert"
    c.evaluate.update(tasks=(), num_samples=0)  # an encoder: no few-shot generation


def bert_config(size: str):
    layers, d_model, heads = SIZES[size]
    c = base_config()
    bert_model(c, layers, d_model, heads)
    c.model.update(vocab_size=30522, max_len=512)
    # bf16 compute, fp32 state, fastest attention (xla while attention dropout is on), scan:
    # as configs/gpt/_gpt2.py's accelerator_defaults; on a CPU add --config.model.dtype=float32
    c.model.update(dtype="bfloat16", param_dtype="float32", attention_impl="auto",
                   scan_layers=True)
    c.data.seq_len = 128
    c.train.update(steps=1_000_000, batch_size=256, log_every=100)
    c.checkpoint.update(every=10_000, keep=3, archive_every=100_000)
    c.optimizer.update(learning_rate=1e-4, warmup_steps=10_000, min_lr_ratio=0.0, b2=0.999,
                       eps=1e-6, weight_decay=0.01)
    return c
