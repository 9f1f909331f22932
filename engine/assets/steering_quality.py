"""How well steering a labelled feature works: which features name a concept, whether a steered answer
mentions it, and whether the answer is still fluent (plain Python, no torch, no Django).

The rules (docs/steering.md, "Measuring steering"):
- concept words of a feature: the alphabetic tokens of its label (≥ 3 letters, not a stop word),
  lower-cased, e.g. `' Paris', ' France', ','` → ["paris", "france"];
- a hit: one of those words starts a word of the answer (case-insensitive: "dog" matches "Dogs");
- fluent: distinct-token ratio ≥ 0.5 and no token repeated more than 8 times in a row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

NEUTRAL_PROMPTS = (
    "Tell me about your weekend.",
    "What did you do today?",
    "Write a short story.",
    "Give me some advice.",
    "What are you thinking about?",
)
MIN_DISTINCT_RATIO = 0.5
MAX_REPEAT_RUN = 8
MIN_WORD_LETTERS = 3

_STOP_TEXT = """the and for with that this you your are was were have has had not but from they them their there
    what when where which who how why all any can could would should will just also into than then more most
    some such only other out about over very been being its our ours his her hers him she one two get
    got make made like use used using each may might must let new def return self none true false import
    class str int list dict"""
STOP_WORDS = frozenset(_STOP_TEXT.split())

_LABEL_TOKEN = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")


def concept_words(label: str) -> list[str]:
    """The whole words a feature's label names (tokens that start a word: ' Paris', not 'icates'),
    lower-cased, in label order, without duplicates."""
    words: list[str] = []
    for single, double in _LABEL_TOKEN.findall(label):
        token = single or double
        word = token.strip().lower()
        if (token[:1] == " " and re.fullmatch(r"[a-z]+", word) and len(word) >= MIN_WORD_LETTERS and word not in STOP_WORDS
                and word not in words):
            words.append(word)
    return words


def mentions(text: str, words: Iterable[str]) -> bool:
    lowered = text.lower()
    return any(re.search(r"\b" + re.escape(word), lowered) for word in words)


def is_fluent(token_ids: Sequence[int]) -> bool:
    """Not degenerate: enough distinct tokens and no long run of one token."""
    if not token_ids:
        return True
    if len(set(token_ids)) / len(token_ids) < MIN_DISTINCT_RATIO:
        return False
    run = 1
    for previous, current in zip(token_ids, token_ids[1:], strict=False):
        run = run + 1 if current == previous else 1
        if run > MAX_REPEAT_RUN:
            return False
    return True


def concept_features(labels: Iterable[tuple[int, str]], *, count: int, exclude_words: Iterable[str] = (),
                     min_words: int = 3, coherence: Callable[[list[str]], float] | None = None,
                     ) -> list[tuple[int, list[str]]]:
    """The `count` most interpretable features: labels naming at least `min_words` concept words.

    Features whose words already appear in the unsteered answers (`exclude_words` text) are left
    out, so a hit means the steering put the word there. Ranked by `coherence` of the words when
    given (e.g. how alike their token embeddings are: ' Seoul', ' Korea', ' Korean' names one
    concept, ' over', ' the', ' block' does not), then lowest index (a stable, seed-free order).
    """
    excluded = " ".join(exclude_words)
    picked = []
    for index, label in labels:
        words = concept_words(label)
        if len(words) >= min_words and not mentions(excluded, words):
            picked.append((index, words))
    picked.sort(key=lambda item: (-(coherence(item[1]) if coherence else 0.0), item[0]))
    return picked[:count]


def hit_rate(answers_by_feature: dict[int, list[str]], words_by_feature: dict[int, list[str]],
             *, min_answers: int = 2) -> float:
    """Share of features whose concept words appear in at least `min_answers` of their answers."""
    if not answers_by_feature:
        return 0.0
    hits = sum(
        sum(mentions(answer, words_by_feature[index]) for answer in answers) >= min_answers
        for index, answers in answers_by_feature.items()
    )
    return hits / len(answers_by_feature)
