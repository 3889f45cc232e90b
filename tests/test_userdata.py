"""Multi-user preference sets: the users' rules, the controversial flag, held-out users."""

from collections import Counter

import pytest

from align import userdata as U
from align.paths import shared_data_dir

_DATA = shared_data_dir()
HH = _DATA / "preferences" / "hh-rlhf-harmless-base-test.jsonl.gz" if _DATA else None
NO_HH = "shared data ../shared/data/preferences not found (set ALIGN_SHARED_DATA)"


def test_pets_rows_follow_each_user_types_rule():
    rows = U.pets_rows(n_users=20, pairs_per_user=16, seed=3)
    assert len(rows) == 320 and Counter(r["user_type"] for r in rows) == {"dog": 160, "cat": 160}
    assert len({r["user"] for r in rows}) == 20
    contro = [r for r in rows if r["controversial"]]
    assert 0.4 < len(contro) / len(rows) < 0.7
    for r in contro:  # the types disagree on these only because of the favourite animal
        other = "cat" if r["user_type"] == "dog" else "dog"
        assert U.recommended_pet(r["chosen"]) == r["user_type"] or U.recommended_pet(r["rejected"]) == other, r
    for r in rows:
        assert r["chosen"] != r["rejected"]
    assert rows == U.pets_rows(n_users=20, pairs_per_user=16, seed=3)  # deterministic


def test_pets_train_and_eval_users_are_disjoint():
    a, b = U.pets_rows(4, 4, split="train"), U.pets_rows(4, 4, split="eval")
    assert not {r["user"] for r in a} & {r["user"] for r in b}


def test_recommended_pet():
    assert U.recommended_pet("I would recommend a cat: cats keep themselves clean.") == "cat"
    assert U.recommended_pet("A dog? Honestly, who cares.") == "dog"
    assert U.recommended_pet("Pets are boring.") is None


def test_hh_rules_by_hand():
    long_q, short = "Sure, what do you want to know about it?", "No."
    assert U.hh_rule("human", long_q, short) is True
    assert U.hh_rule("concise", long_q, short) is False and U.hh_rule("verbose", long_q, short) is True
    assert U.hh_rule("no_question", long_q, short) is False
    assert U.hh_rule("no_question", "Why? How?", "What?") is False  # both ask: the shorter wins


@pytest.mark.skipif(HH is None or not HH.is_file(), reason=NO_HH)
def test_hh_multiuser_split_holds_out_pairs_and_users():
    train = U.hh_user_rows(HH, users_per_type=2, pairs_per_user=10, split="train")
    test = U.hh_user_rows(HH, users_per_type=2, pairs_per_user=10, split="eval")
    assert Counter(r["user_type"] for r in train) == dict.fromkeys(U.HH_TYPES, 20)
    key = lambda r: frozenset((r["chosen"], r["rejected"]))  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert not {r["user"] for r in train} & {r["user"] for r in test}
    for r in train:
        assert r["controversial"] is True or r["controversial"] is False
        if r["user_type"] == "concise":
            assert len(r["chosen"]) <= len(r["rejected"])
    pairs = U.hh_pairs(HH)
    assert len(pairs) == 2308
