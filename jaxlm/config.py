"""The one config schema of jaxlm: every field, its default, what values are valid, and why
it exists; plus loading config files, command-line overrides, validation and the one
serialised form (JSON) used by run outputs, checkpoints and exports.

A config file under `configs/` is a Python file whose `get_config()` starts from
`base_config()` and changes values; it cannot add fields, so a typo fails loudly instead of
being ignored. Model presets (the GPT-2 sizes) live there too, never here. A config file
may import a helper module from its own folder (e.g. `from _gpt2 import gpt2_config`).

Shape letters used in variable names across the code base:
  B batch, L sequence length, S key length, D model width, H heads, K head dim (D = H*K),
  F MLP hidden width, V vocabulary, M microbatches.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import traceback
from typing import Any

import ml_collections

from jaxlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """Valid numbers: lo < x (or lo <= x) and x < hi (or <=), plus any of `also`."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()

    def __contains__(self, x) -> bool:
        if x in self.also:
            return True
        if not math.isfinite(x):
            return False
        above = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            text = "positive" if (self.lo, self.lo_open) == (0, True) else f">= {self.lo}"
        else:
            text = f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        return " or ".join([repr(a) for a in self.also] + [text])


POSITIVE = Range(0, lo_open=True)
NONNEGATIVE = Range(0)
FRACTION = Range(0, 1, hi_open=True)        # a probability that must leave something: [0, 1)
AXIS = Range(1, also=(-1,))                 # a mesh axis size; -1 = the devices left over


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: default value (its type is the field's type), valid values (a Range,
    a tuple of allowed strings, or None when the code that uses the value parses it), and a
    line on what it is for."""
    default: Any
    valid: Range | tuple | None
    doc: str
    each: bool = False  # a tuple field whose every element must be valid


# The schema. Names (model families, objectives, tokenizers, datasets, tasks, mesh
# strategies and rules) are parsed by the code that uses them (valid=None here) and checked
# when a command builds its run, before it writes anything.
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64 needs jax_enable_x64
SCHEMA = {
    "parallelism": Field("jit", ("jit", "pmap"),
                         "jit: one program over the whole mesh (every strategy); pmap: classic "
                         "data parallel over local devices (replicated params, psum); mesh ignored"),
    "model": {
        "arch": Field("gpt", None, "model family (jaxlm.models registry): gpt, bert"),
        "vocab_size": Field(258, POSITIVE, "V; at least the tokenizer's ids (byte tokenizer: 258)"),
        "max_len": Field(256, POSITIVE, "longest sequence the model accepts (learned position rows)"),
        "cache_len": Field(0, NONNEGATIVE, "decoding: KV-cache slots per sequence, bounding "
                           "prompt + new tokens (0: max_len); smaller saves memory"),
        "num_layers": Field(4, POSITIVE, "transformer blocks"),
        "d_model": Field(128, POSITIVE, "D, the residual width"),
        "num_heads": Field(4, POSITIVE, "H; head dim K = D / H"),
        "mlp_dim": Field(512, POSITIVE, "F; GPT-2 uses 4*D"),
        "dropout": Field(0.0, FRACTION, "on embeddings, attention output and MLP output"),
        "attention_dropout": Field(0.0, FRACTION, "on attention probabilities"),
        "position": Field("learned", ("learned", "rope"),
                          "learned (GPT-2) or rope (rotary, applied to q and k)"),
        "rope_base": Field(10000.0, POSITIVE, "rotary base frequency (position = rope)"),
        "tie_embeddings": Field(True, None, "output projection reuses the token embedding (GPT-2)"),
        "norm_position": Field("pre", ("pre", "post"), "LayerNorm before each sublayer (GPT-2) "
                               "or after its residual sum (BERT)"),
        "activation": Field("gelu_tanh", ("gelu_tanh", "gelu"), "MLP activation: GELU's tanh "
                            "approximation (GPT-2) or the exact erf GELU (BERT)"),
        "type_vocab_size": Field(0, NONNEGATIVE, "token types (sentence A/B) embedded; 0 = none "
                                 "(GPT), BERT: 2"),
        "num_classes": Field(0, NONNEGATIVE, "outputs of a sequence-classification head; 0 = "
                             "no head (pretraining); 1 = a regression head (one score, "
                             "mean squared error: GLUE's STS-B)"),
        "span_head": Field(False, None, "BERT: a span-extraction head (Dense D->2 over every "
                           "position: answer start and end logits, SQuAD: python -m "
                           "jaxlm.squad); off in pretraining, so a pretrained model has none "
                           "and fine-tuning adds it fresh"),
        "layer_norm_eps": Field(1e-5, POSITIVE, "LayerNorm epsilon"),
        "dtype": Field("float32", DTYPES, "compute dtype (bfloat16 for mixed precision)"),
        "param_dtype": Field("float32", DTYPES, "storage dtype of parameters and optimizer state"),
        "wide_logits": Field(True, None, "vocabulary logits in fp32 (accumulator and result) "
                             "whatever the compute dtype; false: rounded to the compute dtype "
                             "(MaxText's default), half their memory in training, the loss "
                             "still computed in fp32"),
        "embed_lookup": Field("gather", ("gather", "gather_whole", "one_hot"),
                              "token embedding lookup, the same rows each way "
                              "(layers.Embed): gather rows where the table lies, "
                              "gather_whole (the table all-gathered first, then rows taken "
                              "locally), or one_hot (a one-hot matmul, as MaxText's "
                              "use_iota_embed: 2*V*D more FLOPs a token each way). Under FSDP "
                              "on TPU each lowers the peak at some shapes and raises it at "
                              "others (BENCHMARKS.md, fit table)"),
        "attention_impl": Field("xla", ("auto", "xla", "cudnn", "splash"),
                                "attention kernel (jaxlm.models.attention): xla everywhere, "
                                "cudnn on NVIDIA GPUs (bf16/fp16), splash on TPU, auto = the "
                                "best the backend allows"),
        "attention_interpret": Field(False, None, "run the splash kernel in Pallas' interpret "
                                     "mode on any backend (slow; for debugging and tests)"),
        "remat": Field(False, None, "recompute each block's activations in the backward pass"),
        "remat_policy": Field("full", ("full", "save_dots", "save_dots_no_batch", "offload_dots"),
                              "what remat keeps of a block: its input only (full), every "
                              "matmul output (save_dots), the weight matmuls' outputs "
                              "(save_dots_no_batch), or those in host memory (offload_dots; "
                              "GPU/TPU)"),
        "scan_layers": Field(False, None, "run the blocks with jax.lax.scan over parameters "
                             "stacked on a 'layers' axis: compile time flat in depth"),
        "init_std": Field(0.02, POSITIVE,
                          "normal init std; residual output projections get / sqrt(2*layers)"),
    },
    "data": {
        "name": Field("synthetic", None, "synthetic (built-in offline corpus), a prepared TFDS "
                      "text dataset (jaxlm.data.prepare), or mixture"),
        "seed": Field(0, NONNEGATIVE, "seeds the synthetic world and the order of sequences"),
        "seq_len": Field(128, POSITIVE, "L, tokens per training sequence (<= model.max_len)"),
        "tokenizer": Field("byte", None, "byte, sentencepiece:PATH (model file) or gpt2:DIR "
                           "(local vocabulary files); see jaxlm.data.tokenizers"),
        "prefetch": Field(2, NONNEGATIVE, "batches prepared ahead on a background thread"),
        "split": Field("train", None, "TFDS split (slices like train[:90%] work)"),
        "text_key": Field("", None, "feature holding the text; empty: the only text feature"),
        "data_dir": Field("", None, "TFDS data_dir (local or gs://); empty: $TFDS_DATA_DIR or "
                          "~/tensorflow_datasets"),
        "manual_dir": Field("", None, "folder with a catalog dataset's source files: an "
                            "unprepared dataset is prepared from it (nothing is downloaded)"),
        "cache_dir": Field("", None, "token caches (a local folder); empty: <data_dir>/"
                            "jaxlm_tokens, or ~/.cache/jaxlm/tokens for a gs:// data_dir"),
        "packing": Field(False, None, "false: the token stream cut into windows; true: whole "
                         "documents per sequence with segment ids and position resets"),
        "mixture": Field((), None, "with name=mixture: NAME=WEIGHT entries"),
        "mixture_block": Field(1000, POSITIVE, "each block of this many sequences has exact "
                               "per-dataset counts"),
    },
    "train": {
        "objective": Field("causal_lm", None, "what is learned from the token windows "
                           "(jaxlm.train.objectives): causal_lm, masked_lm, classification, "
                           "span_extraction (SQuAD), distill (config.distill)"),
        "loss_chunk": Field(0, NONNEGATIVE, "causal_lm: cross-entropy over this many positions "
                            "at a time, recomputed in the backward pass, so the [batch, "
                            "seq_len, vocab] logits are never held whole (0: all at once)"),
        "mask_prob": Field(0.15, Range(0, 1, lo_open=True, hi_open=True),
                           "masked_lm: share of the real tokens chosen in each sequence"),
        "whole_word_masking": Field(False, None, "masked_lm: choose whole words, not tokens"),
        "sentence_pairs": Field(False, None, "masked_lm: each window becomes [CLS] A [SEP] B "
                                "[SEP] (random cut) with token types 0/1 (needs "
                                "data.packing=false)"),
        "next_sentence": Field(False, None, "masked_lm with sentence_pairs: half the B's come "
                               "from another example, and the [CLS] output learns which "
                               "(next-sentence prediction)"),
        "trainable": Field((), None, "regular expressions over parameter paths (e.g. "
                           "'classifier', 'block_1/'): only matching parameters are trained, "
                           "get optimizer moments and are saved each step; the rest is a "
                           "frozen base saved once. Empty: all (jaxlm.trainable)"),
        "init": Field("", None, "continued pretraining: start from these params (a workdir's "
                      "latest checkpoint, a checkpoint folder, a params export or Hugging Face "
                      "import) with a fresh optimizer and learning-rate schedule, warmup "
                      "included; used when the workdir has no checkpoint (jaxlm.train.init)"),
        "steps": Field(1000, POSITIVE, "optimizer steps"),
        "profile_steps": Field("", None, "A:B writes a JAX profiler trace of the steps after "
                               "the A-th up to the B-th into WORKDIR/tb (TensorBoard's profile "
                               "plugin, Perfetto; jaxlm.train.profile); empty: none"),
        "batch_size": Field(32, POSITIVE, "global batch, in sequences, per optimizer step"),
        "microbatches": Field(1, POSITIVE, "gradient accumulation: the batch is split into this "
                              "many (with config.mesh.pipeline: the microbatches that flow "
                              "through the stages, in one forward and backward pass)"),
        "seed": Field(0, NONNEGATIVE, "parameter init and dropout"),
        "log_every": Field(25, POSITIVE, "steps between logged metrics"),
        "nonfinite": Field("stop", ("stop", "skip"),
                           "a step with NaN/inf loss or gradient norm is never applied; then stop "
                           "the run, or skip to the next batch"),
        "max_skipped_steps": Field(10, NONNEGATIVE, "skip gives up after this many bad steps in a row"),
    },
    "checkpoint": {
        "every": Field(500, POSITIVE, "steps between saves; also one at the end and on SIGTERM"),
        "keep": Field(2, POSITIVE, "most recent checkpoints kept on disk"),
        "archive_every": Field(0, NONNEGATIVE, "also keep for good multiples of this; 0 = none"),
        "async_save": Field(True, None, "write in the background while training goes on"),
        "check_data": Field(True, None, "refuse to resume on data whose order differs"),
        "verify": Field(True, None, "save a checksum of every array and check it on restore: "
                        "a damaged file is named instead of restored"),
        "step": Field(-1, Range(0, also=(-1,)), "checkpoint that evaluate/export read; -1 = latest"),
        "heartbeat_seconds": Field(60.0, POSITIVE, "saves, restores and step waits log a line this often"),
        "timeout_seconds": Field(1800.0, POSITIVE, "and end the process (exit 3, stacks printed) "
                                 "when one takes longer: a hung multi-host job stops"),
    },
    "optimizer": {
        "learning_rate": Field(3e-3, POSITIVE, "peak learning rate, reached after warmup"),
        "warmup_steps": Field(100, NONNEGATIVE, "linear warmup from 0 (<= train.steps)"),
        "min_lr_ratio": Field(0.1, Range(0, 1), "cosine decays to learning_rate * this at train.steps"),
        "b1": Field(0.9, FRACTION, "Adam first-moment decay"),
        "b2": Field(0.95, FRACTION, "Adam second-moment decay"),
        "eps": Field(1e-8, POSITIVE, "Adam epsilon"),
        "weight_decay": Field(0.1, NONNEGATIVE, "decoupled (AdamW)"),
        "no_decay": Field(("bias", "scale"), None,
                          "parameters whose path contains one of these are not decayed"),
        "grad_clip_norm": Field(1.0, NONNEGATIVE, "global-norm clipping; 0 disables"),
    },
    "mesh": {
        "data": Field(-1, AXIS, "mesh axis sizes, product = device count; -1: the rest"),
        "fsdp": Field(1, AXIS, "parameters, gradients and Adam moments split (strategy fsdp)"),
        "sequence": Field(1, AXIS, "activations split along their length (long sequences)"),
        "tensor": Field(1, AXIS, "heads, MLP and vocabulary split (strategy tp)"),
        "pipeline": Field(1, POSITIVE, "pipeline stages: the scanned blocks split into this "
                          "many groups of layers over a 'stage' mesh axis (outermost); "
                          "config.train.microbatches then flow through the stages (GPipe) "
                          "instead of accumulating gradients; needs model.scan_layers"),
        "pipeline_repeats": Field(1, POSITIVE, "circular schedule: each stage holds this many "
                                  "non-consecutive groups of layers and the microbatches go "
                                  "round the stages as often: bubble (S-1)/(R*M+S-1), for an "
                                  "all-to-all of the blocks' parameters each step; 1: GPipe"),
        "dcn_data": Field(1, POSITIVE, "slices the data axis spans over the data-centre network; "
                          "the sizes above are then per slice"),
        "dcn_fsdp": Field(1, POSITIVE, "slices the fsdp axis spans"),
        "dcn_pipeline": Field(1, POSITIVE, "slices the stage axis spans: stages = pipeline x "
                              "dcn_pipeline, and only activations cross the slow network"),
        "strategy": Field("dp", None, "how parameters and activations are split "
                          "(jaxlm.sharding.STRATEGIES): dp, fsdp, tp, fsdp_tp"),
        "rules": Field((), None, "extra (logical axis, mesh axes) rules, tried first"),
    },
    "evaluate": {
        "params": Field("", None, "empty: the workdir's checkpoint (checkpoint.step); else a "
                        "params-only export (python -m jaxlm.export)"),
        "tasks": Field(("rule_mc", "rule_exact", "facts_mc", "arithmetic_mc"), None,
                       "few-shot tasks (jaxlm.evaluate.tasks): synthetic (rule_mc, rule_exact, "
                       "facts_mc, arithmetic_mc) and standard (hellaswag, piqa, arc_easy, "
                       "arc_challenge, winogrande, lambada_openai, copa, boolq, sst2)"),
        "shots": Field((0, 1, 4, 8), NONNEGATIVE, "numbers of demonstrations k", each=True),
        "num_examples": Field(200, POSITIVE, "the first N documents of each task (fewer if "
                              "the task has fewer; lm-eval's --limit)"),
        "data_dir": Field("", None, "standard tasks: folder of <task>/<split>.jsonl, the "
                          "splits lm-eval's config names (validation or test scored, train "
                          "demonstrates; a missing one falls back, marked non-standard); "
                          "relative to the repository; empty: ../shared/data/fewshot"),
        "source": Field("files", ("files", "tfds"), "standard tasks: JSONL files under "
                        "data_dir, or prepared TFDS datasets (piqa, ai2_arc, super_glue/copa "
                        "and boolq, glue/sst2; nothing is downloaded)"),
        "tfds_data_dir": Field("", None, "source=tfds: where the datasets are prepared "
                               "(empty: TFDS's default, ~/tensorflow_datasets)"),
        "world_seed": Field(0, NONNEGATIVE, "synthetic tasks: the synthetic world they ask "
                            "about (a model pretrained on it: its config.data.seed)"),
        "prefix": Field("auto", ("auto", "eos", "none"), "token before every request: eos "
                        "(jaxlm-trained documents start with EOS), none (GPT-2 weights as "
                        "lm-eval runs them); auto: none for the gpt2 tokenizer, else eos"),
        "batch_size": Field(32, POSITIVE, "sequences scored per forward pass"),
        "seed": Field(0, NONNEGATIVE, "synthetic tasks' demonstrations, and the samples"),
        "fewshot_seed": Field(1234, NONNEGATIVE, "standard tasks: seed of lm-eval's "
                              "demonstration sampler (1234 is lm-eval's default)"),
        "fewshot_exclude_self": Field(False, None, "standard tasks demonstrated from the split "
                                      "they score (lambada_openai): never show a document as "
                                      "its own demonstration, as lm-eval does; results are "
                                      "marked non-standard"),
        "log_samples": Field(False, None, "also write every request and its scores to "
                             "WORKDIR/samples/<task>_<k>shot.jsonl"),
        "harness_tasks": Field((), None, "lm-evaluation-harness's own task catalog (tasks, "
                               "groups, tags: mmlu, gsm8k, ...) scored by this model at every "
                               "k in shots, offline (needs lm_eval; jaxlm.evaluate.harness)"),
        "harness_data": Field((), None, "TASK=PATH entries: a harness task's data from a local "
                              "file of its scored split, a folder of <split>.jsonl/.json/.csv/"
                              ".parquet, or a datasets save_to_disk folder, in the fields "
                              "its YAML reads; else the Hugging Face cache (relative to the "
                              "repository)"),
        "harness_include": Field("", None, "a folder of your own lm-eval task YAMLs, added to "
                                 "the catalog (TaskManager include_path)"),
        "every": Field(0, NONNEGATIVE, "during training, every N steps (and at the end): "
                       "score every_tasks at every_shots on the training mesh and log them "
                       "beside the loss (metrics.jsonl, TensorBoard); 0: off"),
        "every_tasks": Field((), None, "tasks scored during training; empty: config.evaluate.tasks"),
        "every_shots": Field((0,), NONNEGATIVE, "k scored during training", each=True),
        "max_new_tokens": Field(16, POSITIVE, "for exact-match tasks"),
        "num_samples": Field(3, NONNEGATIVE, "generated samples printed after training"),
        "sample_len": Field(96, POSITIVE, "tokens per sample"),
        "top_k": Field(0, NONNEGATIVE, "samples: only the k most likely tokens (0: all)"),
        "top_p": Field(1.0, Range(0, 1, lo_open=True), "samples: the smallest set of tokens "
                       "with this much probability (1: all)"),
        "temperature": Field(0.8, NONNEGATIVE, "sampling temperature of the samples (0: greedy)"),
    },
    "finetune": {
        "init": Field("", None, "pretrained params: a workdir (its latest checkpoint), one "
                      "checkpoint folder, or a params export; empty = random initialisation"),
        "train_data": Field("synthetic:facts:train", None, "labelled examples: a .csv/.tsv/"
                            ".jsonl file (a slice like FILE[:400] works), tfds:NAME:SPLIT or "
                            "synthetic:facts:SPLIT (jaxlm.data.labelled)"),
        "validation_data": Field("synthetic:facts:validation", None, "scored every epoch"),
        "glue_task": Field("", ("", "cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli",
                                "rte", "wnli"),
                           "a GLUE task (jaxlm.data.glue): it sets the data (glue:TASK:train, "
                           "its dev split), num_classes and class_names left at their "
                           "defaults, and adds its official metrics and score 'glue'"),
        "glue_dir": Field("", None, "GLUE's folder as its download script leaves it (CoLA/, "
                          "SST-2/, ..., MNLI/); empty: TFDS glue/TASK prepared in "
                          "config.data.data_dir"),
        "train_examples": Field(0, NONNEGATIVE, "use only the first N training examples "
                                "(few-label experiments); 0 = all"),
        "text_field": Field("sentence", None, "field holding the text"),
        "pair_field": Field("", None, "field of the second text of a pair; empty: single texts"),
        "label_field": Field("label", None, "field holding the class (a number, or a name of "
                             "class_names)"),
        "class_names": Field((), None, "the classes' names in label order (for labels given by "
                             "name, and the plots)"),
        "epochs": Field(3, POSITIVE, "passes over the training examples"),
        "learning_rate": Field(5e-5, POSITIVE, "peak learning rate (replaces optimizer.learning_rate)"),
        "batch_size": Field(32, POSITIVE, "examples per step (replaces train.batch_size)"),
        "warmup_ratio": Field(0.1, Range(0, 1), "linear warmup over this share of the steps"),
        "best_metric": Field("accuracy", ("accuracy", "f1", "f1_macro", "mcc", "roc_auc",
                                          "pearson", "spearman", "glue"),
                             "validation metric that picks the best epoch (kept in WORKDIR/best); "
                             "pearson/spearman for a regression head, glue: the GLUE task's "
                             "official score"),
        # SQuAD (python -m jaxlm.squad; jaxlm.data.squad, jaxlm.evaluate.squad)
        "doc_stride": Field(128, POSITIVE, "SQuAD: context tokens between the starts of a "
                            "question's windows over a long context (at most the context "
                            "part of a window)"),
        "max_query_len": Field(64, POSITIVE, "SQuAD: question tokens kept (the rest cut)"),
        "max_answer_len": Field(30, POSITIVE, "SQuAD: longest answer, in tokens, decoding "
                                "considers"),
        "n_best": Field(20, POSITIVE, "SQuAD: highest start and end logits per window "
                        "combined into candidate answers"),
        "squad_v2": Field(False, None, "SQuAD v2.0: questions may have no answer; predict '' "
                          "when the no-answer score beats the best span's by more than "
                          "null_threshold (false: v1.1, always a span)"),
        "null_threshold": Field(0.0, Range(-1000, 1000), "SQuAD v2.0: how much the no-answer "
                                "score ([CLS] start + end logit) must exceed the best span's "
                                "to predict '' (logit units; higher: fewer '')"),
        "augment": {  # jaxlm.data.augment: training examples only, drawn from (seed, epoch, example)
            "delete": Field(0.0, Range(0, 1), "each word of a training text is deleted with "
                            "this probability (one word always stays)"),
            "swap": Field(0.0, Range(0, 1), "each word trades places with another word of "
                          "its text with this probability"),
            "insert": Field(0.0, Range(0, 1), "after each word, a word of the training texts' "
                            "own vocabulary is inserted with this probability"),
            "mask": Field(0.0, Range(0, 1), "share of the words replaced by [MASK], in spans "
                          "of 1-10 words (SpanBERT's lengths; tokenizers with [MASK] only)"),
            "examples": Field(1.0, Range(0, 1), "share of the training examples augmented in "
                              "each epoch; the rest are read as they are"),
        },
    },
    "distill": {
        "teacher": Field("", None, "config.train.objective=distill: the teacher, a workdir (its "
                         "latest checkpoint) or a params export, of the same tokenizer"),
        "temperature": Field(2.0, POSITIVE, "softens both predictions (T; the soft loss is "
                             "scaled by T^2)"),
        "alpha": Field(0.5, Range(0, 1), "weight of the teacher's term; 1 - alpha: the usual "
                       "loss's"),
    },
    "quant": {
        "mode": Field("none", ("none", "int8_weight", "int8"), "int8 quantization (qwix) of "
                      "every weight matmul: int8_weight keeps int8 weights with per-channel "
                      "scales; int8 also quantizes the matmuls' inputs, per token, as they "
                      "run. Set by python -m jaxlm.quantize and read from its export"),
        "train": Field(False, None, "quantization-aware training: training runs the matmuls "
                       "fake-quantized as quant.mode will (straight-through gradients); "
                       "python -m jaxlm.quantize exports the result"),
        "skip": Field(("^embed/",), None, "regular expressions of module paths whose matmuls "
                      "stay in float (re.search). Default: the token table, which is both the "
                      "input lookup (a gather) and the tied output head"),
    },
    "lora": {
        "rank": Field(0, NONNEGATIVE, "low-rank adapters (qwix LoRA, jaxlm.models.transforms): "
                      "each targeted kernel W [in, *out] gets A [in, rank] and B [rank, out], "
                      "B = 0 at the start, and runs as W + (alpha/rank) A B; only the adapters "
                      "(and a classification head) train, the rest is a frozen base. 0: off"),
        "alpha": Field(16.0, POSITIVE, "the adapters' scale is alpha / rank"),
        "dropout": Field(0.0, FRACTION, "dropout on the adapters' input, in training only"),
        "targets": Field(("attn/qkv", "attn/out", "mlp/fc_in", "mlp/fc_out"), None,
                         "regular expressions of the module paths adapted (re.search): "
                         "block_<i>/attn/qkv, .../attn/out, .../mlp/fc_in, .../mlp/fc_out "
                         "(blocks/... scanned), lm_head (GPT, untied), mlm_dense, pooler, "
                         "next_sentence (BERT), classifier/out; never the token table"),
    },
    "prune": {
        "sparsity": Field(0.0, FRACTION, "magnitude pruning: the share of each pruned weight "
                          "set to zero by prune.end_step (0: no pruning)"),
        "pattern": Field("unstructured", None, "unstructured, or N:M (e.g. 2:4): of every M "
                         "consecutive weights along a kernel's input axis, N are kept "
                         "(pruned at prune.start_step, at once; sparsity, scope, end_step and every "
                         "are then unused)"),
        "scope": Field("layer", ("layer", "global"), "unstructured: each kernel pruned to the "
                       "sparsity (layer) or one threshold over all of them (global)"),
        "start_step": Field(0, NONNEGATIVE, "the first pruning step"),
        "end_step": Field(0, NONNEGATIVE, "the sparsity is reached here (cubic schedule from "
                          "start_step; equal to start_step: all at once)"),
        "every": Field(100, POSITIVE, "steps between mask updates in the schedule"),
        "params": Field(("kernel$",), None, "regular expressions of parameter paths that are "
                        "pruned (re.search); default: every matmul kernel"),
    },
    "privacy": {  # differentially private training, DP-SGD (jaxlm.train.privacy)
        "noise_multiplier": Field(0.0, NONNEGATIVE, "Gaussian noise of std noise_multiplier "
                                  "* l2_clip on each step's sum of clipped per-example "
                                  "gradients; 0 (and target_epsilon 0): not private"),
        "target_epsilon": Field(0.0, NONNEGATIVE, "instead of noise_multiplier: the epsilon "
                                "the whole run may spend, the noise solved for it (0: off)"),
        "l2_clip": Field(1.0, POSITIVE, "each example's gradient is scaled to at most this "
                         "L2 norm: all one example can add to a step"),
        "delta": Field(1e-5, Range(0, 1, lo_open=True, hi_open=True), "delta of the "
                       "(epsilon, delta) guarantee; below 1 / the training examples"),
        "sampling": Field("poisson", ("poisson", "fixed"), "poisson: each example joins a "
                          "step with probability expected_batch_size / N, add/remove-one "
                          "adjacency; fixed: a random set of train.batch_size examples per "
                          "step, replace-one adjacency"),
        "expected_batch_size": Field(0, NONNEGATIVE, "poisson: examples per step on average, "
                                     "the rows (train.batch_size) padded and the rare larger "
                                     "draw cut to them (0: half the rows)"),
        "seed": Field(-1, Range(0, also=(-1,)), "sampling and noise; -1: drawn from the OS "
                      "and kept only in the checkpoints (the guarantee assumes it is secret)"),
    },
    "logging": {
        "wandb": Field(False, None, "also log to Weights & Biases (pip install wandb): the "
                       "metrics, the few-shot table and the plots; a resumed run continues "
                       "the same W&B run (its id is kept in WORKDIR/wandb_id)"),
        "wandb_project": Field("jaxlm", None, "W&B project"),
        "wandb_entity": Field("", None, "W&B entity (user or team; empty: your default)"),
        "wandb_name": Field("", None, "W&B run name (empty: the workdir's name)"),
        "wandb_mode": Field("online", ("online", "offline"), "offline: written under "
                            "WORKDIR/wandb, sent later with `wandb sync`"),
    },
    "serve": {
        "slots": Field(8, POSITIVE, "python -m jaxlm.serve: requests decoded together (KV-cache "
                       "rows, preallocated)"),
        "max_queue": Field(64, POSITIVE, "requests waiting for a slot before new ones get 429"),
        "max_logprobs": Field(5, POSITIVE, "most alternatives per token a request may ask for "
                              "(logprobs)"),
        "max_n": Field(8, POSITIVE, "most completions per prompt (n)"),
        "shutdown_s": Field(30.0, NONNEGATIVE, "on SIGTERM: how long running requests may take "
                            "to finish"),
    },
    "distributed": {
        "auto_detect": Field(False, None, "let JAX read the cluster (SLURM, Cloud TPU, GKE, MPI)"),
        "coordinator_address": Field("", None, "host:port of process 0 (launch/local.py sets "
                                     "the distributed fields)"),
        "num_processes": Field(0, NONNEGATIVE, "processes in the job"),
        "process_id": Field(-1, Range(0, also=(-1,)), "this process"),
        "cpu_devices": Field(0, NONNEGATIVE, "CPU devices per process (testing without accelerators)"),
    },
    "hardware": {
        "peak_flops": Field(0.0, NONNEGATIVE, "per-device peak FLOP/s for MFU; 0 = look up the device"),
    },
}


def _fields(schema: dict = SCHEMA, prefix: str = ""):
    """(dotted path, Field) for every field, in declaration order."""
    for name, value in schema.items():
        if isinstance(value, dict):
            yield from _fields(value, f"{prefix}{name}.")
        else:
            yield prefix + name, value


def base_config() -> ml_collections.ConfigDict:
    """Every field at its default (a small GPT that trains on CPU in minutes), locked."""
    c = ml_collections.ConfigDict()
    for path, field in _fields():
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        node[leaf] = field.default
    c.lock()
    return c


def sections() -> list[str]:
    """The schema's sections (model, data, train, ...)."""
    return [name for name, value in SCHEMA.items() if isinstance(value, dict)]


