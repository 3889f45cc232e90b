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
