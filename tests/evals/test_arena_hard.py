"""``align eval arena-hard``: two swapped games per question against a baseline, verdict parsing, arena-hard's weighted
battles and the bootstrap interval checked exactly with a fake judge returning fixed verdicts; resume; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.evals.arena_hard import FOLLOW_UP, battles, evaluate_arena_hard, parse_verdict, win_rate_with_ci
from tests.conftest import error_lines
from tests.evals.conftest import write_judge


@pytest.fixture
def bench(tmp_path, shared_data) -> Path:
    """The first three shared Arena-Hard questions, and baseline answers for them in arena-hard's answer format."""
    src = shared_data / "benchmarks" / "arena_hard" / "question.jsonl"
    dst = tmp_path / "arena_hard"
    dst.mkdir()
    lines = src.read_text().splitlines()[:3]
    (dst / "question.jsonl").write_text("\n".join(lines) + "\n")
    base = [
        {
            "question_id": json.loads(ln)["question_id"],
            "answer_id": str(i),
            "model_id": "base-model",
            "choices": [{"index": 0, "turns": [{"content": f"BASELINE ANSWER {i}", "token_len": 3}]}],
        }
        for i, ln in enumerate(lines)
    ]
    (tmp_path / "baseline.jsonl").write_text("".join(json.dumps(b) + "\n" for b in base))
    return dst


