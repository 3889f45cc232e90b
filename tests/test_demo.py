"""The quickstart pipeline end to end, in its --quick size (the full `make demo` is the same code, bigger)."""

import json

from align.demo import run_demo


def test_quick_demo_writes_eval_json_and_plots(tmp_path):
    summary = run_demo(str(tmp_path / "quickstart"), quick=True)
    out = tmp_path / "quickstart"
    data = json.loads((out / "eval.json").read_text())
    assert data["stages"] == ["sft", "dpo", "inpo"]
    for stage in ("sft", "dpo", "inpo"):
        assert 0.0 <= data[stage]["accuracy"] <= 1.0 and 0.0 <= data[stage]["win_rate_vs_sft"] <= 1.0
        assert (out / stage / "summary.json").is_file() and (out / stage / "plots" / "loss.png").is_file()
    assert data["sft"]["win_rate_vs_sft"] == 0.5
    assert (out / "plots" / "eval.png").is_file() and data["pairs"] > 0 and summary["pairs"] == data["pairs"]
