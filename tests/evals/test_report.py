"""Reports (PNG + Markdown) and the judge config file."""

from __future__ import annotations

import pytest

from align.errors import UserError
from align.evals.judge_config import load_judge_config
from align.evals.report import alpaca_report, arena_report, bar_chart, mtbench_report
from tests.evals.conftest import write_judge


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generic_bar_chart_for_tgc_per_difficulty(tmp_path):
    p = bar_chart(
        tmp_path / "sub" / "tgc.png",
        {"1": 80.0, "2": 45.5, "3": None},
        ylabel="TGC (%)",
        errors={"1": 5.0, "2": (3.0, 6.0)},
        reference=50.0,
        reference_label="half",
        title="TGC per difficulty",
    )
    assert _png(p) and sorted(x.name for x in p.parent.iterdir()) == ["tgc.png"]  # no temporary file left
    q = bar_chart(
        tmp_path / "grouped.png",
        {"a": 1.0, "b": 2.0},
        series={"t1": {"a": 1.0, "b": 2.0}, "t2": {"a": 3.0}},
        ylabel="score",
        ylim=(0, 10),
    )
    assert _png(q)


def test_reports(tmp_path):
    row = {
        "win_rate": 61.2,
        "standard_error": 1.5,
        "n_wins": 3,
        "n_wins_base": 2,
        "n_draws": 0,
        "n_total": 5,
        "discrete_win_rate": 60.0,
        "avg_length": 900,
        "length_controlled_winrate": None,
        "lc_standard_error": None,
    }
    alpaca_report(tmp_path, "m", row, meta={"annotator": "gpt4_turbo", "reference_generator": "gpt4_1106_preview"})
    md = (tmp_path / "report.md").read_text()
    assert _png(tmp_path / "report.png") and "| win_rate | 61.20 |" in md and "| length_controlled_winrate | — |" in md
    mt = {
        "model": "m",
        "judge": "j",
        "n_questions": 2,
        "score": 5.0,
        "turn_1": 6.0,
        "turn_2": 4.0,
        "n_judgments": 4,
        "n_unparsed": 0,
        "by_category": {"math": {"turn_1": 6.0, "turn_2": 4.0, "score": 5.0, "n": 4}},
        "reference_categories": ["math"],
    }
    (tmp_path / "mt").mkdir()
    mtbench_report(tmp_path / "mt", mt)
    assert (
        _png(tmp_path / "mt" / "report.png")
        and "| math | 6.00 | 4.00 | 5.00 | 4 |" in (tmp_path / "mt" / "report.md").read_text()
    )
    ah = {
        "model": "m",
        "baseline": "b",
        "judge": "j",
        "n_questions": 3,
        "win_rate": 40.0,
        "ci": [20.0, 60.0],
        "n_battles": 9,
        "n_unparsed": 0,
        "verdicts": {"tie": 1},
        "avg_tokens": 12.0,
    }
    (tmp_path / "ah").mkdir()
    arena_report(tmp_path / "ah", ah)
    assert (
        _png(tmp_path / "ah" / "report.png")
        and "| 95% CI | 20.00 - 60.00 |" in (tmp_path / "ah" / "report.md").read_text()
    )


def test_judge_config(tmp_path):
    spec = load_judge_config(
        write_judge(
            tmp_path / "gpt4_turbo.yaml",
            kind="llm",
            base_url="https://api.openai.com/v1",
            model="gpt-4-turbo",
            api_key_env="MY_KEY",
            top_logprobs=5,
            timeout=30,
            retries=2,
        )
    )
    assert (spec.name, spec.judge.kind, spec.judge.model, spec.judge.api_key_env, spec.prompt, spec.api) == (
        "gpt4_turbo",
        "llm",
        "gpt-4-turbo",
        "MY_KEY",
        "alpaca_eval",
        "chat",
    )
    assert (spec.top_logprobs, spec.timeout, spec.retries) == (5, 30.0, 2)
    for keys, match in [
        (dict(kind="llm", base_url="ftp://x", model="m"), "not an http"),
        (dict(kind="llm", base_url="http://x", model="m", top_logprobs=50), "top_logprobs"),
        (dict(kind="llm", base_url="http://x", model="m", top_logprobs="5"), "expected a number"),
        (dict(kind="llm", base_url="http://x", model="m", retries=1.5), "expected a number"),
        (dict(kind="llm", base_url="http://x", model=3), "expected a string"),
        (dict(kind="llm", base_url="http://x", model="m", prompt="cot"), "key 'prompt'"),
        (dict(kind="llm", base_url="http://x", model="m", api="grpc"), "key 'api'"),
        (dict(base_url="http://x"), "'kind' is required"),
        (dict(kind="vpl", path=str(tmp_path)), "key 'context'"),
    ]:
        with pytest.raises(UserError, match=match):
            load_judge_config(write_judge(tmp_path / "j.yaml", **keys))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_judge_config(tmp_path / "list.yaml")


def test_shipped_judge_configs_load():
    from align.paths import REPO_ROOT

    files = sorted((REPO_ROOT / "evals" / "judges").glob("*.yaml"))
    assert files
    for f in files:
        text = f.read_text()
        if "kind: llm" in text:
            assert load_judge_config(f).judge.kind == "llm"