def describe_fields(section: str = "") -> str:
    """The schema as text: field = default  [valid values]  what it is for; every field,
    or those of one section (ConfigError naming the sections for an unknown one)."""
    if section and section not in sections():
        raise ConfigError(f"--help-config={section}: no such section; sections: "
                          f"{', '.join(sections())}")
    lines = []
    for path, f in _fields():
        if section and not path.startswith(section + "."):
            continue
        valid = (" | ".join(f.valid) if isinstance(f.valid, tuple)
                 else (f"each {f.valid}" if f.each else str(f.valid)) if f.valid else "")
        lines.append(f"  {path} = {f.default!r}" + (f"  [{valid}]" if valid else "") + f"\n      {f.doc}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()`, locked. The file's folder is
    on the import path while it loads, so it can share a helper module with its siblings."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    folder = str(path.resolve().parent)
    before = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"jaxlm_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"--config: {path} defines no get_config()")
        cfg = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # the file's own mistake: one line (JAXLM_TRACEBACK=1: all of it)
        if os.environ.get("JAXLM_TRACEBACK"):
            raise
        raise ConfigError(_config_file_error(e, path.resolve().parent)) from None
    finally:
        sys.path.remove(folder)
        for name in set(sys.modules) - before:  # helpers are re-read with the next file
            if getattr(sys.modules[name], "__file__", "") and \
                    str(pathlib.Path(sys.modules[name].__file__).parent) == folder:
                del sys.modules[name]
    cfg.lock()
    return cfg


def _config_file_error(e: Exception, folder: pathlib.Path) -> str:
    """One line for an exception raised while a config file (or a helper in its folder)
    loaded: the file and line, and for a field the schema lacks, the name it may mean."""
    if isinstance(e, SyntaxError):
        return f"--config: {e.filename}:{e.lineno}: {e.msg}"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if pathlib.Path(f.filename).resolve().parent == folder]
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else str(folder)
    code = f" ({frames[-1].line.strip()})" if frames and frames[-1].line else ""
    name = re.search(r"""Key "(\w+)" does not exist|^'?\\?'(\w+)\\?'""", str(e).strip("'\""))
    if isinstance(e, (AttributeError, KeyError)) and name:
        field = name.group(1) or name.group(2)
        known = _leaf_paths(base_config()) + list(SCHEMA)
        chain = re.findall(r"\.(\w+)", code)  # c.model.num_layer: look under "model"
        if field in chain and chain.index(field) > 0 and chain[chain.index(field) - 1] in SCHEMA:
            parent = chain[chain.index(field) - 1]
            known = [k for k in known if k.startswith(parent + ".")]
        elif field in chain:
            known = [k for k in known if "." not in k]
        close = difflib.get_close_matches(field, [k.rpartition(".")[2] for k in known], n=1)
        hint = next((f" (did you mean config.{k}?)" for k in known
                     if close and k.rpartition(".")[2] == close[0]), "")
        return f"--config: {where}{code}: no config field {field!r}{hint}"
    return (f"--config: {where}{code}: {type(e).__name__}: {e} (JAXLM_TRACEBACK=1 shows the "
            "traceback)")


