"""The command line as a user runs it: bad input is one 'error:' line on stderr, exit status 2, nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = (
    "model:\n  name_or_path: tiny:llama\n  tiny_hidden_size: 32\n  tiny_layers: 1\n  tiny_heads: 1\n"
    "  tiny_intermediate_size: 64\n"
)


def run_align(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
    )
    return subprocess.run(
        [sys.executable, "-m", "align", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit status 2, no traceback, exactly one non-empty 'error:' line on stderr; returns it."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0][len("error:") :].strip()
    # anything else on stderr may only be library start-up noise (DeepSpeed's accelerator detection)
    others = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith("error:") and "real_accelerator" not in line and "[WARNING]" not in line
    ]
    assert not others, proc.stderr
    return errors[0]


def train_bad(tmp_path: Path, recipe_text: str) -> str:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(recipe_text, encoding="utf-8")
    out = tmp_path / "out"
    proc = run_align("train", str(recipe), "--output-dir", str(out))
    line = error_line(proc)
    assert not out.exists(), f"{out} was created by a failing run"
    return line


def test_unknown_key(tmp_path):
    line = train_bad(tmp_path, "description: x\ntrain:\n  lrr: 1.0e-4\n")
    assert "bad.yaml" in line and "'train.lrr'" in line and "did you mean 'train.lr'" in line


def test_wrong_type(tmp_path):
    line = train_bad(tmp_path, "description: x\ntrain:\n  batch_size: two\n")
    assert "bad.yaml" in line and "'train.batch_size'" in line and "expected int" in line


def test_missing_dataset_file(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    line = train_bad(tmp_path, f"description: x\n{TINY_MODEL}data:\n  train: {missing}\n")
    assert "nowhere.jsonl" in line and "not found" in line


def test_dataset_missing_a_column(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    line = train_bad(tmp_path, f"description: x\n{TINY_MODEL}data:\n  train: ./pairs.jsonl\n")
    assert "pairs.jsonl" in line and "row 1" in line and "'rejected'" in line


def test_missing_model_folder(tmp_path):
    line = train_bad(tmp_path, "description: x\nmodel:\n  name_or_path: /nonexistent/model\n")
    assert "model.name_or_path" in line and "/nonexistent/model" in line


def test_recipes_lists_descriptions():
    proc = run_align("recipes")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    shipped = sorted(
        p.relative_to(REPO / "recipes") for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts
    )
    assert len(lines) == len(shipped)
    for path, line in zip(shipped, lines):
        name, _, desc = line.partition(" ")
        assert name == str(path)
        assert desc.strip() and "INVALID" not in desc, line


def test_recipes_losses_lists_dpo():
    proc = run_align("recipes", "--losses")
    assert proc.returncode == 0, proc.stderr
    names = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"dpo", "sft"} <= names
