"""A built-in, offline, deterministic synthetic corpus that a tiny GPT can learn in minutes.

A `World` (fixed by one seed) holds what the corpus talks about:
  * entities: invented names, each with a city, a job and a favourite color;
  * small additions ("23 + 5 = 28");
  * in-context rules: string transformations such as "uppercase the vowels".

`SyntheticCorpus(world).document(i)` writes document i from these. Three kinds:

  facts        Bako lives in Tesmor.        arithmetic   23 + 5 = 28      rules   kaz -> kAz
               Bako is a potter.                         41 + 7 = 48              bqx -> bqx
               ...                                       ...                      ...

A rule document applies ONE rule, chosen per document, to several random words, in the
same line format the few-shot rule tasks use (jaxlm/evaluate/tasks.py). To predict
the outputs a model must infer the rule from the document's earlier lines: that is the
in-context learning the few-shot evaluation measures. Facts and sums, in contrast, are
fixed by the world and must be memorised during pretraining.

A slice of all words (`is_held_out`) never appears in rule documents; the rule tasks
draw their words from it, so they test inferring a rule, not recalling a line.
"""

from __future__ import annotations

import dataclasses
import string
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------- rules
# Every rule keeps the length of its input, so when a task compares the outputs of
# several rules by log-likelihood, no candidate is favoured for being shorter.
#
# The default rules (DEFAULT_RULES) all copy the word and differ in which letters they
# uppercase: a 1M-parameter model learns them within ~1000 steps, whereas in a 5-minute
# CPU run it does not learn reverse / shift / sort at all (measured: 0-6% of their
# examples right at 8 shots). Those stay available via World(rules=...).
# Two default rules touch vowels only, so a demonstration word without a vowel (about
# half of them) cannot tell upper_vowels from copy, or upper from upper_consonants:
# one shot often leaves two candidate rules, a few shots rarely do.

VOWELS = frozenset("aeiou")


def _copy(word: str) -> str:
    return word


def _upper(word: str) -> str:
    return word.upper()


def _capitalize(word: str) -> str:
    return word[0].upper() + word[1:]


def _upper_last(word: str) -> str:
    return word[:-1] + word[-1].upper()


def _upper_vowels(word: str) -> str:
    return "".join(c.upper() if c in VOWELS else c for c in word)


def _upper_consonants(word: str) -> str:
    return "".join(c if c in VOWELS else c.upper() for c in word)


def _reverse(word: str) -> str:
    return word[::-1]


def _shift(word: str) -> str:
    """Each letter moves one step on in the alphabet, z wraps to a."""
    return "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in word)


def _sort(word: str) -> str:
    return "".join(sorted(word))


def _first(word: str) -> str:
    """The first letter repeated: abc -> aaa."""
    return word[0] * len(word)


RULES: dict[str, Callable[[str], str]] = {
    "copy": _copy,                          # kaz -> kaz
    "upper": _upper,                        # kaz -> KAZ
    "capitalize": _capitalize,              # kaz -> Kaz
    "upper_last": _upper_last,              # kaz -> kaZ
    "upper_vowels": _upper_vowels,          # kaz -> kAz
    "upper_consonants": _upper_consonants,  # kaz -> KaZ
    "reverse": _reverse,                    # kaz -> zak
    "shift": _shift,                        # kaz -> lba
    "sort": _sort,                          # kaz -> akz
    "first": _first,                        # kaz -> kkk
}
DEFAULT_RULES = ("copy", "upper", "capitalize", "upper_last", "upper_vowels", "upper_consonants")

RULE_ARROW = " ->"  # a rule line is f"{word}{RULE_ARROW} {rule(word)}"


def rule_line(word: str, rule: str) -> str:
    """One line of a rule document or of a rule prompt, e.g. "kaz -> KAZ"."""
    return f"{word}{RULE_ARROW} {RULES[rule](word)}"


# ----------------------------------------------------------------------------- facts
# Attribute -> (canonical phrasing, other phrasings). The canonical phrasing is what the
# facts task asks ("Bako lives in" -> " Tesmor."); the others make the corpus less
# repetitive and the memorised fact less tied to one sentence.
FACT_PHRASINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "city": ("{name} lives in {value}.",
             ("{name} is from {value}.", "The home of {name} is {value}.")),
    "job": ("{name} is a {value}.",
            ("{name} works as a {value}.", "The job of {name} is {value}.")),
    "color": ("{name} likes {value}.",
              ("{name} loves the color {value}.", "The favorite color of {name} is {value}.")),
}
CANONICAL_SHARE = 0.6  # fraction of fact lines written in the canonical phrasing

