"""SQuAD fine-tuning (v1.1 and v2.0): a pretrained BERT, a fresh span-extraction head.

    python -m jaxlm.squad --config=configs/bert/squad.py --workdir=DIR \
        --config.finetune.init=runs/bert_debug \
        --config.finetune.train_data=train-v2.0.json \
        --config.finetune.validation_data=dev-v2.0.json --config.finetune.squad_v2=true

Both data fields name SQuAD JSON files; every answer's offset is checked against its context
first (jaxlm.data.squad: a mismatch is one line naming the file and question, and nothing is
written). Each question becomes windows "[CLS] question [SEP] context part [SEP]" over its
context, config.finetune.doc_stride context tokens apart; a window is labelled with the
answer's first and last token when it holds the whole answer, else with [CLS] (no answer
here). Training is fine-tuning's (jaxlm.finetuning: the pretraining loop, its checkpoints
and exact resume: re-running the command continues an interrupted run) with the
span_extraction objective, for config.finetune.epochs passes over the training windows.
After every epoch the validation questions are answered (jaxlm.evaluate.squad.decode: the
best span over a question's windows; v2.0: "" when the no-answer score wins by
config.finetune.null_threshold) and scored with the official exact match and F1; the params
of the best epoch by F1 are kept in WORKDIR/best. The run ends by answering with them once
more and writes WORKDIR/results.json (EM, F1, HasAns/NoAns for v2.0, the best epoch, every
epoch's scores) and WORKDIR/predictions.json ({id: answer}, the input of the official
evaluation scripts). For v2.0 the scores also hold the no-answer threshold that would have
been best on the validation questions (best_exact/best_f1 and their _thresh, as the
official v2.0 script reports them), and WORKDIR/null_odds.json the margin of each question
(the script's --na-prob-file); tune config.finetune.null_threshold with them.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib

import jax
import ml_collections

from jaxlm import cli, finetuning, models
from jaxlm import workdir as workdir_lib
from jaxlm.data import squad as squad_data
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.evaluate import squad as squad_eval
from jaxlm.runlog import read_history

OBJECTIVE = "span_extraction"


def check_config(cfg: ml_collections.ConfigDict, tokenizer) -> None:
    """Refuses, naming the field, a config that cannot train a span head on windows."""
    m, ft, L = cfg.model, cfg.finetune, cfg.data.seq_len
    if OBJECTIVE not in models.family(m.arch).objectives:
        raise ConfigError(f"config.model.arch={m.arch!r} has no span-extraction head "
                          "(SQuAD fine-tunes BERT: configs/bert/squad.py)")
    if not m.span_head:
        raise ConfigError("config.model.span_head=false: SQuAD trains the span head; set it "
                          "true (configs/bert/squad.py does)")
    if m.num_classes:
        raise ConfigError(f"config.model.num_classes={m.num_classes}: a SQuAD model answers "
                          "with its span head only; set it to 0")
    if ft.glue_task:
        raise ConfigError(f"config.finetune.glue_task={ft.glue_task!r} is a GLUE task; "
                          "python -m jaxlm.squad reads SQuAD files: leave it empty")
    if cfg.lora.rank:
        raise ConfigError(f"config.lora.rank={cfg.lora.rank}: LoRA trains a classification "
                          "head with its adapters, not the span head; SQuAD runs without LoRA")
    if cfg.privacy.noise_multiplier or cfg.privacy.target_epsilon:
        raise ConfigError("config.privacy with SQuAD: a question's windows are separate rows, "
                          "so clipping a row does not bound one question's contribution")
    if not tokenizer.bert_ids:
        raise ConfigError(f"config.data.tokenizer={cfg.data.tokenizer!r} has no [CLS] and "
                          "[SEP]; SQuAD windows need them (e.g. byte:bert)")
    room = L - ft.max_query_len - 3  # [CLS] question [SEP] context [SEP]
    if room < 1:
        raise ConfigError(f"config.finetune.max_query_len={ft.max_query_len} leaves no room "
                          f"for context in config.data.seq_len={L}")
    if ft.doc_stride > room:
        raise ConfigError(f"config.finetune.doc_stride={ft.doc_stride} is longer than the "
                          f"context part of a window (config.data.seq_len - max_query_len - 3 "
                          f"= {room} tokens): windows would skip context")


def read_questions(cfg, field: str) -> list[squad_data.Question]:
    """The questions of config.finetune.<field>, a SQuAD JSON file, checked."""
    spec = cfg.finetune[field]
    path = pathlib.Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"config.finetune.{field}={spec!r}: no such file; python -m "
                          "jaxlm.squad reads SQuAD JSON files")
    questions = squad_data.read(path)
    impossible = next((q for q in questions if q.impossible), None)
    if impossible is not None and not cfg.finetune.squad_v2:
        raise ConfigError(f"{impossible.where}: a question without an answer (SQuAD v2.0), "
                          "and config.finetune.squad_v2=false: set it true")
    return questions


def windows(cfg, tokenizer, questions) -> squad_data.Windows:
    ft = cfg.finetune
    return squad_data.windows(questions, tokenizer, cfg.data.seq_len, ft.doc_stride,
                              ft.max_query_len)


def answer(cfg, setup, params, questions, win: squad_data.Windows) -> tuple[dict, dict]:
    """({question id: predicted answer}, its scores) of `params`. v2.0: "" for no answer,
    and the scores include the no-answer threshold that would have been best on these
    questions (best_f1_thresh; jaxlm.evaluate.squad.best_threshold)."""
    ft = cfg.finetune
    start_NxL, end_NxL = squad_eval.span_logits(setup, params, win, cfg.evaluate.batch_size)
    spans = squad_eval.best_spans(questions, win, start_NxL, end_NxL, ft.n_best,
                                  ft.max_answer_len)
    if not ft.squad_v2:
        predictions = {qid: text for qid, (text, _) in spans.items()}
        return predictions, squad_eval.score(questions, predictions)
    predictions = {qid: "" if margin > ft.null_threshold else text
                   for qid, (text, margin) in spans.items()}
    return predictions, (squad_eval.score(questions, predictions)
                         | squad_eval.best_threshold(questions, spans)
                         | {"null_odds": {qid: margin for qid, (_, margin) in spans.items()}})


class Validation(finetuning.Validation):
    """finetuning.Validation (best params by config.finetune.best_metric, kept in
    WORKDIR/best) scoring answers to the validation questions: official EM and F1."""

    def __init__(self, cfg, workdir: pathlib.Path, questions, win: squad_data.Windows):
        super().__init__(cfg, workdir, source=None)
        self.questions, self.win = questions, win

    def measure(self, setup, params) -> dict:
        _, found = answer(self.cfg, setup, params, self.questions, self.win)
        found.pop("null_odds", None)
        return found


def squad(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Trains (or resumes) the SQuAD run of `cfg` in `workdir`; returns the results. All
    data is read and checked before anything is written."""
    from jaxlm.setup import build
    from jaxlm.train import loop

    tokenizer = get_tokenizer(cfg.data.tokenizer)
    check_config(cfg, tokenizer)
    workdir = workdir_lib.check(workdir, must_exist=False)
    train_q, val_q = read_questions(cfg, "train_data"), read_questions(cfg, "validation_data")
    train_win, val_win = windows(cfg, tokenizer, train_q), windows(cfg, tokenizer, val_q)
    source = squad_data.WindowSource(train_win, cfg.finetune.train_data, cfg.train.seed)
    picked = copy.deepcopy(cfg)
    picked.finetune.best_metric = "f1"  # the official F1, in percent
    run = finetuning.run_config(picked, len(source), objective=OBJECTIVE)
    validation = Validation(run, workdir, val_q, val_win)
    hooks = loop.Hooks(source=source, evaluate=validation, evaluate_every=run.checkpoint.every,
                       init_params=(lambda setup: finetuning.load_pretrained(run, setup))
                       if cfg.finetune.init else None)
    summary = loop.train(run, workdir, hooks=hooks)
    if summary["preempted"]:
        return {"train": summary}

    setup = build(run)
    params, best_step = finetuning.best_params(run, setup, workdir)
    predictions, found = answer(run, setup, params, val_q, val_win)
    null_odds = found.pop("null_odds", None)
    steps_per_epoch = run.checkpoint.every
    out = {"version": "v2.0" if cfg.finetune.squad_v2 else "v1.1",
           "validation": found, "best_step": best_step,
           "best_epoch": math.ceil(best_step / steps_per_epoch),
           "train_questions": len(train_q), "train_windows": len(train_win.ids),
           "validation_questions": len(val_q), "validation_windows": len(val_win.ids),
           "epochs": [{k[11:]: v for k, v in h.items() if k.startswith("validation_")}
                      | {"step": h["step"]} for h in read_history(workdir)
                      if "validation_f1" in h],
           "train": summary}
    if jax.process_index() == 0:
        workdir_lib.write_text(workdir / "predictions.json", json.dumps(predictions, indent=2))
        if null_odds is not None:  # the official v2.0 script's --na-prob-file
            workdir_lib.write_text(workdir / "null_odds.json", json.dumps(null_odds, indent=2))
        workdir_lib.write_text(workdir / "results.json", json.dumps(out, indent=2))
        print(f"\nSQuAD {out['version']} validation at the best step ({best_step}, epoch "
              f"{out['best_epoch']}, by F1): exact {found['exact']:.2f}  f1 {found['f1']:.2f}",
              flush=True)
        if null_odds is not None:
            print(f"with config.finetune.null_threshold={found['best_f1_thresh']:g} (the best "
                  f"on these questions) f1 would be {found['best_f1']:.2f}", flush=True)
    return out


def main(argv) -> dict:
    args = cli.parse(argv, "jaxlm.squad", __doc__)
    cli.start(args.config)
    return squad(args.config, args.workdir)


if __name__ == "__main__":
    cli.run(main)
