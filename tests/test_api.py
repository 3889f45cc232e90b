"""The Python API (align.train): the README's example runs as written; in-memory rows and model objects go through
the same checks and code paths as files and folders."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import align
from align.config import load_recipe
from align.errors import UserError
from align.memory import MEMORY
from align.paths import REPO_ROOT
from tests.conftest import metrics_rows

PAIRS = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}, {"prompt": "Sky?", "chosen": "blue", "rejected": "red"}]


def readme_example() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path):
    code = readme_example().replace('"recipes/', f'"{REPO_ROOT}/recipes/')
    assert len(code.strip().splitlines()) <= 10
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "api"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and float(done.stdout.split()[-1]) == pytest.approx(summary["final"]["loss"])
    assert load_recipe(run / "recipe.yaml").data.train == "memory:train_dataset"  # says where its rows came from
    assert [r["step"] for r in metrics_rows(run)] == [1, 2, 3, 4]


def test_a_model_object_is_trained_in_place_with_a_dict_recipe(tmp_path, tiny_model, tiny_tokenizer):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    recipe = {"trainer": "preference", "loss": {"name": "ipo"}, "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2}}
    summary = align.train(
        recipe,
        output_dir=tmp_path / "run",
        train_dataset=PAIRS * 8,
        eval_dataset=PAIRS,
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        overrides=["logging.progress=false", "train.eval_steps=2"],
    )
    assert summary["steps"] == 2 and "eval" in json.dumps(summary)
    assert any((before[k] - v).abs().max() > 0 for k, v in tiny_model.state_dict().items())
    saved = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert (saved.model.name_or_path, saved.data.eval, saved.loss.name) == (
        "memory:model",
        "memory:eval_dataset",
        "ipo",
    )
    assert MEMORY == {}


@pytest.mark.parametrize(
    "kwargs, line",
    [
        (
            {"train_dataset": [{"prompt": "x", "chosen": "y"}] * 8},
            "memory:train_dataset: row 0: missing column 'rejected'",
        ),
        ({"train_dataset": 5}, "train_dataset: expected a datasets.Dataset or a list of dicts, got int"),
        ({"train_dataset": []}, "train_dataset: no rows"),
        ({"train_dataset": PAIRS, "model": object()}, "align.train: pass model and tokenizer together"),
        ({"overrides": ["agent.iterations=5"]}, "key 'agent.iterations' is not read by trainer 'preference'"),
    ],
)
def test_bad_input_raises_one_line_and_writes_nothing(tmp_path, kwargs, line):
    with pytest.raises(UserError) as e:
        align.train(REPO_ROOT / "recipes" / "dpo" / "tiny.yaml", output_dir=tmp_path / "run", **kwargs)
    assert line in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists() and MEMORY == {}


def test_memory_sources_outside_the_api_are_refused(tmp_path):
    from tests.conftest import error_lines, run_align

    bad = run_align("train", str(REPO_ROOT / "recipes" / "dpo" / "tiny.yaml"), "data.train=memory:train_dataset")
    assert bad.returncode == 2 and "exist only inside align.train" in error_lines(bad.stderr)[-1]
