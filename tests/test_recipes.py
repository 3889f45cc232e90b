"""Every shipped recipe passes `align train --dry-run`; the recipe listing works; dry-run catches launch conflicts."""

import pytest

from align.cli import main
from align.paths import REPO_ROOT

RECIPES = sorted(p for p in (REPO_ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_there_is_a_recipe_per_loss():
    from align.config import load_recipe
    from align.losses import LOSSES

    used = {load_recipe(p).loss.name for p in RECIPES}
    assert set(LOSSES) - {"ipo_norm", "inpo"} <= used  # inpo arrives with the online trainer


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO_ROOT / "recipes")))
def test_dry_run(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert main(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run ok" in out


def test_dry_run_rejects_a_reference_copy_under_zero3(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    rc = main(["train", str(REPO_ROOT / "recipes/dpo/llama3-8b-zero3.yaml"), "--dry-run", "train.reference=model"])
    assert rc == 2 and "ZeRO-3" in capsys.readouterr().err


def test_dry_run_missing_accelerate_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    rc = main(["train", str(REPO_ROOT / "recipes/dpo/tiny.yaml"), "--dry-run", "accelerate_config=/nonexistent.yaml"])
    assert rc == 2 and "/nonexistent.yaml" in capsys.readouterr().err


def test_recipes_listing(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "dpo/tiny.yaml" in out and "INVALID" not in out
    assert main(["recipes", "--explain"]) == 0
    out = capsys.readouterr().out
    for key in ("train.lr", "train.eval_steps", "eval.samples", "logging.report_to", "logging.run_name"):
        assert f"\n{key} " in out, key  # every key, new ones included, with its default and help
    assert main(["recipes", "--losses"]) == 0
    out = capsys.readouterr().out
    assert "arXiv:2305.18290" in out and "arXiv:2407.00617" in out  # each loss with its paper


def test_dry_run_checks_the_online_judge(capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    rc = main(["train", str(REPO_ROOT / "recipes/inpo/tiny.yaml"), "--dry-run", "judge.kind=llm"])
    assert rc == 2 and "judge.base_url" in capsys.readouterr().err
    rc = main(
        [
            "train",
            str(REPO_ROOT / "recipes/spo/tiny.yaml"),
            "--dry-run",
            "judge.kind=reward_model",
            "judge.path=/nonexistent",
        ]
    )
    assert rc == 2 and "/nonexistent" in capsys.readouterr().err
