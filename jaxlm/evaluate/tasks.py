"""Few-shot tasks: examples, demonstrations, and how a k-shot prompt is written.

`Example` and `Task` are generic: the synthetic tasks below use them today, and real
benchmarks (HellaSwag, PIQA, ARC, LAMBADA read from JSONL) will use them later.

Two kinds of task:
  multiple_choice  the model scores each `prompt + choice` by log-likelihood and picks
                   the highest; correct if it is choices[label].
  exact_match      the model greedily continues the prompt; correct if the text up to
                   the first newline equals choices[label] exactly.

Conventions the synthetic tasks keep (and real ones should): a prompt has no trailing
space and every choice starts with one (" Tesmor."), so all choices are scored from the
same boundary; within a task every choice ends the same way (with "." or with nothing)
and, where possible, all choices have the same length.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from jaxlm.data import synthetic

KINDS = ("multiple_choice", "exact_match")


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str  # what the model conditions on, e.g. "kaz ->"
    choices: tuple[str, ...]  # candidate continuations, e.g. (" kAz", " KAZ", ...)
    label: int  # index of the gold continuation
    # Demonstrations for this example come only from shots of the same group, e.g. the
    # in-context rule it uses; "" draws from all shots.
    group: str = ""

    def __post_init__(self):
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label {self.label} out of range for {len(self.choices)} choices")

    @property
    def answer(self) -> str:
        return self.choices[self.label]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # one of KINDS
    examples: tuple[Example, ...]  # what is scored
    shots: tuple[Example, ...]  # pool the k demonstrations are drawn from
    shot_separator: str = "\n"  # between demonstrations, and before the example
    description: str = ""  # one line for the results table
    # Accuracy of a no-skill strategy, when the default in `chance` is not the right one.
    baseline: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def chance(self) -> float:
        """The accuracy to beat.

        `baseline` when given; otherwise for multiple choice the mean of 1/len(choices)
        (uniform guessing), and for exact match the accuracy of always answering the
        most frequent gold answer.
        """
        if self.baseline is not None:
            return self.baseline
        if not self.examples:
            return 0.0
        if self.kind == "multiple_choice":
            return float(np.mean([1.0 / len(e.choices) for e in self.examples]))
        counts = collections.Counter(e.answer for e in self.examples)
        return counts.most_common(1)[0][1] / len(self.examples)


def demonstrations(task: Task, example: Example, k: int, rng_seed: int = 0) -> list[Example]:
    """The k shots shown before `example`.

    Shots are taken in an order fixed by (rng_seed, example) and independent of k, so
    the 4-shot set extends the 1-shot set and accuracy-vs-k compares like with like.
    Shots of another group, or with the example's own prompt, are skipped.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:
        return []
    # crc32 rather than hash(): Python salts str hashes per process.
    key = zlib.crc32(f"{example.group}\0{example.prompt}".encode())
    order = np.random.default_rng([rng_seed, key]).permutation(len(task.shots))
    chosen: list[Example] = []
    for i in order:
        shot = task.shots[i]
        if (example.group and shot.group != example.group) or shot.prompt == example.prompt:
            continue
        chosen.append(shot)
        if len(chosen) == k:
            return chosen
    raise ValueError(f"task {task.name}: only {len(chosen)} shots available for "
                     f"group {example.group!r}, {k} requested")


def format_prompt(task: Task, example: Example, k: int, rng_seed: int = 0) -> str:
    """The k-shot prompt: demonstrations (prompt + gold answer) then the example's prompt.

        bqx -> bqx\\nkaz -> kAz\\nmoi ->       (k=2, separator "\\n")
    """
    parts = [shot.prompt + shot.answer for shot in demonstrations(task, example, k, rng_seed)]
    return task.shot_separator.join(parts + [example.prompt])


# ----------------------------------------------------------------------------- synthetic

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


def _rule_shot(word: str, rule: str) -> Example:
    """A rule line as a single-answer example ("kaz ->", (" kAz",)), grouped by its rule."""
    return Example(prompt=word + synthetic.RULE_ARROW,
                   choices=(" " + synthetic.RULES[rule](word),), label=0, group=rule)


