"""The synthetic world, corpus and few-shot tasks: determinism, correctness, fairness."""

import collections
import dataclasses
import functools

import pytest

from jaxlm.data import synthetic
from jaxlm.data.synthetic import RULES, SyntheticCorpus, World
from jaxlm.evaluate import tasks as T


@functools.cache
def world(seed: int = 0) -> World:
    return World(seed)


@functools.cache
def tasks(seed: int = 0) -> dict[str, T.Task]:
    return T.synthetic_tasks(world(seed), num_examples=120)


def docs(seed: int = 0, n: int = 600) -> list[str]:
    return [SyntheticCorpus(world(seed)).document(i) for i in range(n)]


# ----------------------------------------------------------------------------- world/corpus

def test_same_seed_same_world_and_documents():
    a, b = World(3), World(3)
    assert a.entities == b.entities and a.attribute_values == b.attribute_values
    assert [SyntheticCorpus(a).document(i) for i in range(50)] == \
           [SyntheticCorpus(b).document(i) for i in range(50)]


def test_different_seeds_differ():
    assert world(0).entities != world(1).entities
    assert docs(0, 50) != docs(1, 50)


def test_random_access():
    fresh = SyntheticCorpus(World(0)).document(5)
    corpus = SyntheticCorpus(World(0))
    for i in range(5):
        corpus.document(i)
    assert corpus.document(5) == fresh == docs()[5]
    with pytest.raises(ValueError):
        corpus.document(-1)


def test_invented_words_are_prefix_free_and_cities_equal_length():
    w = world()
    words = [e.name for e in w.entities] + list(w.attribute_values["city"])
    assert len(set(words)) == len(words)
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    for values in w.attribute_values.values():
        assert len({len(v) for v in values}) == 1  # fair log-likelihood comparison


def test_rules_preserve_length():
    for rule in RULES.values():
        for word in ["abc", "zyxw", "aaab"]:
            assert len(rule(word)) == len(word)
    assert RULES["upper_vowels"]("kaz") == "kAz" and RULES["upper_consonants"]("kaz") == "KaZ"
    assert RULES["shift"]("azy") == "baz" and RULES["first"]("kqz") == "kkk"
    with pytest.raises(ValueError, match="copy"):
        World(rules=("copy", "rot13"))


def test_documents_are_ascii_lines_of_one_kind():
    w = world()
    true_facts = {phrasing.format(name=e.name, value=e.facts[attr])
                  for e in w.entities
                  for attr, (canonical, others) in synthetic.FACT_PHRASINGS.items()
                  for phrasing in (canonical, *others)}
    kinds = collections.Counter()
    for doc in docs():
        assert doc.isascii() and doc.endswith("\n") and 10 <= len(doc) <= 400
        lines = doc[:-1].split("\n")
        if " -> " in doc:
            kinds["rules"] += 1
            words = [line.split(" -> ")[0] for line in lines]
            # One rule per document, and never a word reserved for evaluation.
            assert any(lines == [synthetic.rule_line(wd, r) for wd in words] for r in w.rules)
            assert not any(w.is_held_out(wd) for wd in words)
        elif " + " in doc:
            kinds["arithmetic"] += 1
            for line in lines:
                a, b, c = (int(x) for x in line.replace(" + ", " ").replace(" = ", " ").split())
                assert a + b == c
        else:
            kinds["facts"] += 1
            assert set(lines) <= true_facts
    for kind, share in synthetic.DEFAULT_MIX.items():
        assert abs(kinds[kind] / sum(kinds.values()) - share) < 0.08


# ----------------------------------------------------------------------------- tasks

def test_tasks_are_deterministic():
    assert T.synthetic_tasks(World(0), num_examples=120) == tasks(0)
    assert tasks(0)["rule_mc"].examples != tasks(1)["rule_mc"].examples


def test_shots_disjoint_from_examples():
    for task in tasks().values():
        assert not {e.prompt for e in task.shots} & {e.prompt for e in task.examples}, task.name