def _leaf_paths(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out += _leaf_paths(value, name + ".")
        else:
            out.append(name)
    return out


def _parse_value(field: str, text: str, current):
    """Parses `text` into the type of the field's current value."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"config.{field}: expected a bool (true/false), got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(current, tuple) and all(isinstance(x, str) for x in current):
            return tuple(x.strip() for x in text.split(",") if x.strip())  # a,b,c
        raise ConfigError(
            f"config.{field}: expected {type(current).__name__}, got {text!r}") from None
    return _as_type(field, value, current, text)


def _as_type(field: str, value, current, shown):
    """`value` converted to the type of `current` where that loses nothing (int -> float,
    list -> tuple, one item -> 1-tuple); ConfigError when the types differ."""
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = _tuples(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
        value = (value,)
    if type(value) is not type(current):
        raise ConfigError(f"config.{field}: expected {type(current).__name__}, got {shown!r} "
                          f"({type(value).__name__})")
    return value


def _tuples(value):
    """Lists (JSON's arrays) back to the tuples the schema uses, at any depth."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def apply_override(cfg: ml_collections.ConfigDict, field: str, text: str) -> None:
    """Sets `cfg.<field>` from its command-line text, checking name and type."""
    known = _leaf_paths(cfg)
    if field not in known:
        close = difflib.get_close_matches(field, known, n=1)
        hint = f" (did you mean config.{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config field config.{field}{hint}")
    *parents, leaf = field.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = _parse_value(field, text, node[leaf])


# ----------------------------------------------------------------------------- validation


def _check_field(path: str, field: Field, value) -> None:
    valid = field.valid
    if valid is None:
        return
    for x in (value if field.each else (value,)):
        if isinstance(valid, tuple) and x not in valid:
            names = [repr(v) for v in valid]
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
            raise ConfigError(f"config.{path}={x!r}: expected {listed}")
        if isinstance(valid, Range) and x not in valid:
            raise ConfigError(f"config.{path}={x!r} must be {valid}")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks every field against its declared valid values, then the relations between
    fields that single values cannot show; raises ConfigError naming the field."""
    for path, field in _fields():
        node = cfg
        for p in path.split("."):
            node = node[p]
        _check_field(path, field, node)

    m, d, t = cfg.model, cfg.data, cfg.train
    if t.profile_steps and step_range(t.profile_steps) is None:
        raise ConfigError(f"config.train.profile_steps={t.profile_steps!r}: expected A:B with "
                          "0 <= A < B (traces the steps after the A-th up to the B-th), or empty")
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("config.logging.wandb=true needs the wandb package: pip install "
                          "wandb (or jaxlm's extra: pip install -e '.[wandb]')")

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    need(m.d_model % m.num_heads == 0,
         f"config.model.d_model={m.d_model} is not divisible by config.model.num_heads={m.num_heads}")
    need(m.position != "rope" or (m.d_model // m.num_heads) % 2 == 0,
         "config.model.position='rope' needs an even head dim (d_model / num_heads)")
    need(d.seq_len <= m.max_len,
         f"config.data.seq_len={d.seq_len} exceeds config.model.max_len={m.max_len}")
    need(d.name != "mixture" or len(d.mixture) > 0,
         "config.data.name='mixture' needs config.data.mixture=NAME=WEIGHT,...")
    need(t.batch_size % t.microbatches == 0,
         f"config.train.batch_size={t.batch_size} is not divisible by "
         f"config.train.microbatches={t.microbatches}")
    check_pipeline(cfg)
    e = cfg.evaluate
    slots = min(m.cache_len or m.max_len, m.max_len)
    where = (f"config.model.cache_len={m.cache_len}" if 0 < m.cache_len < m.max_len
             else f"config.model.max_len={m.max_len}")
    for f, used in (("max_new_tokens", e.tasks), ("sample_len", e.num_samples)):
        need(not used or e[f] < slots,  # generation needs room for a prompt
             f"config.evaluate.{f}={e[f]} leaves no room for a prompt within {where}")
    need(cfg.optimizer.warmup_steps <= t.steps,
         f"config.optimizer.warmup_steps={cfg.optimizer.warmup_steps} must be in [0, train.steps]")
    pr = cfg.prune
    need(pr.pattern != "unstructured" or pr.sparsity == 0 or pr.end_step >= pr.start_step,
         f"config.prune.end_step={pr.end_step} is before config.prune.start_step="
         f"{pr.start_step}: the schedule would end before it starts")
    need(pr.pattern == "unstructured" or n_of_m(pr.pattern) is not None,
         f"config.prune.pattern={pr.pattern!r}: expected 'unstructured' or N:M with "
         "0 < N < M (e.g. 2:4)")
    need(not cfg.quant.train or cfg.quant.mode != "none",
         "config.quant.train=true needs config.quant.mode (int8_weight or int8): the "
         "quantization that training prepares for")
    lo = cfg.lora
    if lo.rank:
        need(len(lo.targets) > 0, f"config.lora.rank={lo.rank} needs config.lora.targets "
             "(the module paths to adapt, e.g. attn/qkv,mlp/fc_in)")
        need(not cfg.quant.train, "config.quant.train (quantization-aware training) with "
             "config.lora.rank: LoRA trains adapters over a frozen base, which QAT would "
             "quantize as it trains; use one of them (QLoRA: config.quant.mode=int8_weight "
             "without quant.train, over a python -m jaxlm.quantize export)")
        need(cfg.quant.mode != "int8", "config.quant.mode='int8' with config.lora.rank: int8 "
             "inputs are rounded, which stops the adapters' gradients; QLoRA takes "
             "config.quant.mode=int8_weight")
        need(pr.sparsity == 0 and pr.pattern == "unstructured",
             "config.prune with config.lora.rank: pruning masks the trained kernels, and "
             "LoRA freezes them; prune the merged model (python -m jaxlm.export --merge) "
             "in a run of its own")
    dp = cfg.privacy
    if dp.noise_multiplier or dp.target_epsilon:  # the guarantee's preconditions
        need(not (dp.noise_multiplier and dp.target_epsilon),
             f"config.privacy.noise_multiplier={dp.noise_multiplier} and config.privacy."
             f"target_epsilon={dp.target_epsilon}: give one (the other is derived)")
        need(not d.packing, "config.data.packing=true with config.privacy: a packed row "
             "mixes examples, so clipping a row does not bound one example's contribution")
        need(not t.next_sentence, "config.train.next_sentence=true with config.privacy: a "
             "row pairs one example with another's text, so clipping a row does not bound "
             "one example's contribution")
        need(dp.expected_batch_size <= t.batch_size,
             f"config.privacy.expected_batch_size={dp.expected_batch_size} exceeds the "
             f"rows of a step, config.train.batch_size={t.batch_size} (fine-tuning: "
             "config.finetune.batch_size)")
        augment = cfg.finetune.get("augment")
        need(not (augment and augment.insert), "config.finetune.augment.insert with "
             "config.privacy: the inserted words come from the other training texts, so one "
             "example's row carries others' words")


def check_pipeline(cfg: ml_collections.ConfigDict) -> None:
    """What pipeline parallelism (config.mesh.pipeline x dcn_pipeline stages) cannot be
    combined with; a ConfigError naming the field. (The device count is checked with the
    mesh: jaxlm.sharding.mesh_shape.)"""
    stages = cfg.mesh.pipeline * cfg.mesh.dcn_pipeline
    if stages == 1:
        return
    m, what = cfg.model, (f"config.mesh.pipeline={cfg.mesh.pipeline}" if cfg.mesh.dcn_pipeline == 1
                          else f"config.mesh.pipeline x dcn_pipeline={stages}")
    refusals = (
        (not m.scan_layers, "needs config.model.scan_layers=true (the stages are groups of "
                            "the stacked layers)"),
        (m.num_layers % stages != 0, f"does not divide config.model.num_layers={m.num_layers}"),
        (m.num_layers % (stages * cfg.mesh.pipeline_repeats) != 0,
         f"with config.mesh.pipeline_repeats={cfg.mesh.pipeline_repeats}: {stages} x "
         f"{cfg.mesh.pipeline_repeats} groups of layers do not divide config.model.num_layers="
         f"{m.num_layers}"),
        (cfg.train.microbatches < stages,
         f"needs config.train.microbatches >= {stages} (it is {cfg.train.microbatches}): "
         "with fewer microbatches than stages, no iteration keeps every stage busy"),
        (cfg.parallelism != "jit", f"needs config.parallelism='jit' (not {cfg.parallelism!r})"),
        (cfg.lora.rank > 0, "with config.lora.rank: adapters are not pipelined; train LoRA "
                            "without stages"),
        (cfg.quant.mode != "none", f"with config.quant.mode={cfg.quant.mode!r}: quantized "
                                   "models run unrolled"),
        (bool(cfg.privacy.noise_multiplier or cfg.privacy.target_epsilon),
         "with config.privacy: per-example clipping does not run through the stages"),
    )
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"{what} {why}")


def regex(pattern: str, field: str) -> re.Pattern:
    """`pattern` compiled; a ConfigError naming config.<field> when it is not a regular
    expression (config fields that select parameters or modules by path)."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"config.{field}: {pattern!r} is not a regular expression "
                          f"({e})") from None


