"""`align eval agent --world builtin`: transcripts, TGC/SGC report (JSON, Markdown, PNG), resumable, bad input."""

from __future__ import annotations

import json

from align.agents.world import tasks_for
from align.models import build_tiny_model, char_tokenizer
from tests.conftest import error_lines, run_align


def _tiny(tmp_path):
    tok = char_tokenizer()
    model = build_tiny_model(tokenizer=tok, hidden_size=64, layers=2, heads=2, intermediate_size=128, max_positions=512)
    path = tmp_path / "policy"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eval_agent_writes_reports_and_resumes(tmp_path):
    policy, out = _tiny(tmp_path), tmp_path / "eval"
    args = [
        "eval",
        "agent",
        "--model",
        str(policy),
        "--world",
        "builtin",
        "--split",
        "test",
        "--output",
        str(out),
        "--limit",
        "3",
        "--max-new-tokens",
        "24",
    ]
    r = run_align(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["tasks"] == 3 and 0.0 <= summary["tgc"] <= 100.0
    report = json.loads((out / "report.json").read_text())
    assert {"tgc", "sgc", "reward", "tgc_by_difficulty", "tasks", "scenarios", "split"} <= set(report)
    lines = (out / "transcripts.jsonl").read_text().splitlines()
    ids = [json.loads(x)["task"] for x in lines]
    assert ids == [t.id for t in tasks_for("test")[:3]]
    assert "TGC" in (out / "report.md").read_text() and (out / "report.png").stat().st_size > 1000
    # a random policy fails the checks: TGC 0 is the honest number for it
    assert report["tgc"] == 0.0
    again = run_align(*args[:-4], "--limit", "4", "--max-new-tokens", "24")  # one more task: only it runs
    assert again.returncode == 0
    assert "3 already done, 1 to run" in again.stderr
    assert len((out / "transcripts.jsonl").read_text().splitlines()) == 4


def test_eval_agent_bad_model_is_one_line(tmp_path):
    r = run_align("eval", "agent", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "nope" in lines[0]
    assert not (tmp_path / "o").exists()


def test_eval_agent_several_worlds_name_tasks_by_world(tmp_path):
    from align.evals.agent import evaluate_agent

    policy = _tiny(tmp_path)
    report = evaluate_agent(str(policy), str(tmp_path / "e"), split="test", seed=[0, 3], max_new_tokens=8)
    ids = [f"w{s}:{t.id}" for s in (0, 3) for t in tasks_for("test", seed=s)]
    assert report["tasks"] == len(ids) == 2 * len(tasks_for("test")) and report["world_seeds"] == [0, 3]
    assert list(report["passed"]) == ids and report["scenarios"] == 2 * len({t.scenario for t in tasks_for("test")})
    # the same scenario in two worlds holds different tasks (names, amounts)
    assert tasks_for("test", seed=0)[0].instruction != tasks_for("test", seed=3)[0].instruction
    bad = run_align("eval", "agent", "--model", str(policy), "--output", str(tmp_path / "o"), "--world-seeds", "0,x")
    assert bad.returncode == 2 and "comma-separated integers" in bad.stderr