def test_rule_task_gold_is_the_demonstrated_rule_on_a_held_out_word():
    w, task = world(), tasks()["rule_mc"]
    for e in task.examples + task.shots:
        word = e.prompt.removesuffix(synthetic.RULE_ARROW)
        assert w.is_held_out(word)
        assert e.answer == " " + RULES[e.group](word)
    for e in task.examples:
        assert sorted(e.choices) == sorted(" " + RULES[r](e.prompt[:-3]) for r in w.rules)
        assert len(set(e.choices)) == len(e.choices)  # every rule distinguishable
        assert len({len(c) for c in e.choices}) == 1
    groups = collections.Counter(e.group for e in task.examples)
    assert set(groups) == set(w.rules) and max(groups.values()) - min(groups.values()) <= 1
    exact = tasks()["rule_exact"]
    assert [e.answer for e in exact.examples] == [e.answer for e in task.examples]


def test_facts_and_arithmetic_gold_answers():
    by_name = {e.name: e for e in world().entities}
    for e in tasks()["facts_mc"].examples:
        attr = e.group
        name = e.prompt.split()[0]
        assert e.answer == f" {by_name[name].facts[attr]}."
        assert e.prompt == synthetic.fact_prompt(attr, name)[0]
        assert len(set(e.choices)) == len(e.choices) == 4
    for e in tasks()["arithmetic_mc"].examples:
        a, b = (int(x) for x in e.prompt.rstrip(" =").split(" + "))
        assert e.answer == f" {a + b}"
        assert len(set(e.choices)) == 4 and len({len(c) for c in e.choices}) == 1


def test_chance_levels():
    t = tasks()
    assert t["rule_mc"].chance == pytest.approx(1 / len(world().rules))
    assert t["rule_exact"].chance == pytest.approx(1 / len(world().rules))
    assert t["facts_mc"].chance == pytest.approx(0.25)
    assert t["arithmetic_mc"].chance == pytest.approx(0.25)
    # Exact match without a baseline: the always-answer-the-most-frequent strategy.
    ex = [T.Example("a", (" x",), 0), T.Example("b", (" x",), 0), T.Example("c", (" y",), 0)]
    assert T.Task("t", "exact_match", tuple(ex), ()).chance == pytest.approx(2 / 3)


def test_k_shot_prompts_are_prefix_consistent_and_same_rule():
    task = tasks()["rule_mc"]
    for e in task.examples[:30]:
        assert T.format_prompt(task, e, 0) == e.prompt
        demos8 = T.demonstrations(task, e, 8, rng_seed=7)
        for k in (1, 4):
            assert T.demonstrations(task, e, k, rng_seed=7) == demos8[:k]
        assert {d.group for d in demos8} == {e.group}
        prompt = T.format_prompt(task, e, 8, rng_seed=7)
        lines = prompt.split("\n")
        assert len(lines) == 9 and lines[-1] == e.prompt
        assert lines[:8] == [d.prompt + d.answer for d in demos8]
        assert prompt == T.format_prompt(task, e, 8, rng_seed=7)
    # A different seed draws different demonstrations.
    e = task.examples[0]
    assert T.demonstrations(task, e, 8, 0) != T.demonstrations(task, e, 8, 1)


def test_eight_shot_rule_prompt_fits_128_tokens():
    task = tasks()["rule_mc"]
    longest = max(len(T.format_prompt(task, e, 8)) + len(e.answer) for e in task.examples)
    assert longest + 1 <= 128  # + 1 for the leading EOS/BOS


def test_too_many_shots_raises():
    task = tasks()["rule_mc"]
    with pytest.raises(ValueError, match="shots"):
        T.format_prompt(task, task.examples[0], len(task.shots) + 1)


def test_shot_with_the_example_prompt_is_never_shown():
    ex = T.Example("q ->", (" a",), 0)
    task = T.Task("t", "exact_match", (ex,), (ex, T.Example("r ->", (" b",), 0)))
    assert T.format_prompt(task, ex, 1) == "r -> b\nq ->"


def test_get_tasks():
    got = T.get_tasks(["facts_mc", "rule_mc"], world(), num_examples=20)
    assert list(got) == ["facts_mc", "rule_mc"]
    assert len(got["rule_mc"].examples) == 20
    with pytest.raises(ValueError, match="rule_mc"):
        T.get_tasks(["hellaswag"], world())


def test_invalid_task_and_example():
    with pytest.raises(ValueError):
        T.Task("t", "ranking", (), ())
    with pytest.raises(ValueError):
        T.Example("p", (" a",), 1)
    assert dataclasses.is_dataclass(T.Example)