# Real words for two attributes; cities are invented. Within an attribute all values
# have the same length (and none is a prefix of another), so the facts task's choices
# differ only in content, never in how many bytes the model has to predict.
JOBS = ("tailor", "farmer", "singer", "doctor", "potter", "barber", "banker", "hunter")
COLORS = ("blue", "gold", "pink", "gray", "teal", "jade", "rose", "navy")
CITY_LENGTH = 6


def fact_prompt(attribute: str, name: str) -> tuple[str, str]:
    """(prompt, ending) of the canonical phrasing: the value goes between them."""
    prompt, ending = FACT_PHRASINGS[attribute][0].split(" {value}")
    return prompt.format(name=name), ending


@dataclasses.dataclass(frozen=True)
class Entity:
    name: str
    facts: Mapping[str, str]  # attribute -> value, one per FACT_PHRASINGS key


# ----------------------------------------------------------------------------- world

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "tr", "sh", "th")
_NUCLEI = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "m")

# Seed-sequence tags, so the world, the documents and the tasks use independent streams.
_WORLD_STREAM, _DOC_STREAM, _TASK_STREAM = 0, 1, 2


class World:
    """Everything the corpus and the synthetic tasks talk about, fixed by `seed`.

    Args:
      seed: the only source of randomness (via numpy's default_rng).
      num_entities: invented people; each has one value per attribute.
      num_cities: size of the invented city vocabulary.
      rules: names (keys of RULES) of the in-context rules documents use.
      word_lengths: (min, max) letters of the words that rules transform. Short words
        keep an 8-shot rule prompt under 128 bytes.
      addend_range: (lo, hi) of the first addend in sums; the second is 1..9. With
        10 <= lo and hi <= 89 every sum has two digits, so the arithmetic task's
        candidate answers all have the same length.
      holdout_every: one word in `holdout_every` is held out of rule documents.
    """

    def __init__(self, seed: int = 0, num_entities: int = 100, num_cities: int = 8,
                 rules: Sequence[str] = DEFAULT_RULES, word_lengths: tuple[int, int] = (3, 4),
                 addend_range: tuple[int, int] = (10, 49), holdout_every: int = 8):
        if not 1 <= word_lengths[0] <= word_lengths[1]:
            raise ValueError(f"bad word_lengths {word_lengths}")
        if not 10 <= addend_range[0] <= addend_range[1] <= 89:
            raise ValueError(f"addend_range {addend_range} must lie within 10..89")
        self.seed = seed
        self.word_lengths = word_lengths
        self.addend_range = addend_range
        self.holdout_every = holdout_every
        unknown = [r for r in rules if r not in RULES]
        if unknown:
            raise ValueError(f"unknown rules {unknown}; known: {list(RULES)}")
        self.rules: tuple[str, ...] = tuple(rules)

        rng = np.random.default_rng([seed, _WORLD_STREAM])
        # No name or city is a prefix of another: a model (or a log-likelihood
        # comparison of choices) never has to guess where one ends.
        names = self._invent_words(rng, num_entities, [])
        cities = self._invent_words(rng, num_cities, names, length=CITY_LENGTH)
        self.attribute_values: dict[str, tuple[str, ...]] = {
            "city": tuple(cities), "job": JOBS, "color": COLORS}
        self.entities: tuple[Entity, ...] = tuple(
            Entity(name, {attr: str(rng.choice(values))
                          for attr, values in self.attribute_values.items()})
            for name in names)

    @staticmethod
    def _invent_words(rng: np.random.Generator, count: int, existing: list[str],
                      length: int | None = None) -> list[str]:
        """`count` pronounceable capitalised words (of `length` letters, if given);
        no word of these and `existing` is a prefix of another."""
        words: list[str] = []
        while len(words) < count:
            # Two syllables and an optional coda: 4-7 letters, e.g. "Tesmor", "Bako".
            word = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) for _ in range(2))
            word = (word + rng.choice(_CODAS)).capitalize()
            if length is not None and len(word) != length:
                continue
            if not any(w.startswith(word) or word.startswith(w) for w in existing + words):
                words.append(word)
        return words

    def rng(self, purpose: str) -> np.random.Generator:
        """A generator for `purpose` (e.g. a task name), fixed by the seed and
        independent of the world's contents and of every document."""
        return np.random.default_rng([self.seed, _TASK_STREAM, zlib.crc32(purpose.encode())])

    def is_held_out(self, word: str) -> bool:
        """Whether `word` is reserved for evaluation (never in a rule document).

        A hash of the word alone, so any word can be classified without a list.
        """
        return zlib.crc32(word.encode()) % self.holdout_every == 0

    def random_word(self, rng: np.random.Generator, held_out: bool = False) -> str:
        """A random lowercase word from the training (or the held-out) slice."""
        while True:
            n = int(rng.integers(self.word_lengths[0], self.word_lengths[1] + 1))
            word = "".join(string.ascii_lowercase[i] for i in rng.integers(0, 26, n))
            if self.is_held_out(word) == held_out:
                return word

    def random_sum(self, rng: np.random.Generator) -> tuple[int, int]:
        """Addends (a, b) of a sum line "a + b = a+b"."""
        return (int(rng.integers(self.addend_range[0], self.addend_range[1] + 1)),
                int(rng.integers(1, 10)))

    def fact_line(self, rng: np.random.Generator, entity: Entity, attribute: str) -> str:
        canonical, others = FACT_PHRASINGS[attribute]
        phrasing = canonical if rng.random() < CANONICAL_SHARE else str(rng.choice(others))
        return phrasing.format(name=entity.name, value=entity.facts[attribute])


