"""Story-level goals for BabyLlama (TinyStories): prompts, a programmatic gold score, and the judge built on it.

The goal (``judge.kind: story``, ``judge.goal: TOPIC``): a continuation of a story opening should
    - mention the topic (the word ``TOPIC`` or its plural, as a whole word): half of the score, and
    - end happily (one of ``HAPPY`` in its last ``ENDING_CHARS`` characters): the other half.
``story_score(text, topic)`` is that score in {0, 0.5, 1}; the judge's P(a > b) = 1/2 + (score(a) - score(b)) / 2.
Base BabyLlama continuations meet each half rarely (measured in docs/benchmarks.md), so the goal must be learnt.

Prompts (``builtin:stories[:train|test]``) are one-sentence openings from templates (character, name, place,
object; the topic never appears in them), split into train and test by a hash of the text.
"""

from __future__ import annotations

import hashlib
import random
import re

HAPPY = ("happy", "smile", "smiled", "laughed", "glad", "hug")
ENDING_CHARS = 60

_CHARACTERS = [
    "little girl",
    "little boy",
    "big dog",
    "small bird",
    "old man",
    "kind lady",
    "brave bunny",
    "tiny fish",
    "funny frog",
    "shy bear",
]
_NAMES = ["Lily", "Tom", "Max", "Sue", "Ben", "Mia", "Sam", "Anna", "Tim", "Lucy", "Jack", "Emma"]
_PLACES = ["park", "garden", "forest", "house", "beach", "school", "farm", "town"]
_OBJECTS = ["red ball", "blue car", "big box", "shiny toy", "yellow kite", "soft hat", "new book", "little boat"]
_TEMPLATES = [
    "Once upon a time, there was a {c} named {n}.",
    "One day, {n} went to the {p}.",
    "{n} had a {o}.",
    "Once upon a time, a {c} lived in a {p}.",
    "One day, {n} found a {o} in the {p}.",
]


def _split_of(text: str) -> str:
    return "test" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0 else "train"


def all_prompts() -> list[str]:
    out = set()
    for t in _TEMPLATES:
        for c in _CHARACTERS:
            for n in _NAMES:
                for p in _PLACES:
                    for o in _OBJECTS:
                        out.add(t.format(c=c, n=n, p=p, o=o))
    return sorted(out)


def story_prompts(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` distinct openings of ``split`` (train or test), in a seeded order (all of them if fewer exist)."""
    pool = [p for p in all_prompts() if _split_of(p) == split]
    random.Random(seed).shuffle(pool)
    return pool[:n]


def story_score(text: str, topic: str) -> float:
    """1/2 for mentioning ``topic`` (whole word, singular or plural) + 1/2 for a happy word near the end."""
    mentions = re.search(rf"\b{re.escape(topic)}s?\b", text, re.IGNORECASE) is not None
    ending = text[-ENDING_CHARS:].lower()
    happy = any(re.search(rf"\b{w}", ending) for w in HAPPY)
    return 0.5 * mentions + 0.5 * happy


class StoryJudge:
    """P(a > b | x) = 1/2 + (story_score(a) - story_score(b)) / 2: the gold score used as a programmatic judge."""

    def __init__(self, topic: str):
        self.topic = topic

    def compare(self, prompts, a, b):
        return [0.5 + (story_score(x, self.topic) - story_score(y, self.topic)) / 2 for x, y in zip(a, b)]
