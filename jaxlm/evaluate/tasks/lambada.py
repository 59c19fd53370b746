"""LAMBADA, OpenAI's version (Paperno et al. 2016; Radford et al. 2019): predict the last
word of a passage.

lm-eval task `lambada_openai`: context = the text up to its last space, continuation =
" " + the last word; one log-likelihood request per passage. acc: greedy decoding gives
exactly the last word's tokens; perplexity: exp(-mean log-likelihood of the last word).
Demonstrations (rarely used) repeat the passage with the target after a " " delimiter,
as lm-eval writes them. Files: FOLDER/test.jsonl (text); lm-eval has no other split,
so demonstrations come from the test split and a passage can be its own demonstration, as
in lm-eval (config.evaluate.fewshot_exclude_self forbids it, marked non-standard).
"""

from jaxlm.evaluate.tasks.base import Splits, local_task


def _check(doc):
    return None if " " in doc["text"].strip() else "a passage needs at least two words"


def load(reader, name="lambada_openai"):
    return local_task(
        name, reader, ("text",), check=_check, splits=Splits(train=None, validation=None, test="test"),
        kind="loglikelihood",
        text=lambda d: d["text"].rsplit(" ", 1)[0], choices=None,
        target=lambda d: " " + d["text"].rsplit(" ", 1)[1], metrics=("acc", "perplexity"),
        description="last word of a passage")
