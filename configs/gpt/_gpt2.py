"""GPT-2 sizes (Radford et al. 2019) with the GPT-3 paper's learning rates for models of
that size (Brown et al. 2020, Table 2.1), shared by gpt2_{small,medium,large,xl}.py.
Batch: 512 x 1024 tokens (~0.5M), as GPT-3 used for its 125M-350M models."""

from jaxlm.config import base_config

SIZES = {
    #         layers  d_model heads  peak lr
    "small":  (12,    768,    12,    6e-4),   # 124M parameters
    "medium": (24,    1024,   16,    3e-4),   # 355M
    "large":  (36,    1280,   20,    2.5e-4),  # 774M
    "xl":     (48,    1600,   25,    2e-4),   # 1.56B
}


def accelerator_defaults(c) -> None:
    """How the size configs run on GPU/TPU: bf16 compute with fp32 parameters, optimizer
    state, softmax, LayerNorm statistics and loss (mixed precision); the fastest attention
    kernel the backend has (cuDNN, splash); blocks scanned, so compile time stays flat
    in depth. On a CPU, add --config.model.dtype=float32 (XLA:CPU emulates bf16 slowly)."""
    c.model.update(dtype="bfloat16", param_dtype="float32", attention_impl="auto",
                   scan_layers=True)


def gpt2_config(size: str):
    """A GPT-2-shaped model (50257-token vocabulary, 1024 positions, tied embeddings).

    data.tokenizer stays "byte" (no download); with GPT-2's vocabulary files on disk set
    --config.data.tokenizer=gpt2:DIR. The model keeps GPT-2's vocabulary size either way,
    so parameter counts and HF conversion line up.
    """
    layers, d_model, heads, lr = SIZES[size]
    c = base_config()
    c.model.update(num_layers=layers, d_model=d_model, num_heads=heads, mlp_dim=4 * d_model,
                   vocab_size=50257, max_len=1024, dropout=0.0, attention_dropout=0.0)
    accelerator_defaults(c)
    c.data.seq_len = 1024
    c.train.update(steps=100_000, batch_size=512, microbatches=1, log_every=50)
    c.checkpoint.update(every=1000, keep=3, archive_every=10_000)
    c.optimizer.update(learning_rate=lr, warmup_steps=2000, min_lr_ratio=0.1,
                       weight_decay=0.1)
    c.evaluate.batch_size = 16
    return c
