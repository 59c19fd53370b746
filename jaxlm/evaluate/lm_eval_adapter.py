"""A jaxlm model as an lm-evaluation-harness model, so that any harness task runs against a
jaxlm checkpoint or export:

    import lm_eval
    from jaxlm.evaluate.lm_eval_adapter import JaxlmLM
    lm = JaxlmLM.load(config, workdir)        # the checkpoint jaxlm.evaluate would score
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"], num_fewshot=0)

(`python -m jaxlm.evaluate --config.evaluate.harness_tasks=...` does this for any task of
lm-eval's catalog, offline, on local data: jaxlm.evaluate.harness.)

lm-eval encodes the requests itself (TemplateLM: the whole string once, split at the
context) through `tok_encode`, which prepends the same prefix token as jaxlm's scorer
(config.evaluate.prefix); the token-level scoring, rolling windows and generation are
jaxlm's (jaxlm.evaluate.scoring; for BERT, pseudo-log-likelihoods). lm-eval is an optional dependency: `pip install -e
'.[test]'` installs it.
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM

from jaxlm.evaluate.scoring import Scorer


class JaxlmLM(TemplateLM):
    def __init__(self, scorer: Scorer):
        super().__init__()
        self.scorer = scorer

    @classmethod
    def load(cls, cfg, workdir) -> "JaxlmLM":
        """The params config.evaluate points at (the workdir's checkpoint or an export)."""
        from jaxlm import checkpoint
        from jaxlm.evaluate.scoring import make_scorer
        from jaxlm.setup import build
        setup = build(cfg)
        params, _ = checkpoint.load_params(cfg, setup, workdir)
        return cls(make_scorer(setup, params, cfg.evaluate))

    @property
    def eot_token_id(self) -> int:
        return self.scorer.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.scorer.tok.encode(string)
        return ids if add_special_tokens is False else self.scorer.prefix + ids

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        return self.scorer.score_tokens([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations, cut at `until`."""
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or [self.scorer.tok.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            new = min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 1)
            out += self.scorer.generate([context], new,
                                        temperature=temperature, stop=until)
        return out


# ----------------------------------------------------------------------------- local tasks

# lm-eval's own definitions (paths under lm_eval/tasks) of the standard tasks jaxlm has.
TASK_YAMLS = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml",
              "arc_challenge": "arc/arc_challenge.yaml", "winogrande": "winogrande/default.yaml",
              "lambada_openai": "lambada/lambada_openai.yaml",
              "copa": "super_glue/copa/default.yaml", "boolq": "super_glue/boolq/default.yaml",
              "sst2": "glue/sst2/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml"}


def hf_layout(name: str, doc: dict) -> dict:
    """A document in the field layout of lm-eval's Hugging Face copy of the dataset (ARC
    flattens the question, BoolQ's gold is `label`); others are the original layout."""
    if name.startswith("arc"):
        q = doc["question"]
        return {"id": doc["id"], "question": q["stem"], "answerKey": doc["answerKey"],
                "choices": {"text": [c["text"] for c in q["choices"]],
                            "label": [c["label"] for c in q["choices"]]}}
    if name == "boolq":
        return {"question": doc["question"], "passage": doc["passage"],
                "label": int(doc["answer"]) if "answer" in doc else int(doc["label"])}
    return doc


def evaluate_local(lm, names, data_dir, folder, k: int, limit: int | None = None,
                   model_args: str | None = None) -> dict:
    """lm-eval's own definitions of jaxlm's standard tasks `names`, as shipped, run by
    lm-eval on the files jaxlm reads (`data_dir`/<task>/<split>.jsonl). The task files
    written into `folder` include the shipped YAML and replace only where the data is
    (dataset_path, dataset_name, dataset_kwargs: the local splits in lm-eval's field
    layout); which split is scored, where demonstrations come from and how they are drawn
    stay lm-eval's. Returns simple_evaluate's results (every request in
    res["samples"][f"{name}_local"]). `lm` is an lm-eval model, or the name of one of
    lm-eval's own (e.g. "local-completions", with `model_args`: a served jaxlm model)."""
    import json
    import pathlib

    import lm_eval
    from lm_eval.tasks import TaskManager

    from jaxlm.evaluate.harness import local_task_yaml, offline
    offline()
    folder, installed = pathlib.Path(folder), pathlib.Path(lm_eval.__file__).parent / "tasks"
    for name in names:
        files = {}
        for split in ("train", "validation", "test"):
            source = pathlib.Path(data_dir) / name / f"{split}.jsonl"
            if source.is_file():
                docs = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
                files[split] = folder / name / f"{split}.jsonl"
                files[split].parent.mkdir(parents=True, exist_ok=True)
                files[split].write_text("".join(json.dumps(hf_layout(name, d)) + "\n" for d in docs))
        (folder / f"{name}_local.yaml").write_text(
            local_task_yaml(installed / TASK_YAMLS[name], f"{name}_local", files))
    return lm_eval.simple_evaluate(model=lm, model_args=model_args, tasks=[f"{n}_local" for n in names],
                                   num_fewshot=k, limit=limit, log_samples=True,
                                   bootstrap_iters=10, task_manager=TaskManager(include_path=str(folder)))