# question index -> verdict of game 1 (A = baseline) and game 2 (A = the model); None = no label (follow-up asked)
VERDICTS = {
    0: ("I prefer B. [[B>>A]]", "My final verdict: [[A>B]]"),
    1: ("Equal. [[A=B]]", "Assistant B is much better: [[A<<B]]"),
    2: (None, "Either [[A>B]] or [[B>A]], hard to say"),
}
FOLLOW = "Then: [[A>>B]]"
# model outcomes: q0 3 wins + 1 win; q1 a tie + 3 losses; q2 3 losses (after the follow-up) + no verdict
OUTCOMES = [1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def _reply(body):
    user = body["messages"][1]["content"]
    i = int(user.split("BASELINE ANSWER ")[1][0])
    if len(body["messages"]) > 2:
        assert body["messages"][-1]["content"] == FOLLOW_UP and body["messages"][2]["role"] == "assistant"
        return FOLLOW
    game = 0 if user.index("BASELINE ANSWER") < user.index("<|The Start of Assistant B") else 1
    return VERDICTS[i][game] or "A long analysis without a label."


def test_arena_hard_end_to_end_with_fixed_verdicts(tmp_path, tiny_policy_dir, bench, fake_chat, capsys):
    url, handler = fake_chat
    handler.reply = staticmethod(_reply)
    judge = write_judge(tmp_path / "judge.yaml", kind="llm", base_url=url, model="gpt-4-1106-preview")
    out = tmp_path / "run"
    from align.cli import main

    assert (
        main(
            [
                "eval",
                "arena-hard",
                "--model",
                str(tiny_policy_dir),
                "--judge",
                str(judge),
                "--output",
                str(out),
                "--bench-dir",
                str(bench),
                "--baseline",
                str(tmp_path / "baseline.jsonl"),
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(handler.requests) == 7  # 3 questions x 2 games + 1 follow-up

    answers = [json.loads(x) for x in (out / "model_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all(
        a["model_id"] == "tiny-policy"
        and isinstance(a["choices"][0]["turns"][0]["content"], str)
        and a["choices"][0]["turns"][0]["token_len"] >= 1
        for a in answers
    )
    judgments = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert [[g["score"] for g in j["games"]] for j in judgments] == [["B>>A", "A>B"], ["A=B", "B>>A"], ["A>>B", None]]
    assert all(
        j["baseline"] == "base-model" and j["judge"] == "judge" and j["model"] == "tiny-policy" for j in judgments
    )
    ours = {a["question_id"]: a["choices"][0]["turns"][0]["content"] for a in answers}
    for j in judgments:  # game 1 shows the baseline as A, game 2 the model as A
        g1, g2 = (g["user_prompt"] for g in j["games"])
        assert g1.index("BASELINE") < g1.index(ours[j["question_id"]], g1.index("Assistant B's Answer|>"))
        assert g2.index("BASELINE") > g2.index("Assistant B's Answer|>")
    assert "Then: [[A>>B]]" in judgments[2]["games"][0]["judgment"]

    results = json.loads((out / "results.json").read_text())
    assert battles(judgments) == OUTCOMES
    assert results["win_rate"] == pytest.approx(100 * 4.5 / 11)
    assert results["ci"] == list(win_rate_with_ci(OUTCOMES, 100, 0)[1])
    assert results["ci"][0] <= results["win_rate"] <= results["ci"][1] and results["ci"][0] < results["ci"][1]
    assert (results["n_battles"], results["n_games"], results["n_unparsed"], results["n_questions"]) == (11, 6, 1, 3)
    assert results["verdicts"] == {
        "model much better": 1,
        "model better": 1,
        "tie": 1,
        "model worse": 0,
        "model much worse": 2,
        "no verdict": 1,
    }
    assert printed["win_rate"] == results["win_rate"] and printed["baseline"] == "base-model"
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG" and "base-model" in (out / "report.md").read_text()

    evaluate_arena_hard(
        str(tiny_policy_dir),
        str(judge),
        str(out),
        bench_dir=str(bench),
        baseline=str(tmp_path / "baseline.jsonl"),
        max_new_tokens=8,
    )
    assert len(handler.requests) == 7  # resumed: nothing re-judged


def test_baseline_model_folder_is_generated_too(tmp_path, tiny_policy_dir, bench, fake_chat):
    url, handler = fake_chat
    handler.reply = staticmethod(lambda body: "[[A=B]]")
    judge = write_judge(tmp_path / "judge.yaml", kind="llm", base_url=url, model="j")
    out = tmp_path / "run"
    res = evaluate_arena_hard(
        str(tiny_policy_dir),
        str(judge),
        str(out),
        bench_dir=str(bench),
        baseline=str(tiny_policy_dir),
        limit=2,
        max_new_tokens=4,
        bootstrap=10,
    )
    base = [json.loads(x) for x in (out / "baseline_answers.jsonl").read_text().splitlines()]
    assert len(base) == 2 and {b["model_id"] for b in base} == {"tiny-policy-baseline"}
    assert res["baseline"] == "tiny-policy-baseline" and res["win_rate"] == 50.0 and res["ci"] == [50.0, 50.0]
    assert len(handler.requests) == 4


@pytest.mark.parametrize(
    "text, want",
    [
        ("[[A>>B]]", "A>>B"),
        ("[[A>B]]", "A>B"),
        ("[[A=B]]", "A=B"),
        ("[[B>A]]", "B>A"),
        ("[[B>>A]]", "B>>A"),
        ("[[ A > B ]]", "A>B"),
        ("[[A<B]]", "B>A"),
        ("[[A<<B]]", "B>>A"),
        ("[[B=A]]", "A=B"),
        ("[[B<<A]]", "A>>B"),
        ("[[A>B]] ... so finally [[A>B]]", "A>B"),
        ("[[A>B]] or [[B>A]]", None),
        ("no label", None),
        ("[[A>A]]", None),
        ("[A>B]", None),
        (None, None),
    ],
)
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def test_battles_weights_and_bootstrap_determinism():
    js = [{"games": [{"score": "A>>B"}, {"score": "B>>A"}]}, {"games": [{"score": "B>A"}, {"score": None}]}]
    assert battles(js) == [0.0] * 6 + [1.0]
    assert battles(js, weight=1) == [0.0, 0.0, 1.0]
    a, b = win_rate_with_ci([1, 0, 0.5, 1], 50, 3), win_rate_with_ci([1, 0, 0.5, 1], 50, 3)
    assert a == b and a[0] == 62.5


def test_bad_input(tmp_path, tiny_policy_dir, bench, capsys):
    from align.cli import main

    judge = write_judge(tmp_path / "j.yaml", kind="llm", base_url="http://127.0.0.1:9/v1", model="m")
    partial = tmp_path / "partial.jsonl"
    partial.write_text((tmp_path / "baseline.jsonl").read_text().splitlines()[0] + "\n")
    out = tmp_path / "out"
    cases = [
        ([], "no baseline answers"),
        (["--baseline", str(partial)], "no answer to 2 of the 3 questions"),
        (["--baseline", str(tmp_path / "nothing")], "neither an answers file"),
        (["--baseline", str(tmp_path)], "--baseline"),
        (["--baseline", str(tmp_path / "baseline.jsonl"), "--weight", "0"], "--weight '0'"),
    ]
    for argv, match in cases:
        rc = main(
            [
                "eval",
                "arena-hard",
                "--model",
                str(tiny_policy_dir),
                "--judge",
                str(judge),
                "--output",
                str(out),
                "--bench-dir",
                str(bench),
                *argv,
            ]
        )
        lines = error_lines(capsys.readouterr().err)
        assert rc == 2 and len(lines) == 1 and match in lines[0], (argv, lines)
        assert not out.exists()
