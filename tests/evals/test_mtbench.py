"""``align eval mtbench``: two-turn answers, FastChat's grading prompts, rating parsing and aggregation checked exactly
against a fake OpenAI-compatible judge that returns fixed ratings; resume; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from align.errors import UserError
from align.evals.mtbench import aggregate, evaluate_mtbench, parse_rating
from tests.conftest import error_lines
from tests.evals.conftest import write_judge

PICK = {81: "writing", 111: "math", 121: "coding"}


@pytest.fixture
def bench(tmp_path, shared_data) -> Path:
    """Three shared MT-Bench questions (writing; math and coding, graded with the reference answers)."""
    src = shared_data / "benchmarks" / "mt_bench"
    dst = tmp_path / "mt_bench"
    dst.mkdir()
    lines = [ln for ln in (src / "question.jsonl").read_text().splitlines() if json.loads(ln)["question_id"] in PICK]
    (dst / "question.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(src / "reference_answer_gpt-4.jsonl", dst)
    shutil.copy(src / "judge_prompts.jsonl", dst)
    return dst


def _questions(bench: Path) -> dict:
    return {q["question_id"]: q for q in map(json.loads, (bench / "question.jsonl").read_text().splitlines())}


# (question, turn) -> the fake judge's reply, and the rating it must be read as
REPLIES = {
    (81, 1): ("Vivid and on topic. Rating: [[8]]", 8.0),
    (81, 2): ("Mostly follows the constraint. [[6.5]]", 6.5),
    (111, 1): ("Compared with the reference answer the area is wrong. Rating: [[3]]", 3.0),
    (111, 2): ("I cannot decide on a number for this one.", None),
    (121, 1): ("Reasonable code. Rating: 7/10", 7.0),
    (121, 2): ('Format: "Rating: [[5]]" as asked. The answer is excellent, so: [[9]]', 9.0),
}


def _reply_for(questions: dict):
    def reply(body):
        user = body["messages"][-1]["content"]
        qid = next(q for q, item in questions.items() if item["turns"][0] in user)
        turn = 2 if "### User:" in user else 1
        return REPLIES[(qid, turn)][0]

    return reply


def test_mtbench_end_to_end_with_fixed_ratings(tmp_path, tiny_policy_dir, bench, fake_chat, capsys):
    url, handler = fake_chat
    questions = _questions(bench)
    handler.reply = staticmethod(_reply_for(questions))
    judge = write_judge(tmp_path / "gpt4.yaml", kind="llm", base_url=url, model="gpt-4", max_tokens=512)
    out = tmp_path / "run"
    from align.cli import main

    assert (
        main(
            [
                "eval",
                "mtbench",
                "--model",
                str(tiny_policy_dir),
                "--judge",
                str(judge),
                "--output",
                str(out),
                "--bench-dir",
                str(bench),
                "--max-new-tokens",
                "8",
                "--parallel",
                "2",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    answers = [json.loads(x) for x in (out / "model_answers.jsonl").read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == sorted(PICK)
    for a in answers:
        assert (
            set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and a["model_id"] == "tiny-policy"
        )
        assert len(a["choices"][0]["turns"]) == 2 and all(isinstance(t, str) for t in a["choices"][0]["turns"])
    by_q = {a["question_id"]: a["choices"][0]["turns"] for a in answers}

    judgments = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == 6 == len(handler.requests)
    refs = {
        r["question_id"]: r["choices"][0]["turns"]
        for r in map(json.loads, (bench / "reference_answer_gpt-4.jsonl").read_text().splitlines())
    }
    for j in judgments:
        qid, turn = j["question_id"], j["turn"]
        want = REPLIES[(qid, turn)][1]
        assert j["score"] == (-1 if want is None else want), j
        with_ref = PICK[qid] in ("math", "coding")
        assert j["judge"] == [
            "gpt4",
            {
                (False, 1): "single-v1",
                (True, 1): "single-math-v1",
                (False, 2): "single-v1-multi-turn",
                (True, 2): "single-math-v1-multi-turn",
            }[(with_ref, turn)],
        ]
        assert ("Reference" in j["user_prompt"]) == with_ref
        if with_ref:
            assert refs[qid][turn - 1] in j["user_prompt"]
        assert by_q[qid][turn - 1] in j["user_prompt"] and questions[qid]["turns"][turn - 1] in j["user_prompt"]
        if turn == 2:  # the turn-2 grading shows the whole conversation
            assert by_q[qid][0] in j["user_prompt"] and questions[qid]["turns"][0] in j["user_prompt"]
    for body in handler.requests:
        assert body["model"] == "gpt-4" and body["max_tokens"] == 512 and body["temperature"] == 0.0
        assert body["messages"][0]["role"] == "system" and body["messages"][1]["role"] == "user"

    results = json.loads((out / "results.json").read_text())
    assert results["turn_1"] == pytest.approx((8 + 3 + 7) / 3)
    assert results["turn_2"] == pytest.approx((6.5 + 9) / 2)
    assert results["score"] == pytest.approx((8 + 3 + 7 + 6.5 + 9) / 5)
    assert results["n_judgments"] == 6 and results["n_unparsed"] == 1 and results["n_questions"] == 3
    cats = results["by_category"]
    assert list(cats) == ["writing", "math", "coding"]
    assert cats["writing"] == {"turn_1": 8.0, "turn_2": 6.5, "score": 7.25, "n": 2}
    assert cats["math"] == {"turn_1": 3.0, "turn_2": None, "score": 3.0, "n": 1}
    assert cats["coding"] == {"turn_1": 7.0, "turn_2": 9.0, "score": 8.0, "n": 2}
    assert printed["score"] == results["score"] and printed["n_unparsed"] == 1
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG" and "| math | 3.00 | — | 3.00 | 1 |" in (
        out / "report.md"
    ).read_text()

    # resume: nothing is regenerated or re-judged
    before = (out / "model_answers.jsonl").read_text()
    again = evaluate_mtbench(str(tiny_policy_dir), str(judge), str(out), bench_dir=str(bench), max_new_tokens=8)
    assert len(handler.requests) == 6 and (out / "model_answers.jsonl").read_text() == before
    assert again["score"] == results["score"]


def test_resume_after_a_torn_line_and_a_dead_judge(tmp_path, tiny_policy_dir, bench, fake_chat):
    url, handler = fake_chat
    handler.reply = staticmethod(_reply_for(_questions(bench)))
    dead = write_judge(
        tmp_path / "j.yaml", kind="llm", base_url="http://127.0.0.1:9/v1", model="gpt-4", retries=0, timeout=2
    )
    out = tmp_path / "run"
    with pytest.raises(UserError, match="rerun the same command to resume"):
        evaluate_mtbench(str(tiny_policy_dir), str(dead), str(out), bench_dir=str(bench), limit=2, max_new_tokens=4)
    answers = (out / "model_answers.jsonl").read_text()
    assert len(answers.splitlines()) == 2 and not (out / "judgments.jsonl").exists()
    with open(out / "model_answers.jsonl", "a") as f:
        f.write('{"question_id": 121, "mod')  # a kill mid-write
    live = write_judge(tmp_path / "j.yaml", kind="llm", base_url=url, model="gpt-4")
    results = evaluate_mtbench(str(tiny_policy_dir), str(live), str(out), bench_dir=str(bench), max_new_tokens=4)
    lines = (out / "model_answers.jsonl").read_text().splitlines()
    assert "\n".join(lines[:2]) + "\n" == answers and len(lines) == 3  # torn tail dropped, first two kept
    assert results["n_judgments"] == 6 and len(handler.requests) == 6


def test_second_turn_sees_the_first_answer(tiny_policy_dir):
    from align.evals.common import Generator
    from align.rollout import Completion

    seen = []

    class Engine:
        def generate(self, prompts, n=1, sampling=None):
            seen.append((list(prompts), sampling.temperature))
            return [[Completion([], [1, 2], f"answer{len(seen)}-{i}", [0.0, 0.0], "stop")] for i in range(len(prompts))]

    gen = Generator.__new__(Generator)
    gen.engine, gen.chat, gen.suppress, gen.seed = Engine(), True, [], 0
    out = gen.answer_turns([["q1", "q1b"], ["q2", "q2b"]], 4, [0.0, 0.7])
    assert [[a for a, _ in x] for x in out] == [["answer1-0", "answer3-0"], ["answer2-0", "answer4-0"]]
    assert seen[2] == (
        [
            [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "answer1-0"},
                {"role": "user", "content": "q1b"},
            ]
        ],
        0.0,
    )
    assert seen[3][1] == 0.7 and seen[3][0][0][1] == {"role": "assistant", "content": "answer2-0"}
    gen.chat = False  # no chat template: a plain transcript
    assert (
        gen.prompt(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
        )
        == "User: a\n\nAssistant: b\n\nUser: c\n\nAssistant:"
    )


@pytest.mark.parametrize(
    "text, want",
    [
        ("Rating: [[5]]", 5.0),
        ("[[7.5]]", 7.5),
        ("[[ 8 ]]", 8.0),
        ("[[9/10]]", 9.0),
        ("Rating: 4", 4.0),
        ("rating = **6**", 6.0),
        ("score [3]", 3.0),
        ('e.g. "Rating: [[5]]" ... final: [[2]]', 2.0),
        ("[[0]]", None),
        ("[[11]]", None),
        ("no number", None),
        ("", None),
        (None, None),
        ("Rating: [[10]]", 10.0),
    ],
)
def test_parse_rating(text, want):
    assert parse_rating(text) == want


def test_aggregate_ignores_other_models_judges_and_questions():
    qs = [{"question_id": 1, "category": "a"}, {"question_id": 2, "category": "b"}]
    js = [
        {"question_id": 1, "model": "m", "judge": ["j", "p"], "turn": 1, "score": 4},
        {"question_id": 1, "model": "m", "judge": ["j", "p"], "turn": 2, "score": -1},
        {"question_id": 2, "model": "m", "judge": ["j", "p"], "turn": 1, "score": 8},
        {"question_id": 2, "model": "other", "judge": ["j", "p"], "turn": 1, "score": 1},
        {"question_id": 2, "model": "m", "judge": ["k", "p"], "turn": 1, "score": 1},
        {"question_id": 3, "model": "m", "judge": ["j", "p"], "turn": 1, "score": 1},
    ]
    r = aggregate(js, qs, "m", "j")
    assert (r["score"], r["turn_1"], r["turn_2"], r["n_judgments"], r["n_unparsed"]) == (6.0, 6.0, None, 3, 1)
    assert r["by_category"]["a"]["score"] == 4 and r["by_category"]["b"]["score"] == 8


def test_bad_input(tmp_path, tiny_policy_dir, bench, capsys):
    from align.cli import main

    rm = write_judge(tmp_path / "rm.yaml", kind="reward_model", path=str(tmp_path))
    good = write_judge(tmp_path / "g.yaml", kind="llm", base_url="http://127.0.0.1:9/v1", model="m")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = [
        (["--judge", str(rm)], "needs an llm judge"),
        (["--judge", str(good), "--limit", "-1"], "--limit '-1'"),
        (
            ["--judge", str(good), "--bench-dir", str(tmp_path / "empty")],
            "question.jsonl: MT-Bench questions not found",
        ),
        (["--judge", str(good), "--bench-dir", str(tmp_path / "nope")], "MT-Bench folder not found"),
    ]
    for argv, match in cases:
        rc = main(
            ["eval", "mtbench", "--model", str(tiny_policy_dir), "--output", str(out), "--bench-dir", str(bench), *argv]
        )
        lines = error_lines(capsys.readouterr().err)
        assert rc == 2 and len(lines) == 1 and match in lines[0], (argv, lines)
        assert not out.exists()
