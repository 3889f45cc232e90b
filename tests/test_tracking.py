"""Live tracking and evaluation during training: the trackers receive every metrics row (evaluation rows included)
at the same step as metrics.jsonl, with the resolved recipe as configuration."""

from __future__ import annotations

import json

import pytest

from align.paths import REPO_ROOT
from tests.conftest import error_lines, run_align

DPO = str(REPO_ROOT / "recipes" / "dpo" / "tiny.yaml")


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(rows):
    """{(metric, step): value} of the numeric columns of metrics.jsonl."""
    return {(k, r["step"]): float(v) for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}


def test_tensorboard_scalars_equal_metrics_jsonl_eval_included(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    res = run_align(
        "train", DPO, "-o", str(out), "logging.report_to=[tensorboard]", "train.eval_steps=10", "logging.progress=false"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = _rows(out)
    assert [r["step"] for r in rows if "eval/loss" in r] == [10, 16]  # every 10 steps and at the end
    assert (out / "eval_samples" / "step-10.jsonl").is_file()
    (run_dir,) = (out / "tensorboard").iterdir()
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    got = {(tag, e.step): e.value for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)}
    want = _expected(rows)
    assert set(got) == set(want) and all(abs(got[k] - want[k]) <= 1e-6 * max(1.0, abs(want[k])) for k in want)
    assert {"eval/loss", "eval/rewards/accuracy", "loss"} <= {k for k, _ in got}
    hparams = [p for p in run_dir.rglob("events.out.tfevents*") if p.parent != run_dir]
    assert hparams  # the resolved recipe, stored as the run's hyperparameters


def test_trackio_offline_logs_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # before trackio is imported: it reads it then
    pytest.importorskip("trackio")
    out = tmp_path / "run"
    res = run_align(
        "train",
        DPO,
        "-o",
        str(out),
        "logging.report_to=[trackio]",
        "logging.run_name=tiny-dpo",
        "train.max_steps=6",
        "logging.progress=false",
        env={"TRACKIO_DIR": str(tmp_path / "trackio")},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("tiny-dpo", "tiny-dpo")
    got = {
        (k, r["step"]): float(v)
        for r in logs
        for k, v in r.items()
        if k not in ("step", "timestamp") and isinstance(v, (int, float))
    }
    want = _expected(_rows(out))
    assert want and all(abs(got[k] - want[k]) <= 1e-6 * max(1.0, abs(want[k])) for k in want)


def test_a_tracker_whose_package_is_missing_or_unknown_is_one_line(tmp_path):
    res = run_align("train", DPO, "-o", str(tmp_path / "x"), "logging.report_to=[tensorbored]")
    assert res.returncode == 2 and "unknown tracker 'tensorbored'" in error_lines(res.stderr)[-1]
    assert not (tmp_path / "x").exists()


def test_online_evaluation_during_training_is_logged_with_samples(tmp_path, rm_judge):
    from align.config import load_recipe
    from align.trainers import run

    over = [
        "model.tiny_hidden_size=64",
        "model.tiny_layers=2",
        "model.tiny_heads=2",
        "model.tiny_intermediate_size=128",
        "online.prompts_per_iteration=8",
        "rollout.n=3",
        "rollout.max_new_tokens=6",
        "online.iterations=2",
        "train.batch_size=4",
        "train.eval_steps=1",
        "eval.size=6",
        "eval.max_new_tokens=6",
        "logging.progress=false",
        "logging.plots=false",
    ]
    recipe = load_recipe(REPO_ROOT / "recipes" / "inpo" / "tiny.yaml", over + rm_judge)
    summary = run(recipe, tmp_path / "inpo")
    rows = _rows(tmp_path / "inpo")
    evals = [r for r in rows if "eval/win_rate_vs_initial" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(0 <= r["eval/win_rate_vs_initial"] <= 1 for r in evals)
    assert "eval/win_rate_vs_initial" in summary["final"] and (tmp_path / "inpo" / "eval_reference.json").is_file()
    assert len((tmp_path / "inpo" / "eval_samples" / "iteration-2.jsonl").read_text().splitlines()) == 4
