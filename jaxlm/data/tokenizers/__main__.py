"""python -m jaxlm.data.tokenizers train --input=FILES --vocab_size=N --output=MODEL:
trains a SentencePiece model on local .txt / .jsonl files (jaxlm.data.tokenizers.spm)."""

import json

from jaxlm import cli
from jaxlm.data.tokenizers.spm import train_sentencepiece

FLAGS = {"train": [
    cli.Flag("input", "comma-separated .txt / .jsonl files", None, metavar="FILES"),
    cli.Flag("vocab_size", "pieces in the model, special pieces included", None, metavar="N"),
    cli.Flag("output", "model file to write, e.g. spm.model", None, metavar="MODEL"),
    cli.Flag("model_type", "unigram or bpe", "unigram"),
    cli.Flag("text_key", "field of each JSONL line", "text"),
    cli.Flag("max_sentences", "train on a random sample of this many lines (0 = all)", "0"),
]}


def main(argv):
    args = cli.parse(argv, "jaxlm.data.tokenizers", __doc__, config=False, workdir=False,
                     commands=FLAGS)
    f = args.flags
    tok = train_sentencepiece(f["input"].split(","), cli.integer(f, "vocab_size", 1),
                              f["output"], model_type=cli.choice(f, "model_type", ("unigram", "bpe")),
                              text_key=f["text_key"],
                              max_sentences=cli.integer(f, "max_sentences", 0))
    print(f"wrote {f['output']}: {json.dumps(tok.to_dict())}; use "
          f"--config.data.tokenizer=sentencepiece:{f['output']}")
    return tok


if __name__ == "__main__":
    cli.run(main)
