"""BERT (`BertForMaskedLM`, `BertForPreTraining`, `BertForSequenceClassification`,
`BertModel`) <-> jaxlm BERT.

PyTorch Linear weights are [out, in]: our kernels are their transposes. Files carry the
`bert.` prefix (heads at top level: `cls.predictions.*`, `cls.seq_relationship.*`,
`classifier.*`) or none (BertModel); old uploads name LayerNorm parameters gamma/beta;
`embeddings.position_ids` is a buffer, and `cls.predictions.decoder.*` repeats the tied
word embeddings and the output bias. A head the file does not have (BertForMaskedLM has no
pooler) is initialised fresh, and the import says which.
"""

from __future__ import annotations

from jaxlm.errors import CheckpointError
from jaxlm.interop.convert import Rule

ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification",
                 "BertModel")
PREFIX = "bert."
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
HEADS = ("mlm", "pooler", "next_sentence", "classifier")


def model_config(hf: dict) -> dict:
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"config.json: hidden_act={act!r}: jaxlm's BERT has {sorted(ACTIVATIONS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"config.json: position_embedding_type="
                              f"{hf['position_embedding_type']!r}: jaxlm's BERT has absolute positions")
    hf_class = (hf.get("architectures") or ["BertForMaskedLM"])[0]
    classes = len(hf.get("id2label", {})) or hf.get("num_labels", 2)
    return {"arch": "bert", "vocab_size": hf["vocab_size"], "max_len": hf["max_position_embeddings"],
            "num_layers": hf["num_hidden_layers"], "d_model": hf["hidden_size"],
            "num_heads": hf["num_attention_heads"], "mlp_dim": hf["intermediate_size"],
            "position": "learned", "norm_position": "post", "activation": ACTIVATIONS[act],
            "layer_norm_eps": hf.get("layer_norm_eps", 1e-12),
            "type_vocab_size": hf.get("type_vocab_size", 2), "tie_embeddings": True,
            "num_classes": classes if hf_class == "BertForSequenceClassification" else 0}


def hf_config(m, eos_id: int | None = None) -> dict:
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[m.activation]
    hf_class = "BertForSequenceClassification" if m.num_classes else "BertForPreTraining"
    out = {"architectures": [hf_class], "model_type": "bert", "vocab_size": m.vocab_size,
           "max_position_embeddings": m.max_len, "hidden_size": m.d_model,
           "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
           "intermediate_size": m.mlp_dim, "hidden_act": act, "layer_norm_eps": m.layer_norm_eps,
           "type_vocab_size": m.type_vocab_size, "position_embedding_type": "absolute",
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "initializer_range": m.init_std, "pad_token_id": 0}
    if m.num_classes:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(m.num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(m.num_classes)}
    return out


def check_model(m) -> None:
    """Only the BERT layout converts: learned positions, post-LN, token types. (That `m` is
    a BERT, hf.FAMILIES decided by config.model.arch.)"""
    if m.position != "learned" or m.norm_position != "post" or not m.type_vocab_size:
        raise CheckpointError("only BERT-shaped models (learned positions, post-LN, token "
                              "types) export as Hugging Face BERT")


def heads_in(keys) -> tuple[str, ...]:
    keys = set(keys)
    found = {"mlm": "cls.predictions.bias" in keys,
             "pooler": any(k.endswith("pooler.dense.weight") for k in keys),
             "next_sentence": "cls.seq_relationship.weight" in keys,
             "classifier": "classifier.weight" in keys}
    return tuple(h for h in HEADS if found[h])


def _norm(ours: str, theirs: str, old_names: bool) -> list[Rule]:
    w, b = ("gamma", "beta") if old_names else ("weight", "bias")
    return [Rule(f"{ours}/LayerNorm_0/scale", f"{theirs}.{w}"),
            Rule(f"{ours}/LayerNorm_0/bias", f"{theirs}.{b}")]


def _dense(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/kernel", f"{theirs}.weight", transpose=True),
            Rule(f"{ours}/bias", f"{theirs}.bias")]


def rules(m, prefix: str = PREFIX, heads=HEADS, old_names: bool = False) -> list[Rule]:
    """The tensor table for config.model `m`, the encoder's names with `prefix`, for the
    given heads (those of the file on import; all that `m` has on export)."""
    p = prefix
    out = [Rule("embed/tokens/embedding", f"{p}embeddings.word_embeddings.weight"),
           Rule("embed/positions/embedding", f"{p}embeddings.position_embeddings.weight"),
           Rule("embed/types/embedding", f"{p}embeddings.token_type_embeddings.weight"),
           *_norm("ln_embed", f"{p}embeddings.LayerNorm", old_names)]
    for i in range(m.num_layers):
        b, layer = f"block_{i}", f"{p}encoder.layer.{i}"
        for j, name in enumerate(("query", "key", "value")):  # parts of our qkv [D, 3, D]
            theirs = f"{layer}.attention.self.{name}"
            out += [Rule(f"{b}/attn/qkv/kernel", f"{theirs}.weight", transpose=True, part=j),
                    Rule(f"{b}/attn/qkv/bias", f"{theirs}.bias", part=j)]
        out += [*_dense(f"{b}/attn/out", f"{layer}.attention.output.dense"),
                *_norm(f"{b}/ln_attn", f"{layer}.attention.output.LayerNorm", old_names),
                *_dense(f"{b}/mlp/fc_in", f"{layer}.intermediate.dense"),
                *_dense(f"{b}/mlp/fc_out", f"{layer}.output.dense"),
                *_norm(f"{b}/ln_mlp", f"{layer}.output.LayerNorm", old_names)]
    if "pooler" in heads:
        out += _dense("pooler", f"{p}pooler.dense")
    if "mlm" in heads:
        out += [*_dense("mlm_dense", "cls.predictions.transform.dense"),
                *_norm("mlm_ln", "cls.predictions.transform.LayerNorm", old_names),
                Rule("mlm_bias", "cls.predictions.bias")]
    if "next_sentence" in heads:
        out += _dense("next_sentence", "cls.seq_relationship")
    if "classifier" in heads and m.num_classes:
        out += _dense("classifier/out", "classifier")
    return out


def ignored(name: str) -> bool:
    return name.endswith("embeddings.position_ids") or name.startswith("cls.predictions.decoder.")


def prefix_of(keys) -> str:
    return PREFIX if any(k.startswith(PREFIX) for k in keys) else ""


def uses_old_names(keys) -> bool:
    return any(k.endswith("LayerNorm.gamma") for k in keys)
