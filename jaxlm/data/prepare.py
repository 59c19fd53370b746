"""Make TFDS datasets on disk, offline: from your own text files, or a catalog dataset from
files you already have. Preparing needs TensorFlow; reading (jaxlm.data.token_cache) does
not, since everything is written as array_record.

Your own corpus (.txt files, one document per file / paragraph / line; or .jsonl, one
document per line from the field --text_key) becomes the TFDS dataset NAME:

    python -m jaxlm.data.prepare text --name=my_corpus --data_dir=~/tensorflow_datasets \
        --split=train:a.txt,b.txt --split=validation:c.txt [--unit=paragraph]

A catalog dataset whose source files are already on disk (TFDS "manual_dir": nothing is
downloaded), e.g. tiny Shakespeare from shared/data:

    python -m jaxlm.data.prepare tfds --name=tiny_shakespeare --data_dir=~/tensorflow_datasets \
        --manual_dir=../shared/data/tinyshakespeare

Either way train with `--config.data.name=NAME --config.data.data_dir=DIR`. Setting
config.data.manual_dir instead makes the training job prepare a catalog dataset itself the
first time (run that once on one host before a multi-host job).
"""

from __future__ import annotations

import re

from jaxlm import cli
from jaxlm.data.text_dataset import prepare_text
from jaxlm.data.text_files import UNITS
from jaxlm.data.tfds_split import prepare_catalog
from jaxlm.errors import ConfigError

FLAGS = {
    "text": [cli.Flag("name", "the dataset's name", None),
             cli.Flag("data_dir", "TFDS data_dir to write it under", None, metavar="DIR"),
             cli.Flag("split", "a split and its files; repeat for more splits", None,
                      repeat=True, metavar="SPLIT:FILE[,FILE...]"),
             cli.Flag("unit", "document unit of .txt files: " + ", ".join(UNITS), "file"),
             cli.Flag("text_key", "field of each JSONL line", "text"),
             cli.Flag("overwrite", "replace a dataset of that name made from other files",
                      switch=True)],
    "tfds": [cli.Flag("name", "a TFDS catalog dataset, e.g. tiny_shakespeare", None),
             cli.Flag("data_dir", "TFDS data_dir to write it under", None, metavar="DIR"),
             cli.Flag("manual_dir", "folder holding its source files", None, metavar="DIR")],
}


# What TFDS reads back: a dataset name in snake case (tfds.builder looks a name up in that
# form), a split name of word characters and '-' (its split grammar, tfds.core.splits).
DATASET_NAME = re.compile(r"[a-z][a-z0-9_]*")
SPLIT_NAME = re.compile(r"[\w-]+")


def check_name(name: str) -> None:
    if not DATASET_NAME.fullmatch(name):
        raise ConfigError(f"--name={name}: TFDS reads back only snake-case names (lower-case "
                          "letters, digits and '_', starting with a letter), e.g. my_corpus")


def main(argv):
    args = cli.parse(argv, "jaxlm.data.prepare", __doc__, config=False, workdir=False,
                     commands=FLAGS)
    f = args.flags
    if args.command == "tfds":
        print(f"prepared {prepare_catalog(f['name'], f['data_dir'], f['manual_dir'])}")
        return
    check_name(f["name"])
    splits = {}
    for s in f["split"]:
        split, _, files = s.partition(":")
        if not files or not all(files.split(",")):
            raise ConfigError(f"--split={s}: expected SPLIT:FILE[,FILE...]")
        if not SPLIT_NAME.fullmatch(split):
            raise ConfigError(f"--split={s}: the split name {split!r} is not one TFDS can read "
                              "back; use letters, digits, '_' and '-' (e.g. train, dev_2)")
        if split in splits:
            raise ConfigError(f"--split={s}: split {split!r} is given twice; list all its "
                              "files in one --split")
        splits[split] = files.split(",")
    counts = prepare_text(f["name"], splits, f["data_dir"], unit=f["unit"],
                          text_key=f["text_key"], overwrite=f["overwrite"])
    print(f"prepared {f['name']} under {f['data_dir']}: documents per split {counts}")


if __name__ == "__main__":
    cli.run(main)
