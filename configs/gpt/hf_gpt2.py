"""GPT-2 small as published (124M parameters, GPT-2's BPE), for evaluating its Hugging Face
weights on the standard few-shot suite, scored as lm-evaluation-harness scores it:

    python -m jaxlm.interop import --src=hf/gpt2 --out=runs/gpt2_import
    python -m jaxlm.evaluate --config=configs/gpt/hf_gpt2.py --workdir=runs/gpt2_eval \
        --config.evaluate.params=runs/gpt2_import

hf/gpt2 is the downloaded model folder (model.safetensors, config.json, vocab.json,
merges.txt); --config.data.tokenizer=gpt2:DIR names another. Requests get no prefix token,
as lm-eval runs GPT-2; k = 0, the setting of published zero-shot figures.
"""

from _gpt2 import gpt2_config

from jaxlm.evaluate.tasks import STANDARD


def get_config():
    c = gpt2_config("small")
    c.model.dtype = "float32"  # log-likelihoods as lm-eval computes them (fp32 transformers)
    c.data.tokenizer = "gpt2:hf/gpt2"
    c.evaluate.update(tasks=tuple(STANDARD), shots=(0,), num_examples=100_000, prefix="none",
                      batch_size=16, num_samples=3, sample_len=64, temperature=0.8, top_k=40)
    return c
