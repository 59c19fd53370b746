"""Few-shot tasks about the built-in synthetic world (jaxlm.data.synthetic), whose corpus
the debug models pretrain on.

  rule_mc        infer a string rule from k demonstrations ("kaz -> kAz"), pick the query
                 word under the right rule among all rules' outputs (words never in the
                 corpus; chance 1/number of rules)
  rule_exact     the same, generating the output (exact match)
  facts_mc       recall an entity's city, job or color ("Bako lives in" -> " Tesmor.")
  arithmetic_mc  two-digit + one-digit sums, distractors the sum +-1, +-2, +-10

Prompts have no trailing space; answers follow the " " target delimiter; demonstrations
are separated by "\\n". Demonstrations come from a pool disjoint from the examples, in an
order fixed by (config.evaluate.seed, example) and independent of k, so the 4-shot set
extends the 1-shot set; a rule example's demonstrations use its own rule, and no
demonstration repeats the example's prompt. Documents are dicts {prompt, choices (without
the delimiter), label, group}.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable

import numpy as np

from jaxlm.data import synthetic
from jaxlm.evaluate.tasks.base import Task

NAMES = ("rule_mc", "rule_exact", "facts_mc", "arithmetic_mc")


def _doc(prompt: str, choices, label: int, group: str = "") -> dict:
    return {"prompt": prompt, "choices": list(choices), "label": int(label), "group": group}


def group_shots(task: Task, index: int, k: int, rng=None, *, seed: int = 0) -> list[dict]:
    """The k demonstrations of document `index` (module docstring)."""
    doc = task.docs[index]
    # crc32 rather than hash(): Python salts str hashes per process.
    key = zlib.crc32(f"{doc['group']}\0{doc['prompt']}".encode())
    order = np.random.default_rng([seed, key]).permutation(len(task.fewshot_docs))
    chosen: list[dict] = []
    for i in order:
        shot = task.fewshot_docs[i]
        if (doc["group"] and shot["group"] != doc["group"]) or shot["prompt"] == doc["prompt"]:
            continue
        chosen.append(shot)
        if len(chosen) == k:
            return chosen
    raise ValueError(f"task {task.name}: only {len(chosen)} demonstrations available for "
                     f"group {doc['group']!r}, {k} requested")


def _task(name: str, kind: str, docs, shots, seed: int, **extra) -> Task:
    return Task(name=name, kind=kind, docs=tuple(docs), fewshot_docs=tuple(shots),
                text=lambda d: d["prompt"], choices=lambda d: d["choices"],
                target=lambda d: d["label"] if kind == "multiple_choice" else d["choices"][d["label"]],
                metrics=("acc", "acc_norm") if kind == "multiple_choice" else ("exact_match",),
                fewshot_delimiter="\n", until=("\n",), fewshot_from_docs=False,
                sampler=functools.partial(group_shots, seed=seed), source="synthetic", **extra)


def _distinct_words(world: synthetic.World, rng: np.random.Generator, count: int,
                    keep: Callable[[str], bool], taken: set[str]) -> list[str]:
    """`count` new held-out words satisfying `keep`; adds them to `taken`."""
    words = []
    while len(words) < count:
        word = world.random_word(rng, held_out=True)
        if word not in taken and keep(word):
            taken.add(word)
            words.append(word)
    return words


def _rule_tasks(world: synthetic.World, num_examples: int, shots_per_rule: int,
                seed: int) -> tuple[Task, Task]:
    """In-context rule inference, as multiple choice and as exact match. Without
    demonstrations the rule is unknowable; each demonstration narrows it down."""
    rng = world.rng("rule_tasks")
    rules = world.rules
    taken: set[str] = set()
    arrow = synthetic.RULE_ARROW
    shots = [_doc(word + arrow, [synthetic.RULES[rule](word)], 0, rule)
             for rule in rules
             for word in _distinct_words(world, rng, shots_per_rule, lambda w: True, taken)]

    def unambiguous(word: str) -> bool:  # every rule gives a different output
        return len({synthetic.RULES[r](word) for r in rules}) == len(rules)

    docs = []
    for i, word in enumerate(_distinct_words(world, rng, num_examples, unambiguous, taken)):
        gold = rules[i % len(rules)]  # balanced, so a fixed preference scores exactly chance
        order = [rules[j] for j in rng.permutation(len(rules))]
        docs.append(_doc(word + arrow, [synthetic.RULES[r](word) for r in order],
                         order.index(gold), gold))
    mc = _task("rule_mc", "multiple_choice", docs, shots, seed,
               description=f"infer a string rule from demonstrations ({len(rules)} choices)")
    exact = _task("rule_exact", "generate_until",
                  [_doc(d["prompt"], [d["choices"][d["label"]]], 0, d["group"]) for d in docs],
                  shots, seed,
                  description="infer a string rule from demonstrations, generate the output",
                  # A model that can apply every rule but ignores the demonstrations.
                  baseline=1.0 / len(rules))
    return mc, exact


def _facts_task(world: synthetic.World, num_examples: int, seed: int, num_choices: int = 4) -> Task:
    """Recall of an entity's attribute, learned in pretraining. Demonstrations are other
    entities' facts of the same attribute: they teach the format, not the answer."""
    rng = world.rng("facts_task")
    pairs = [(e, a) for e in world.entities for a in synthetic.FACT_PHRASINGS]
    order = rng.permutation(len(pairs))
    num_examples = min(num_examples, len(pairs) // 2)  # the other half are shots
    docs, shots = [], []
    for n, i in enumerate(order):
        entity, attr = pairs[i]
        prompt, ending = synthetic.fact_prompt(attr, entity.name)
        gold = entity.facts[attr]
        if n < num_examples:
            others = [v for v in world.attribute_values[attr] if v != gold]
            values = [gold] + [str(v) for v in rng.choice(others, num_choices - 1, replace=False)]
            values = [values[j] for j in rng.permutation(num_choices)]
            docs.append(_doc(prompt, [f"{v}{ending}" for v in values], values.index(gold), attr))
        else:
            shots.append(_doc(prompt, [f"{gold}{ending}"], 0, attr))
    return _task("facts_mc", "multiple_choice", docs, shots, seed,
                 description=f"recall an entity's city/job/color ({num_choices} choices)")


def _arithmetic_task(world: synthetic.World, num_examples: int, seed: int) -> Task:
    """Sums learned in pretraining; choosing well needs both the units digit and the carry."""
    rng = world.rng("arithmetic_task")
    lo, hi = world.addend_range
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(1, 10)]
    num_examples = min(num_examples, len(pairs) // 2)  # the other half are shots
    order = rng.permutation(len(pairs))
    docs, shots = [], []
    for n, i in enumerate(order):
        a, b = pairs[i]
        prompt, gold = f"{a} + {b} =", a + b
        if n < num_examples:
            near = [gold + d for d in (-10, -2, -1, 1, 2, 10) if 10 <= gold + d <= 99]
            values = [gold] + [int(v) for v in rng.choice(near, 3, replace=False)]
            values = [values[j] for j in rng.permutation(len(values))]
            docs.append(_doc(prompt, [str(v) for v in values], values.index(gold)))
        else:
            shots.append(_doc(prompt, [str(gold)], 0))
    return _task("arithmetic_mc", "multiple_choice", docs, shots, seed,
                 description="two-digit + one-digit addition (4 choices)")


def synthetic_tasks(world: synthetic.World, num_examples: int = 200, seed: int = 0,
                    shots_per_rule: int = 64) -> dict[str, Task]:
    """All synthetic tasks of `world`, by name; deterministic in world.seed. The facts and
    arithmetic tasks have at most half of their (entity, attribute) or (a, b) pairs as
    examples, the rest being demonstrations: 150 and 180 in the default world."""
    rule_mc, rule_exact = _rule_tasks(world, num_examples, shots_per_rule, seed)
    tasks = [rule_mc, rule_exact, _facts_task(world, num_examples, seed),
             _arithmetic_task(world, num_examples, seed)]
    return {t.name: t for t in tasks}

