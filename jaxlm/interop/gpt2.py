"""GPT-2 (`GPT2LMHeadModel`, `GPT2Model`) <-> jaxlm GPT.

Hugging Face GPT-2 stores its projections as Conv1D weights [in, out], the layout of our
kernels, and fuses query, key and value into `attn.c_attn` [D, 3D] (columns q | k | v,
heads contiguous within each): our `attn/qkv` kernel [D, 3, D], reshaped. Files may carry
the `transformer.` prefix or not, legacy causal-mask buffers (`attn.bias`,
`attn.masked_bias`), and `lm_head.weight` or not (tied to `wte`; an lm_head that differs
from wte makes an untied model).
"""

from __future__ import annotations

import re

from jaxlm.errors import CheckpointError
from jaxlm.interop.convert import Rule

ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
PREFIX = "transformer."
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def model_config(hf: dict) -> dict:
    """config.model fields from a Hugging Face GPT-2 config.json."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"config.json: activation_function={act!r}: jaxlm's GPT has "
                              f"{sorted(ACTIVATIONS)}")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("reorder_and_upcast_attn", False)):
        if hf.get(key, ok) != ok:
            raise CheckpointError(f"config.json: {key}={hf[key]!r} is a GPT-2 variant jaxlm does not have")
    d = hf["n_embd"]
    return {"arch": "gpt", "vocab_size": hf["vocab_size"], "max_len": hf["n_positions"],
            "num_layers": hf["n_layer"], "d_model": d, "num_heads": hf["n_head"],
            "mlp_dim": hf.get("n_inner") or 4 * d, "position": "learned",
            "norm_position": "pre", "activation": ACTIVATIONS[act],
            "layer_norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": hf.get("tie_word_embeddings", True), "type_vocab_size": 0}


def hf_config(m, eos_id: int | None = None) -> dict:
    """config.json of a GPT2LMHeadModel for jaxlm config.model `m`; its end-of-text id is
    the tokenizer's `eos_id` (the last row of GPT-2's own table when not given)."""
    eos = m.vocab_size - 1 if eos_id is None else eos_id
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[m.activation]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": m.vocab_size, "n_positions": m.max_len, "n_embd": m.d_model,
            "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.mlp_dim,
            "activation_function": act, "layer_norm_epsilon": m.layer_norm_eps,
            "tie_word_embeddings": m.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "initializer_range": m.init_std, "bos_token_id": eos,
            "eos_token_id": eos, "scale_attn_weights": True, "use_cache": True}


def check_model(m) -> None:
    """Only the GPT-2 layout converts: learned positions, pre-LN, no token types. (That
    `m` is a GPT, hf.FAMILIES decided by config.model.arch.)"""
    if m.position != "learned" or m.norm_position != "pre" or m.type_vocab_size:
        raise CheckpointError("only GPT-2-shaped models (learned positions, pre-LN, no token "
                              "types) export as GPT2LMHeadModel")


def rules(m, prefix: str = PREFIX, with_head: bool = False) -> list[Rule]:
    """The tensor table for config.model `m`, names with `prefix` ("transformer." or "");
    `lm_head.weight` for an untied model, and with `with_head` for a tied one too."""
    p = prefix
    out = [Rule("embed/tokens/embedding", f"{p}wte.weight"),
           Rule("embed/positions/embedding", f"{p}wpe.weight"),
           Rule("ln_final/LayerNorm_0/scale", f"{p}ln_f.weight"),
           Rule("ln_final/LayerNorm_0/bias", f"{p}ln_f.bias")]
    for i in range(m.num_layers):
        b, h = f"block_{i}", f"{p}h.{i}"
        out += [Rule(f"{b}/attn/qkv/kernel", f"{h}.attn.c_attn.weight", fused=3),  # [D, 3D]
                Rule(f"{b}/attn/qkv/bias", f"{h}.attn.c_attn.bias", fused=3),      # [3D]
                Rule(f"{b}/attn/out/kernel", f"{h}.attn.c_proj.weight"),
                Rule(f"{b}/attn/out/bias", f"{h}.attn.c_proj.bias"),
                Rule(f"{b}/ln_attn/LayerNorm_0/scale", f"{h}.ln_1.weight"),
                Rule(f"{b}/ln_attn/LayerNorm_0/bias", f"{h}.ln_1.bias"),
                Rule(f"{b}/ln_mlp/LayerNorm_0/scale", f"{h}.ln_2.weight"),
                Rule(f"{b}/ln_mlp/LayerNorm_0/bias", f"{h}.ln_2.bias"),
                Rule(f"{b}/mlp/fc_in/kernel", f"{h}.mlp.c_fc.weight"),
                Rule(f"{b}/mlp/fc_in/bias", f"{h}.mlp.c_fc.bias"),
                Rule(f"{b}/mlp/fc_out/kernel", f"{h}.mlp.c_proj.weight"),
                Rule(f"{b}/mlp/fc_out/bias", f"{h}.mlp.c_proj.bias")]
    if not m.tie_embeddings:
        out.append(Rule("lm_head/kernel", "lm_head.weight", transpose=True))
    elif with_head:
        out.append(Rule("embed/tokens/embedding", "lm_head.weight"))
    return out


def ignored(name: str) -> bool:
    """Buffers real uploads carry that hold no parameters: the causal mask, and a tied
    lm_head (checked equal to wte separately)."""
    return bool(re.fullmatch(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)", name)) \
        or name == "lm_head.weight"


def prefix_of(keys) -> str:
    """"transformer." when the file's tensors carry it (GPT2LMHeadModel), else ""."""
    return PREFIX if any(k.startswith(PREFIX) for k in keys) else ""
