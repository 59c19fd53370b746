"""python -m jaxlm: the commands, one line each (each takes --help)."""

COMMANDS = [
    ("jaxlm.main", "the main job: pretrain, then few-shot evaluate (README, first command)"),
    ("jaxlm.train", "pretraining only; re-running on a workdir resumes it"),
    ("jaxlm.evaluate", "the few-shot suite (or lm-eval tasks) on a workdir or an export"),
    ("jaxlm.finetune", "fine-tuning for classification from a pretrained model; --evaluate"),
    ("jaxlm.squad", "SQuAD v1.1 / v2.0 fine-tuning: a span head, official EM and F1"),
    ("jaxlm.glue", "the GLUE suite: every task over learning rates and seeds, the table"),
    ("jaxlm.export", "the params of a checkpoint as an export, for any mesh"),
    ("jaxlm.quantize", "an int8 export of a run or an export"),
    ("jaxlm.serve", "an OpenAI-compatible HTTP server for a workdir or an export"),
    ("jaxlm.plan", "compile for a target topology without it: memory per device, warnings"),
    ("jaxlm.interop", "Hugging Face GPT-2 / BERT weights and tokenizers in and out"),
    ("jaxlm.upgrade", "checkpoints of an older layout converted to today's"),
    ("jaxlm.data.prepare", "TFDS datasets made offline from text files or source files"),
    ("jaxlm.data.tokenizers", "train a SentencePiece tokenizer"),
]


def main() -> None:
    width = max(len(name) for name, _ in COMMANDS)
    print("jaxlm commands (python -m COMMAND --help for each; --help-config for the config "
          "fields):\n")
    for name, what in COMMANDS:
        print(f"  python -m {name:<{width}}  {what}")


if __name__ == "__main__":
    main()
