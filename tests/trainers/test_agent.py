"""The agent trainer (LOOP) end to end on a tiny policy with a toy environment; advantages and the loop loss by hand."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from align.agents.play import scores
from align.config import load_recipe
from align.errors import UserError
from align.losses import PairBatch, get_loss
from align.paths import REPO_ROOT
from align.trainers.agent import advantages, train

RECIPE = REPO_ROOT / "recipes" / "loop" / "tiny.yaml"
SMALL = [
    "model.tiny_max_positions=256",
    "rollout.n=3",
    "rollout.max_new_tokens=12",
    "agent.tasks_per_iteration=4",
    "agent.iterations=3",
    "agent.epochs_per_iteration=2",
    "agent.eval_split=null",
    "train.batch_size=4",
    "train.lr=1e-3",
    "logging.progress=false",
    "logging.plots=false",
]


@dataclass
class ToyTask:
    id: str
    scenario: str
    difficulty: int = 1


class ToyEnv:
    """Two turns: the first gets an observation back, the second ends the episode; reward = an arbitrary but
    deterministic function of what the model wrote (the mechanics, not learning, are under test here)."""

    def __init__(self, task):
        self.task, self.said = task, []

    def reset(self):
        return f"task {self.task.id}: write e"

    def step(self, text):
        self.said.append(text)
        return ("ok, again", False) if len(self.said) < 2 else (None, True)

    def evaluate(self):
        text = "".join(self.said)
        r = (sum(map(ord, text)) % 11) / 10
        return {"passed": int(r * 10), "total": 10, "reward": r, "success": r >= 0.99}

    def close(self):
        pass


TASKS = [ToyTask(f"t{i}", f"s{i % 3}") for i in range(8)]


@pytest.fixture(autouse=True)
def toy_world(monkeypatch):
    import align.trainers.agent as A

    monkeypatch.setattr(A, "load_tasks", lambda recipe, split: TASKS)


def test_leave_one_out_and_grpo_advantages_by_hand():
    assert advantages([1.0, 0.0, 0.5], "loo") == pytest.approx([1 - 0.25, 0 - 0.75, 0.5 - 0.5])
    std = math.sqrt(((0.5) ** 2 + 0.5**2 + 0) / 2)
    assert advantages([1.0, 0.0, 0.5], "grpo") == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0])


def test_loop_loss_by_hand_token_and_trajectory():
    spec = get_loss("loop")
    lp = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]])
    old = torch.tensor([[math.log(0.4), math.log(0.2), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    b = PairBatch(
        chosen_logps=lp.sum(-1),
        chosen_lengths=mask.sum(-1),
        token_logps=lp,
        old_token_logps=old,
        token_mask=mask,
        advantages=torch.tensor([2.0]),
    )
    cfg = load_recipe(RECIPE).loss  # clip_eps 0.1
    loss, m = spec.fn(b, cfg)
    # rho = (1.25, 1.0): min(1.25*2, 1.1*2) = 2.2 and 2.0; mean over the 2 model tokens, negated
    assert loss.item() == pytest.approx(-(2.2 + 2.0) / 2)
    assert m["loop/clip_fraction"].item() == pytest.approx(0.5)
    cfg.clip_eps = 0.2
    cfg.importance = "trajectory"  # LOOP's ablation (ml-loop): w = exp(sum_t log rho_t) = 1.25 -> clipped at 1.2
    loss, m = spec.fn(b, cfg)
    assert loss.item() == pytest.approx(-1.2 * 2.0) and m["loop/ratio"].item() == pytest.approx(1.25)
    cfg.importance = "sequence_mean"  # GSPO: w = exp(mean_t log rho_t) = 1.118, inside [0.8, 1.2]
    loss, m = spec.fn(b, cfg)
    assert loss.item() == pytest.approx(-math.exp(math.log(1.25) / 2) * 2.0) and m["loop/clip_fraction"].item() == 0
    cfg.importance, cfg.clip_eps_low = "token", 1 - 1 / 1.2  # ml-loop's lower bound 1/(1+eps)
    b.advantages = torch.tensor([-2.0])
    b.old_token_logps = torch.tensor([[math.log(0.61), math.log(0.2), 0.0]])  # rho_0 = 0.5/0.61 = 0.8197
    loss, m = spec.fn(b, cfg)
    # 0.8197 < 1/1.2 = 0.8333: clipped for A < 0 (min(-1.639, -1.667) = -1.667); rho_1 = 1
    assert loss.item() == pytest.approx((2.0 / 1.2 + 2.0) / 2) and m["loop/clip_fraction"].item() == 0.5
    cfg.clip_eps_low = None  # symmetric: 0.8197 > 0.8 is not clipped
    loss, m = spec.fn(b, cfg)
    assert loss.item() == pytest.approx((2.0 * 0.5 / 0.61 + 2.0) / 2) and m["loop/clip_fraction"].item() == 0


def test_scores_tgc_sgc():
    rows = [
        {"task": "a", "scenario": "s", "success": True, "reward": 1.0, "difficulty": 1},
        {"task": "b", "scenario": "s", "success": False, "reward": 0.5, "difficulty": 2},
        {"task": "c", "scenario": "u", "success": True, "reward": 1.0, "difficulty": 1},
    ]
    sc = scores(rows)
    assert (
        sc["tgc"] == pytest.approx(200 / 3) and sc["sgc"] == 50.0 and sc["tgc_by_difficulty"] == {"1": 100.0, "2": 0.0}
    )


def test_loop_trains_masks_environment_tokens_and_resumes_after_a_crash_mid_rollout(tmp_path):
    recipe = load_recipe(RECIPE, SMALL)
    full = train(recipe, tmp_path / "full", env_for=ToyEnv)
    assert full["trainer"] == "agent" and full["steps"] == 3
    ep = json.loads((tmp_path / "full" / "rollouts" / "iter-1.json").read_text())["episodes"]
    assert len(ep) == 12 and {e["turns"] for e in ep} == {2}
    for e in ep:  # model tokens carry log-probs; environment tokens are masked with 0.0
        assert len(e["token_ids"]) == len(e["mask"]) == len(e["logprobs"])
        assert all(lp == 0.0 for lp, m in zip(e["logprobs"], e["mask"]) if not m)
        assert 0 < sum(e["mask"]) < len(e["mask"])
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["train_episodes"] > 0 for r in rows)
    assert all(r["grad_norm"] > 0 and 0 <= r["grad_clipped"] <= 1 for r in rows)  # measured before clipping
    assert "loop (agent RL (multi-turn))" in (tmp_path / "full" / "README.md").read_text()

    calls = {"n": 0}

    def crashing(task):
        calls["n"] += 1
        if calls["n"] > 12 * 2 + 5:  # inside iteration 3's rollouts
            raise RuntimeError("simulated crash mid-rollout")
        return ToyEnv(task)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(recipe, tmp_path / "part", env_for=crashing)
    assert not (tmp_path / "part" / "summary.json").exists()
    train(recipe, tmp_path / "part", resume=True, env_for=ToyEnv)
    a, b = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "part" / "model.safetensors")),
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_agent_recipe_checks():
    with pytest.raises(UserError, match="loss.name 'loop'"):
        load_recipe(RECIPE, ["loss.name=spo"])
    with pytest.raises(UserError, match="never used for training"):
        load_recipe(RECIPE, ["agent.split=test"])
    with pytest.raises(UserError, match="needs trainer 'agent'"):
        load_recipe(REPO_ROOT / "recipes" / "spo" / "tiny.yaml", ["loss.name=loop"])


def test_sandbox_min_level_refuses_to_start_below_it(tmp_path, monkeypatch):
    """agent.sandbox_min_level: the level this machine gives is checked before anything is written (dry run and
    training); a machine below it (here: a pretend one without root or user namespaces) gets one line."""
    from align.agents import sandbox
    from align.dryrun import dry_run

    recipe = load_recipe(RECIPE, [*SMALL, "agent.sandbox_min_level=userns"])
    report = dry_run(recipe, str(RECIPE))
    assert f"sandbox  level {sandbox.sandbox_level()['level']!r}" in report
    monkeypatch.setattr(sandbox, "_LEVEL", {"level": "seccomp"})
    with pytest.raises(UserError, match=r"agent.sandbox_min_level: 'userns' is required, this machine gives 'seccomp'"):
        dry_run(recipe, str(RECIPE))
    with pytest.raises(UserError, match="'userns' is required"):
        train(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="not read with agent.world 'appworld'"):
        load_recipe(RECIPE, ["agent.world=appworld", "agent.sandbox_min_level=root"])


def test_max_kl_stops_an_iterations_updates_once_the_policy_drifts(tmp_path):
    """agent.max_kl (ml-loop's KL guard): the first minibatch of an iteration is on pi_old (KL 0) and always trains;
    with a bound below any drift the next one stops the iteration (1 update instead of 3 per iteration here); a
    generous bound changes nothing; a bound <= 0 is one line."""
    over = SMALL + ["agent.iterations=2", "agent.epochs_per_iteration=1", "train.batch_size=4", "train.lr=3e-2"]
    train(load_recipe(RECIPE, over), tmp_path / "free", env_for=ToyEnv)
    train(load_recipe(RECIPE, over + ["agent.max_kl=1e-12"]), tmp_path / "tight", env_for=ToyEnv)
    train(load_recipe(RECIPE, over + ["agent.max_kl=1e9"]), tmp_path / "loose", env_for=ToyEnv)
    free, tight, loose = (
        [r for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines()) if "iteration" in r]
        for n in ("free", "tight", "loose")
    )
    assert [r["updates"] for r in free] == [r["train_episodes"] // 4 for r in free] and free[0]["updates"] > 1
    assert [r["updates"] for r in tight][:1] == [1] and tight[0]["kl_stopped"] == 1
    assert [r["updates"] for r in loose] == [r["updates"] for r in free] and loose[0]["kl_stopped"] == 0
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("free", "loose"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="agent.max_kl must be > 0"):
        load_recipe(RECIPE, ["agent.max_kl=0"])


def test_episodes_that_would_outgrow_the_context_are_truncated_and_counted(tmp_path):
    """An episode whose next model turn (rollout.max_new_tokens more tokens) would not fit in the model's context ends
    there (``truncated``), so the learner never scores a sequence longer than its positions; the metrics count them."""
    over = [x for x in SMALL if not x.startswith("model.tiny_max_positions")]
    train(
        load_recipe(RECIPE, over + ["model.tiny_max_positions=80", "agent.iterations=1"]),
        tmp_path / "t",
        env_for=ToyEnv,
    )
    episodes = json.loads((tmp_path / "t" / "rollouts" / "iter-1.json").read_text())["episodes"]
    row = json.loads((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["truncated"] == sum(e["truncated"] for e in episodes) > 0
    assert all(len(e["token_ids"]) <= 80 for e in episodes)
    assert all(e["turns"] < 2 for e in episodes if e["truncated"])


def test_packed_episodes_train_the_padded_model(tmp_path):
    """agent.packing (episodes of different lengths in padding-free rows, for pi_old and the updates) against padded
    rows: the same losses and weights after three iterations, within 1e-5 (fp32)."""
    for packing in ("true", "false"):
        train(load_recipe(RECIPE, [*SMALL, f"agent.packing={packing}"]), tmp_path / packing, env_for=ToyEnv)
    a, b = (load_file(tmp_path / p / "model.safetensors") for p in ("true", "false"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ra, rb = (
        [json.loads(x) for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()] for p in ("true", "false")
    )
    losses = [(x["loss"], y["loss"]) for x, y in zip(ra, rb) if "loss" in x]
    assert losses and all(abs(x - y) < 1e-5 for x, y in losses)
