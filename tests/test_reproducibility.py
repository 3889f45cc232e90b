"""Same seed, same recipe -> identical metrics.jsonl (timing columns aside) on CPU, for every trainer: offline (DPO,
SFT), online (SPO, INPO), reward (VPL; BT shares its code path), agent (LOOP on the sandboxed built-in world)."""

import json

import pytest

from align.config import load_recipe
from align.paths import REPO_ROOT
from align.trainers import run

TIMING = {"tokens_per_second"}
SMALL_ONLINE = [
    "model.tiny_hidden_size=64",
    "model.tiny_layers=2",
    "model.tiny_heads=2",
    "model.tiny_intermediate_size=128",
    "online.prompts_per_iteration=12",
    "rollout.n=4",
    "rollout.max_new_tokens=6",
    "online.iterations=2",
    "train.batch_size=8",
]


def _rows(path):
    return [
        {k: v for k, v in json.loads(x).items() if k not in TIMING}
        for x in (path / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("dpo/tiny.yaml", ["train.save_steps=0"]),
        ("sft/tiny.yaml", ["data.builtin_size=256", "train.epochs=1"]),
        ("spo/tiny.yaml", SMALL_ONLINE),
        ("inpo/tiny.yaml", SMALL_ONLINE),
        (
            "reward/pets-vpl.yaml",
            [
                "model.name_or_path=tiny:llama",
                "data.limit=300",
                "data.max_length=96",
                "data.max_prompt_length=64",
                "train.max_steps=6",
                "train.logging_steps=2",
            ],
        ),
        (
            "loop/tiny.yaml",
            [
                "model.tiny_max_positions=256",
                "rollout.n=2",
                "rollout.max_new_tokens=16",
                "agent.tasks_per_iteration=4",
                "agent.iterations=2",
                "agent.eval_split=null",
                "train.batch_size=4",
            ],
        ),
    ],
)
def test_same_seed_same_metrics(tmp_path, recipe, overrides):
    outs = []
    for name in ("a", "b"):
        r = load_recipe(REPO_ROOT / "recipes" / recipe, overrides + ["logging.progress=false", "logging.plots=false"])
        run(r, tmp_path / name)
        outs.append(_rows(tmp_path / name))
    assert outs[0] == outs[1] and len(outs[0]) >= 2
    other = load_recipe(
        REPO_ROOT / "recipes" / recipe, overrides + ["train.seed=1", "logging.progress=false", "logging.plots=false"]
    )
    run(other, tmp_path / "c")
    assert _rows(tmp_path / "c") != outs[0]  # the seed matters
