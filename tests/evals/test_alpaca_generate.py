"""``align eval alpaca --model``: generation + judging + scoring end to end on CPU, resume, reference loading, bad
input."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from align.errors import UserError
from align.evals.alpaca import COLUMNS
from align.evals.alpaca_generate import evaluate_alpaca, load_reference
from tests.conftest import error_lines, run_align
from tests.evals.conftest import write_judge

ANNOTATION_KEYS = {
    "instruction",
    "output_1",
    "generator_1",
    "dataset",
    "output_2",
    "generator_2",
    "annotator",
    "preference",
    "time_per_example",
    "raw_completion",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The shared reference rows (skips without the shared data)."""
    from align.evals.alpaca_generate import shared_reference

    path = shared_reference()
    if path is None:
        pytest.skip("shared AlpacaEval reference outputs not found (set ALIGN_SHARED_DATA)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _check_outputs(out: Path, reference: list[dict], name: str, n: int) -> dict:
    outputs = json.loads((out / "model_outputs.json").read_text())
    assert [r["instruction"] for r in outputs] == [r["instruction"] for r in reference[:n]]
    assert all(set(r) == {"dataset", "instruction", "output", "generator"} and r["generator"] == name for r in outputs)
    assert [r["dataset"] for r in outputs] == [r["dataset"] for r in reference[:n]]
    ann = json.loads((out / "annotations.json").read_text())
    assert len(ann) == n and all(set(a) == ANNOTATION_KEYS for a in ann)
    for a, ref, o in zip(ann, reference, outputs):
        assert a["instruction"] == ref["instruction"] and a["output_1"] == ref["output"]
        assert a["generator_1"] == "gpt4_1106_preview" and a["generator_2"] == name and a["output_2"] == o["output"]
        assert a["preference"] is None or 1.0 <= a["preference"] <= 2.0
    board = json.loads((out / "leaderboard.json").read_text())
    assert list(board) == [name] and list(board[name]) == list(COLUMNS)
    row = board[name]
    probs = [a["preference"] - 1 for a in ann if a["preference"] is not None]
    assert row["n_total"] == len(probs) and row["win_rate"] == pytest.approx(100 * sum(probs) / len(probs))
    assert row["avg_length"] == sum(len(a["output_2"]) for a in ann) // n
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "AlpacaEval 2" in (out / "report.md").read_text()
    return board


def test_cli_end_to_end_with_align_serve_judge(tmp_path, tiny_policy_dir, align_serve_judge, reference):
    """The acceptance run: tiny model, a local LLM judge served by an `align serve` process (weighted m/M prompt),
    `align eval alpaca --model ... --limit 3` as a subprocess."""
    judge = write_judge(
        tmp_path / "local.yaml",
        kind="llm",
        base_url=align_serve_judge,
        model="mm-judge",
        api="chat",
        top_logprobs=20,
        name="tiny-judge",
    )
    out = tmp_path / "run"
    proc = run_align(
        "eval",
        "alpaca",
        "--model",
        str(tiny_policy_dir),
        "--judge",
        str(judge),
        "--output",
        str(out),
        "--limit",
        "3",
        "--max-new-tokens",
        "12",
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    board = _check_outputs(out, reference, "tiny-policy", 3)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == board
    ann = json.loads((out / "annotations.json").read_text())
    for a in ann:  # this judge always prefers the first position: both orders averaged cancel it to ~1/2
        raw = a["raw_completion"]
        assert raw["p_first_model_first"] > 0.5 and raw["p_first_reference_first"] > 0.5
        assert a["preference"] == pytest.approx(
            1 + (raw["p_first_model_first"] + 1 - raw["p_first_reference_first"]) / 2
        )
        assert a["annotator"] == "tiny-judge"
    row = board["tiny-policy"]
    assert row["n_total"] == 3 and row["length_controlled_winrate"] is not None and row["lc_standard_error"] is not None
    assert "[eval alpaca] generated 3/3" in proc.stderr and "judged 3/3" in proc.stderr


def test_resume_skips_finished_rows(tmp_path, tiny_policy_dir, mm_judge_url, reference, capsys):
    live = write_judge(
        tmp_path / "live.yaml",
        kind="llm",
        base_url=mm_judge_url,
        model="mm-judge",
        api="completions",
        top_logprobs=20,
        name="tiny-judge",
    )
    out = tmp_path / "run"
    evaluate_alpaca(str(tiny_policy_dir), str(live), str(out), limit=2, max_new_tokens=6, name="p")
    first = json.loads((out / "annotations.json").read_text())
    capsys.readouterr()
    evaluate_alpaca(str(tiny_policy_dir), str(live), str(out), limit=3, max_new_tokens=6, name="p")
    err = capsys.readouterr().err
    assert "2 already answered, 1 to generate" in err and "2 already judged, 1 to judge" in err
    ann = json.loads((out / "annotations.json").read_text())
    assert ann[:2] == first and len(ann) == 3
    # the same annotator behind a dead endpoint: nothing left to judge, so it is never called
    dead = write_judge(
        tmp_path / "dead.yaml",
        kind="llm",
        base_url="http://127.0.0.1:9/v1",
        model="x",
        retries=0,
        timeout=2,
        name="tiny-judge",
    )
    name, row = evaluate_alpaca(str(tiny_policy_dir), str(dead), str(out), limit=3, max_new_tokens=6, name="p")
    err = capsys.readouterr().err
    assert "0 to generate" in err and "0 to judge" in err
    _check_outputs(out, reference, "p", 3)
    # a judge that fails keeps what is finished and says how to resume
    with pytest.raises(UserError, match="rerun the same command to resume"):
        evaluate_alpaca(str(tiny_policy_dir), str(dead), str(out), limit=4, max_new_tokens=6, name="p")
    assert len(json.loads((out / "model_outputs.json").read_text())) == 4
    assert json.loads((out / "annotations.json").read_text()) == ann


def test_reward_model_judge(tmp_path, tiny_policy_dir, tiny_tokenizer, reference):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from align.judges import RewardModelJudge

    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    judge = write_judge(tmp_path / "rm.yaml", kind="reward_model", path=str(tmp_path / "rm"))
    out = tmp_path / "run"
    name, row = evaluate_alpaca(str(tiny_policy_dir), str(judge), str(out), limit=2, max_new_tokens=6)
    _check_outputs(out, reference, name, 2)
    ann = json.loads((out / "annotations.json").read_text())
    rm = RewardModelJudge(str(tmp_path / "rm"))
    for a in ann:
        r_model, r_ref = rm.rewards([a["instruction"]] * 2, [a["output_2"], a["output_1"]])
        assert a["preference"] == pytest.approx(1 + 1 / (1 + math.exp(-(r_model - r_ref))), abs=1e-5)
        assert a["annotator"] == "rm"


def test_custom_reference_file_has_no_lc(tmp_path, tiny_policy_dir, mm_judge_url):
    ref = tmp_path / "ref.jsonl"
    ref.write_text(
        "".join(json.dumps({"instruction": f"Say {w}.", "output": w, "generator": "me"}) + "\n" for w in ("a", "bb"))
    )
    judge = write_judge(tmp_path / "j.yaml", kind="llm", base_url=mm_judge_url, model="mm-judge", top_logprobs=20)
    out = tmp_path / "run"
    name, row = evaluate_alpaca(str(tiny_policy_dir), str(judge), str(out), reference=str(ref), max_new_tokens=4)
    assert row["n_total"] == 2 and row["length_controlled_winrate"] is None
    ann = json.loads((out / "annotations.json").read_text())
    assert [a["output_1"] for a in ann] == ["a", "bb"] and {a["generator_1"] for a in ann} == {"me"}


# ----------------------------------------------------------------------------- reference loading (local paths only)


def test_load_reference_formats(tmp_path):
    rows = [
        {"instruction": "q1", "output": "a1", "generator": "g", "dataset": "d"},
        {"instruction": "q2", "output": "a2"},
    ]
    for name, write in (
        ("r.json", lambda p: p.write_text(json.dumps(rows))),
        ("r.json.gz", lambda p: gzip.open(p, "wt").write(json.dumps(rows))),
        ("r.jsonl", lambda p: p.write_text("\n".join(map(json.dumps, rows)))),
    ):
        write(tmp_path / name)
        got, where = load_reference(str(tmp_path / name))
        assert where == str(tmp_path / name)
        assert got == [
            {"instruction": "q1", "output": "a1", "generator": "g", "dataset": "d"},
            {"instruction": "q2", "output": "a2", "generator": "reference", "dataset": ""},
        ]


def test_load_reference_default_is_the_shared_copy(reference):
    got, where = load_reference()
    assert where.endswith("gpt4_1106_preview.json.gz") and len(got) == 805 == len(reference)
    assert got[0]["instruction"] == reference[0]["instruction"] and {r["generator"] for r in got} == {
        "gpt4_1106_preview"
    }


@pytest.mark.parametrize(
    "content, match",
    [
        ("[]", "non-empty list"),
        ("{}", "non-empty list"),
        ("[1]", "row 0: expected an object"),
        ('[{"output": "x"}]', "row 0: 'instruction'"),
        ('[{"instruction": "q"}]', "row 0: 'output'"),
        ('[{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "b"}]', "row 1: duplicate"),
        ("[{", "not a readable"),
    ],
)
def test_load_reference_bad_rows(tmp_path, content, match):
    (tmp_path / "r.json").write_text(content)
    with pytest.raises(UserError, match=match):
        load_reference(str(tmp_path / "r.json"))
    with pytest.raises(UserError, match="not found"):
        load_reference(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _cli(argv, capsys) -> tuple[int, list[str]]:
    from align.cli import main

    rc = main(argv)
    return rc, error_lines(capsys.readouterr().err)


def test_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_policy_dir, capsys):
    out = tmp_path / "out"
    model = str(tiny_policy_dir)
    good = write_judge(tmp_path / "good.yaml", kind="llm", base_url="http://127.0.0.1:9/v1", model="m")
    unknown = write_judge(
        tmp_path / "unknown.yaml", kind="llm", base_url="http://127.0.0.1:9/v1", model="m", colour="red"
    )
    no_url = write_judge(tmp_path / "nourl.yaml", kind="llm", model="m")
    rm_missing = write_judge(tmp_path / "rm.yaml", kind="reward_model", path=str(tmp_path / "nope"))
    checker = write_judge(tmp_path / "checker.yaml", kind="checker")
    (tmp_path / "bad.yaml").write_text("kind: [llm\n")
    (tmp_path / "ann.json").write_text("[]")
    cases = [
        (["--annotations", str(tmp_path / "ann.json"), "--model", model], "mutually exclusive"),
        ([], "one of --annotations"),
        (["--model", model], "--judge FILE is required"),
        (["--annotations", str(tmp_path / "ann.json"), "--limit", "3"], "--limit applies only with --model"),
        (["--model", str(tmp_path / "nomodel"), "--judge", str(good)], "--model"),
        (["--model", model, "--judge", str(tmp_path / "missing.yaml")], "judge config file not found"),
        (["--model", model, "--judge", str(unknown)], "unknown key 'colour'"),
        (["--model", model, "--judge", str(no_url)], "key 'base_url' is required"),
        (["--model", model, "--judge", str(rm_missing)], "key 'path'"),
        (["--model", model, "--judge", str(checker)], "key 'kind'"),
        (["--model", model, "--judge", str(tmp_path / "bad.yaml")], "not a readable YAML"),
        (["--model", model, "--judge", str(good), "--limit", "0"], "--limit '0': must be at least 1"),
        (["--model", model, "--judge", str(good), "--limit", "x"], "--limit 'x': not an integer"),
        (
            ["--model", model, "--judge", str(good), "--reference", str(tmp_path / "none.json")],
            "reference file not found",
        ),
    ]
    for argv, match in cases:
        rc, lines = _cli(["eval", "alpaca", *argv, "--output", str(out)], capsys)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], (argv, lines)
        assert not out.exists(), argv


def test_outputs_of_another_model_are_refused(tmp_path, tiny_policy_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_outputs.json").write_text(json.dumps([{"instruction": "q", "output": "a", "generator": "other"}]))
    judge = write_judge(tmp_path / "j.yaml", kind="llm", base_url="http://127.0.0.1:9/v1", model="m")
    rc, lines = _cli(
        ["eval", "alpaca", "--model", str(tiny_policy_dir), "--judge", str(judge), "--output", str(out)], capsys
    )
    assert rc == 2 and len(lines) == 1 and "not an output of 'tiny-policy'" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["model_outputs.json"]


def test_hub_id_goes_through_datasets_and_fails_cleanly_offline(monkeypatch):
    """The hub path without the network: ``datasets`` and ``huggingface_hub`` replaced by stand-ins."""
    import sys
    import types

    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return [{"instruction": "q", "output": "a", "generator": "gpt4_turbo", "dataset": "d"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows, where = load_reference("tatsu-lab/alpaca_eval")
    assert (
        calls == [("tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline", "eval")] and where == "tatsu-lab/alpaca_eval"
    )
    assert rows == [{"instruction": "q", "output": "a", "generator": "gpt4_turbo", "dataset": "d"}]

    def offline(*a, **k):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=offline))
    with pytest.raises(
        UserError, match=r"cannot load from the hub \(offline mode is enabled\); offline, pass --reference FILE"
    ):
        load_reference("tatsu-lab/alpaca_eval:alpaca_eval")