def n_of_m(pattern: str) -> tuple[int, int] | None:
    """(N, M) of an N:M sparsity pattern such as "2:4"; None if `pattern` is not one."""
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        return None
    n, m = (int(p) for p in parts)
    return (n, m) if 0 < n < m else None


def step_range(spec: str) -> tuple[int, int] | None:
    """(A, B) of config.train.profile_steps "A:B" (0 <= A < B); None if empty or malformed."""
    a, sep, b = spec.partition(":")
    if not (sep and a.strip().isdigit() and b.strip().isdigit()):
        return None
    return (int(a), int(b)) if int(a) < int(b) else None


# ----------------------------------------------------------------------------- serialised form


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values (tuples become lists): what config.json, checkpoint
    and export metadata hold. `from_dict` reads it back."""
    return json.loads(json.dumps(cfg.to_dict(), default=list))


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_dict(saved: dict, where: str = "the saved config") -> ml_collections.ConfigDict:
    """A config from `to_dict` output (e.g. a checkpoint's), on today's schema: fields saved
    by an older jaxlm that it lacked keep their defaults; a field this jaxlm does not know
    is a ConfigError naming it."""
    cfg = base_config()
    known = set(_leaf_paths(cfg))

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            path = prefix + key
            if isinstance(value, dict) and path not in known:
                walk(value, path + ".")
            elif path not in known:
                raise ConfigError(f"{where} has config field {path}, which this jaxlm does not "
                                  "know (written by a newer version?)")
            else:
                *parents, leaf = path.split(".")
                target = cfg
                for p in parents:
                    target = target[p]
                target[leaf] = _as_type(path, _tuples(value), target[leaf], value)

    walk(saved, "")
    return cfg