# ----------------------------------------------------------------------------- corpus

# Share of each document kind. Rule documents dominate: in-context rule inference is
# the skill the few-shot curve measures, and it needs the most practice.
DEFAULT_MIX: dict[str, float] = {"rules": 0.5, "facts": 0.3, "arithmetic": 0.2}
# (min, max) lines per document of each kind. Rule documents are long so that a model
# sees as many lines at the 9th position (an 8-shot prompt) as at the 2nd; a
# sequence of 128 bytes holds about 10 rule lines.
LINES: dict[str, tuple[int, int]] = {"rules": (8, 12), "facts": (2, 10), "arithmetic": (4, 10)}


class SyntheticCorpus:
    """An unbounded sequence of short ASCII documents; `document(i)` is random access.

    Document i depends only on (world.seed, i): the data position of a training run is
    one integer, and resuming never replays or skips documents.
    """

    def __init__(self, world: World, mix: Mapping[str, float] | None = None):
        mix = dict(DEFAULT_MIX if mix is None else mix)
        unknown = set(mix) - set(DEFAULT_MIX)
        if unknown:
            raise ValueError(f"unknown document kinds {sorted(unknown)}; "
                             f"known: {list(DEFAULT_MIX)}")
        self.world = world
        self.kinds = tuple(mix)
        weights = np.array([mix[k] for k in self.kinds], dtype=np.float64)
        self.probs = weights / weights.sum()

    def document(self, index: int) -> str:
        """Document `index` (>= 0): a few lines, each ending in a newline."""
        if index < 0:
            raise ValueError(f"document index must be >= 0, got {index}")
        rng = np.random.default_rng([self.world.seed, _DOC_STREAM, index])
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.probs))]
        num_lines = int(rng.integers(LINES[kind][0], LINES[kind][1] + 1))
        make = {"rules": self._rules, "arithmetic": self._arithmetic, "facts": self._facts}[kind]
        lines = make(rng, num_lines)
        return "".join(line + "\n" for line in lines)

    def _rules(self, rng: np.random.Generator, num_lines: int) -> list[str]:
        rule = str(rng.choice(self.world.rules))
        return [rule_line(self.world.random_word(rng), rule) for _ in range(num_lines)]

    def _arithmetic(self, rng: np.random.Generator, num_lines: int) -> list[str]:
        return [f"{a} + {b} = {a + b}"
                for a, b in (self.world.random_sum(rng) for _ in range(num_lines))]

    def _facts(self, rng: np.random.Generator, num_lines: int) -> list[str]:
        """Either a profile (every attribute of one entity, so `num_lines` is ignored)
        or a roster (one attribute of several entities: the layout of a few-shot
        facts prompt)."""
        world = self.world
        attributes = list(FACT_PHRASINGS)
        if rng.random() < 0.5:
            entity = world.entities[int(rng.integers(len(world.entities)))]
            order = rng.permutation(len(attributes))
            return [world.fact_line(rng, entity, attributes[i]) for i in order]
        attribute = attributes[int(rng.integers(len(attributes)))]
        who = rng.choice(len(world.entities), size=min(num_lines, len(world.entities)),
                         replace=False)
        return [world.fact_line(rng, world.entities[i], attribute) for i in who]
