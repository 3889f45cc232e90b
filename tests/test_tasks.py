from align import tasks as T


def test_checker_exact_match_and_families():
    ts = T.make_tasks(50, seed=0)
    assert {t.family for t in ts} == set(T.FAMILIES)
    for t in ts:
        assert t.check(t.answer) and t.check(f" {t.answer}\n")
        assert not t.check(t.answer + "0")


def test_hand_checked_answers():
    rng = __import__("random").Random(0)
    for _ in range(200):
        for fam in T.FAMILIES:
            t = T._make(fam, rng)
            body = t.prompt[:-1]
            if fam == "add":
                a, b = body.split("+")
                assert t.answer == str(int(a) + int(b))
            elif fam == "reverse":
                assert t.answer == body.split()[1][::-1]
            elif fam == "sort":
                assert t.answer == "".join(sorted(body.split()[1]))
            elif fam == "count":
                _, c, _, w = body.split()
                assert t.answer == str(w.count(c))
            else:
                assert t.answer == str(max(int(x) for x in body.split()[1:]))


def test_splits_are_disjoint_and_reproducible():
    train = T.make_tasks(300, seed=0, split="train")
    test = T.make_tasks(100, seed=0, split="test")
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    assert T.make_tasks(300, seed=0, split="train") == train
    assert len({t.prompt for t in train}) == 300


def test_corruptions_and_sloppy_answers_are_wrong():
    import random

    rng = random.Random(0)
    for t in T.make_tasks(200, seed=3):
        assert not t.check(T.corrupt(t, rng))
        assert not t.check(T.sloppy_answer(t))
    rows = T.sft_rows(T.make_tasks(400, seed=0), sloppy_fraction=0.5, seed=0)
    wrong = sum(r["chosen"] != t.answer for r, t in zip(rows, T.make_tasks(400, seed=0)))
    assert 150 < wrong < 250


def test_parse_prompt_rebuilds_every_task():
    for t in T.make_tasks(200, seed=5) + T.make_tasks(50, seed=5, split="test"):
        assert T.parse_prompt(t.prompt) == t
    assert T.parse_prompt("hello") is None