def _rule_tasks(world: synthetic.World, num_examples: int,
                shots_per_rule: int) -> tuple[Task, Task]:
    """In-context rule inference, as multiple choice and as exact match.

    Each example uses one rule: its demonstrations (same group) show the rule on other
    words, and its choices are the query word under every rule. Without demonstrations
    the rule is unknowable (chance = 1/num_rules); each demonstration narrows it down.
    All words are held out of the corpus.
    """
    rng = world.rng("rule_tasks")
    rules = world.rules
    taken: set[str] = set()
    shots = tuple(
        _rule_shot(word, rule)
        for rule in rules
        for word in _distinct_words(world, rng, shots_per_rule, lambda w: True, taken))

    def unambiguous(word: str) -> bool:  # every rule gives a different output
        return len({synthetic.RULES[r](word) for r in rules}) == len(rules)

    queries = _distinct_words(world, rng, num_examples, unambiguous, taken)
    examples = []
    for i, word in enumerate(queries):
        gold = rules[i % len(rules)]  # balanced, so a fixed preference scores exactly chance
        order = [rules[j] for j in rng.permutation(len(rules))]
        examples.append(Example(
            prompt=word + synthetic.RULE_ARROW,
            choices=tuple(" " + synthetic.RULES[r](word) for r in order),
            label=order.index(gold), group=gold))
    examples = tuple(examples)
    mc = Task("rule_mc", "multiple_choice", examples, shots,
              description=f"infer a string rule from demonstrations ({len(rules)} choices)")
    exact = Task(
        "rule_exact", "exact_match",
        tuple(dataclasses.replace(e, choices=(e.answer,), label=0) for e in examples), shots,
        description="infer a string rule from demonstrations, generate the output",
        # A model that can apply every rule but ignores the demonstrations.
        baseline=1.0 / len(rules))
    return mc, exact


def _facts_task(world: synthetic.World, num_examples: int, num_choices: int = 4) -> Task:
    """Recall of an entity's attribute, learned in pretraining ("Bako lives in" -> " Tesmor.").

    Demonstrations are other entities' facts of the same attribute: they teach the
    answer format, not the answer (and can mislead: a value seen in a demonstration
    is easy to copy).
    """
    rng = world.rng("facts_task")
    pairs = [(e, a) for e in world.entities for a in synthetic.FACT_PHRASINGS]
    order = rng.permutation(len(pairs))
    num_examples = min(num_examples, len(pairs) // 2)  # the other half are shots
    examples, shots = [], []
    for n, i in enumerate(order):
        entity, attr = pairs[i]
        prompt, ending = synthetic.fact_prompt(attr, entity.name)
        gold = entity.facts[attr]
        if n < num_examples:
            others = [v for v in world.attribute_values[attr] if v != gold]
            values = [gold] + [str(v) for v in rng.choice(others, num_choices - 1, replace=False)]
            values = [values[j] for j in rng.permutation(num_choices)]
            examples.append(Example(prompt, tuple(f" {v}{ending}" for v in values),
                                    values.index(gold), group=attr))
        else:
            shots.append(Example(prompt, (f" {gold}{ending}",), 0, group=attr))
    return Task("facts_mc", "multiple_choice", tuple(examples), tuple(shots),
                description=f"recall an entity's city/job/color ({num_choices} choices)")


def _arithmetic_task(world: synthetic.World, num_examples: int) -> Task:
    """Two-digit + one-digit sums, learned in pretraining ("23 + 5 =" -> " 28").

    Distractors are the sum +-1, +-2 or +-10, all two digits like the answer, so
    choosing well needs both the units digit and the carry.
    """
    rng = world.rng("arithmetic_task")
    lo, hi = world.addend_range
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(1, 10)]
    num_examples = min(num_examples, len(pairs) // 2)  # the other half are shots
    order = rng.permutation(len(pairs))
    examples, shots = [], []
    for n, i in enumerate(order):
        a, b = pairs[i]
        prompt, gold = f"{a} + {b} =", a + b
        if n < num_examples:
            near = [gold + d for d in (-10, -2, -1, 1, 2, 10) if 10 <= gold + d <= 99]
            values = [gold] + [int(v) for v in rng.choice(near, 3, replace=False)]
            values = [values[j] for j in rng.permutation(len(values))]
            examples.append(Example(prompt, tuple(f" {v}" for v in values), values.index(gold)))
        else:
            shots.append(Example(prompt, (f" {gold}",), 0))
    return Task("arithmetic_mc", "multiple_choice", tuple(examples), tuple(shots),
                description="two-digit + one-digit addition (4 choices)")


def synthetic_tasks(world: synthetic.World, num_examples: int = 200,
                    shots_per_rule: int = 64) -> dict[str, Task]:
    """All synthetic tasks of `world`, by name. Deterministic in world.seed.

    The facts and arithmetic tasks have at most half of their (entity, attribute) or
    (a, b) pairs as examples, the rest being shots: 150 and 180 in the default world.
    """
    rule_mc, rule_exact = _rule_tasks(world, num_examples, shots_per_rule)
    tasks = [rule_mc, rule_exact, _facts_task(world, num_examples),
             _arithmetic_task(world, num_examples)]
    return {t.name: t for t in tasks}


TASK_NAMES = ("rule_mc", "rule_exact", "facts_mc", "arithmetic_mc")


def get_tasks(names: Sequence[str], world: synthetic.World,
              num_examples: int = 200) -> dict[str, Task]:
    """The named tasks, in the order given; unknown names raise with the known ones."""
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {list(TASK_NAMES)}")
    tasks = synthetic_tasks(world, num_examples)
    return {n: tasks[n] for n in names}
