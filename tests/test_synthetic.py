"""The synthetic world, corpus and few-shot tasks: determinism, correctness, fairness."""

import collections
import functools

import pytest

from jaxlm.config import base_config
from jaxlm.data import synthetic
from jaxlm.data.synthetic import RULES, SyntheticCorpus, World
from jaxlm.errors import ConfigError
from jaxlm.evaluate import tasks as T
from jaxlm.evaluate.tasks.base import Task, contexts
from jaxlm.evaluate.tasks.synthetic import group_shots, synthetic_tasks


@functools.cache
def world(seed: int = 0) -> World:
    return World(seed)


@functools.cache
def tasks(seed: int = 0, shot_seed: int = 0) -> dict[str, Task]:
    return synthetic_tasks(world(seed), num_examples=120, seed=shot_seed)


def answer(doc: dict) -> str:
    return " " + doc["choices"][doc["label"]]


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
    assert synthetic_tasks(World(0), num_examples=120)["rule_mc"].docs == tasks(0)["rule_mc"].docs
    assert tasks(0)["rule_mc"].docs != tasks(1)["rule_mc"].docs


def test_shots_disjoint_from_examples():
    for task in tasks().values():
        assert not {e["prompt"] for e in task.fewshot_docs} & {e["prompt"] for e in task.docs}, task.name


def test_rule_task_gold_is_the_demonstrated_rule_on_a_held_out_word():
    w, task = world(), tasks()["rule_mc"]
    for e in task.docs + task.fewshot_docs:
        word = e["prompt"].removesuffix(synthetic.RULE_ARROW)
        assert w.is_held_out(word)
        assert answer(e) == " " + RULES[e["group"]](word)
    for e in task.docs:
        assert sorted(e["choices"]) == sorted(RULES[r](e["prompt"][:-3]) for r in w.rules)
        assert len(set(e["choices"])) == len(e["choices"])  # every rule distinguishable
        assert len({len(c) for c in e["choices"]}) == 1
    groups = collections.Counter(e["group"] for e in task.docs)
    assert set(groups) == set(w.rules) and max(groups.values()) - min(groups.values()) <= 1
    exact = tasks()["rule_exact"]
    assert [exact.target(e) for e in exact.docs] == [e["choices"][e["label"]] for e in task.docs]


def test_facts_and_arithmetic_gold_answers():
    by_name = {e.name: e for e in world().entities}
    for e in tasks()["facts_mc"].docs:
        attr = e["group"]
        name = e["prompt"].split()[0]
        assert answer(e) == f" {by_name[name].facts[attr]}."
        assert e["prompt"] == synthetic.fact_prompt(attr, name)[0]
        assert len(set(e["choices"])) == len(e["choices"]) == 4
    for e in tasks()["arithmetic_mc"].docs:
        a, b = (int(x) for x in e["prompt"].rstrip(" =").split(" + "))
        assert answer(e) == f" {a + b}"
        assert len(set(e["choices"])) == 4 and len({len(c) for c in e["choices"]}) == 1


def test_chance_levels():
    t = tasks()
    assert t["rule_mc"].chance == pytest.approx(1 / len(world().rules))
    assert t["rule_exact"].chance == pytest.approx(1 / len(world().rules))
    assert t["facts_mc"].chance == pytest.approx(0.25)
    assert t["arithmetic_mc"].chance == pytest.approx(0.25)


def test_k_shot_prompts_are_prefix_consistent_and_same_rule():
    task = tasks(0, 7)["rule_mc"]
    by_k = {k: contexts(task, k, 0, 30) for k in (0, 1, 4, 8)}
    for i, e in enumerate(task.docs[:30]):
        assert by_k[0][i] == e["prompt"]
        demos8 = group_shots(task, i, 8, seed=7)
        for k in (1, 4):
            assert group_shots(task, i, k, seed=7) == demos8[:k]
        assert {d["group"] for d in demos8} == {e["group"]}
        lines = by_k[8][i].split("\n")
        assert len(lines) == 9 and lines[-1] == e["prompt"]
        assert lines[:8] == [d["prompt"] + answer(d) for d in demos8]
    # A different seed draws different demonstrations.
    assert group_shots(task, 0, 8, seed=0) != group_shots(task, 0, 8, seed=1)


def test_eight_shot_rule_prompt_fits_128_tokens():
    task = tasks()["rule_mc"]
    longest = max(len(c) + len(answer(e)) for c, e in zip(contexts(task, 8, 0), task.docs))
    assert longest + 1 <= 128  # + 1 for the leading EOS


def test_too_many_shots_raises():
    task = tasks()["rule_mc"]
    with pytest.raises(ValueError, match="demonstrations available"):
        contexts(task, len(task.fewshot_docs) + 1, 0, 1)


def test_shot_with_the_example_prompt_is_never_shown():
    q, r = ({"prompt": p, "choices": [a], "label": 0, "group": ""} for p, a in (("q ->", "a"), ("r ->", "b")))
    base = tasks()["rule_exact"]
    task = Task(**{**{f: getattr(base, f) for f in base.__dataclass_fields__},
                   "docs": (q,), "fewshot_docs": (q, r)})
    assert contexts(task, 1, 0) == ["r -> b\nq ->"]


def test_get_tasks():
    cfg = base_config().evaluate
    cfg.num_examples = 20
    got = T.get_tasks(cfg, ["facts_mc", "rule_mc"])
    assert list(got) == ["facts_mc", "rule_mc"]
    assert len(got["rule_mc"].docs) == 20
    with pytest.raises(ConfigError, match="unknown task.*known tasks: rule_mc"):
        T.get_tasks(cfg, ["hellaswagg"])


def test_invalid_task():
    base = tasks()["rule_mc"]
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    with pytest.raises(ValueError, match="kind"):
        Task(**{**fields, "kind": "ranking"})
    with pytest.raises(ValueError, match="metrics"):
        Task(**{**fields, "metrics": ("bleu",)})
