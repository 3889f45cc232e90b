"""The online trainer with the user's reward functions (judge.kind function) and the single-turn GRPO and RLOO
objectives: what the functions receive, how their weighted scores become rewards and advantages, evaluation with
them, the Python API's reward_funcs, and one-line errors for bad functions."""

from __future__ import annotations

import json
import math

import pytest
import torch

import align
from align.config import LossConfig, load_recipe
from align.errors import UserError
from align.losses import LOSSES
from align.losses.policy import group_advantages
from align.paths import REPO_ROOT
from align.trainers import run
from tests.conftest import error_lines, metrics_rows, run_align

RECIPE = REPO_ROOT / "recipes" / "grpo" / "tiny-reward-fn.yaml"
SMALL = [
    "online.iterations=2",
    "online.prompts_per_iteration=8",
    "rollout.n=4",
    "rollout.max_new_tokens=6",
    "train.batch_size=8",
    "logging.progress=false",
    "logging.plots=false",
]


def skew_sampler(monkeypatch, by: float) -> None:
    """The sampler's log-probs, as saved with the rollouts, off by ``by`` per token (as bf16 / vLLM kernels can be)."""
    import align.trainers.online as online

    real = online.rollout_iteration

    def skewed(*args, **kwargs):
        groups = real(*args, **kwargs)
        for g in groups:
            for s in g["samples"]:
                s["logprobs"] = [lp + by for lp in s["logprobs"]]
        return groups

    monkeypatch.setattr(online, "rollout_iteration", skewed)


def capture_pg_batches(monkeypatch) -> list:
    """The list every PairBatch the policy-gradient losses weigh is appended to."""
    import align.losses.policy as policy

    seen, real = [], policy._weighted
    monkeypatch.setattr(policy, "_weighted", lambda per, b: seen.append(b) or real(per, b))
    return seen


@pytest.mark.parametrize("loss", ["grpo", "rloo"])
def test_reward_functions_drive_grpo_and_rloo(tmp_path, loss):
    recipe = load_recipe(RECIPE, SMALL + [f"loss.name={loss}", "train.eval_steps=2", "eval.size=8"])
    assert recipe.judge.functions[0] == f"{REPO_ROOT}/recipes/grpo/reward_fns.py:correct"  # ./ = recipe folder
    summary = run(recipe, tmp_path / loss)
    rows = metrics_rows(tmp_path / loss)
    train_rows = [r for r in rows if "iteration" in r]
    assert [r["iteration"] for r in train_rows] == [1, 2]
    groups = json.loads((tmp_path / loss / "rollouts" / "iter-1.json").read_text())["groups"]
    for g in groups:  # reward = 1 x correct + 0.1 x right_length, each function's score saved per sample
        for s in g["samples"]:
            assert set(s["scores"]) == {"correct", "right_length"}
            assert s["reward"] == pytest.approx(s["scores"]["correct"] + 0.1 * s["scores"]["right_length"])
    mean = sum(s["scores"]["right_length"] for g in groups for s in g["samples"]) / (8 * 4)
    assert train_rows[0]["reward/right_length"] == pytest.approx(mean)
    spread = [g for g in groups if len({s["reward"] for s in g["samples"]}) > 1]
    assert train_rows[0]["train_rows"] == 4 * len(spread)  # a group whose rewards tie has no advantage
    assert f"{loss}/clip_fraction" in train_rows[0] and "eval/reward" in summary["final"]
    assert (tmp_path / loss / "eval_samples" / "iteration-2.jsonl").is_file()


def test_functions_receive_every_column_and_the_api_takes_callables(tmp_path):
    seen = []

    def longer_is_better(prompts, completions, answer, family, **rest):
        seen.append((len(prompts), len(completions), len(answer), sorted(set(family)), rest))
        return [len(c) / 10 for c in completions]

    recipe = load_recipe(RECIPE, SMALL + ["online.iterations=1"])
    summary = align.train(recipe, output_dir=tmp_path / "api", reward_funcs=[longer_is_better])
    assert summary["steps"] == 1
    n, m, a, families, rest = seen[0]
    assert n == m == a == 8 * 4 and set(families) <= {"sort", "count", "max"} and rest == {}
    assert load_recipe(tmp_path / "api" / "recipe.yaml").judge.functions == ["memory:reward_func_0"]
    assert "reward/longer_is_better" in metrics_rows(tmp_path / "api")[0]

    with pytest.raises(UserError, match="returned 1 values for 32 completions"):
        align.train(recipe, output_dir=tmp_path / "bad", reward_funcs=lambda prompts, completions, **c: [1.0])
    with pytest.raises(UserError, match="reward_funcs: expected a callable"):
        align.train(recipe, output_dir=tmp_path / "bad2", reward_funcs=["not callable"])


def test_bad_function_names_and_keys_are_one_line_before_anything_loads(tmp_path):
    cases = [
        (["judge.functions=[nomodule_xyz:f]", "judge.weights=null"], "cannot import nomodule_xyz"),
        (["judge.functions=[./reward_fns.py:missing]", "judge.weights=null"], "is not a callable"),
        (["judge.weights=[1.0]"], "one number per judge.functions entry (2)"),
        (["judge.kind=checker"], "judge.functions / judge.weights apply to judge.kind 'function'"),
        (["loss.name=spo", "loss.kl_coef=0.1"], "loss.kl_coef applies to loss grpo or rloo"),
        (["loss.scale_rewards=false", "loss.name=rloo"], "loss.scale_rewards applies to loss grpo"),
    ]
    for overrides, line in cases:
        bad = run_align("train", str(RECIPE), "--dry-run", *overrides)
        assert bad.returncode == 2 and line in error_lines(bad.stderr)[-1], (overrides, bad.stderr[-500:])


def test_grpo_advantages_in_the_trainer_match_the_pure_function(tmp_path):
    recipe = load_recipe(RECIPE, SMALL + ["online.iterations=1", "loss.scale_rewards=false"])
    run(recipe, tmp_path / "g")
    groups = json.loads((tmp_path / "g" / "rollouts" / "iter-1.json").read_text())["groups"]
    advs = [a for g in groups for a in group_advantages("grpo", [s["reward"] for s in g["samples"]], scale=False)]
    assert sum(abs(a) > 0 for a in advs) == metrics_rows(tmp_path / "g")[0]["train_rows"]


@pytest.mark.parametrize("source", ["learner", "sampler"])
def test_pi_old_is_the_learners_not_the_samplers(tmp_path, monkeypatch, source):
    """A sampler whose log-probs are off by +0.3 per token (as bf16 / vLLM kernels can be): with the learner's
    recomputed pi_old the first update's ratio is 1; with the sampler's it is exp(-0.3) = 0.74 (and clipped)."""

    skew_sampler(monkeypatch, 0.3)
    over = ["online.iterations=1", "online.epochs_per_iteration=1", "train.batch_size=64", "loss.name=rloo"]
    run(load_recipe(RECIPE, SMALL + over + [f"online.old_logprobs={source}"]), tmp_path / source)
    (row,) = metrics_rows(tmp_path / source)
    expected = 1.0 if source == "learner" else math.exp(-0.3)
    assert row["rloo/ratio"] == pytest.approx(expected, abs=1e-5)
    # the bench's ratio_first_step_max_dev: max |rho - 1| at each generation's first update
    assert row["ratio_first_step_max_dev"] == pytest.approx(abs(expected - 1), abs=1e-5)


def test_learner_logprobs_of_pair_rows_equal_those_of_the_same_tokens_as_policy_gradient_rows(tiny_model):
    from align.trainers.online import _learner_logprobs

    p, w, l_ = [5, 6, 7], [8, 9], [10]
    pg = _learner_logprobs(
        tiny_model, [{"prompt_ids": p, "ids": w, "logprobs": [0.0, 0.0], "adv": 1.0}], True, 4, 0, "cpu", 1, 0
    )
    pair = {"prompt_ids": p, "w": {"token_ids": w, "logprobs": [0.0] * 2}, "l": {"token_ids": l_, "logprobs": [0.0]}}
    (out,) = _learner_logprobs(tiny_model, [pair], False, 4, 0, "cpu", 1, 0)
    assert out["w"]["logprobs"] == pytest.approx(pg[0]["logprobs"], abs=1e-6)
    assert len(out["l"]["logprobs"]) == 1 and out["l"]["logprobs"][0] < 0
    assert pair["w"]["logprobs"] == [0.0, 0.0]  # the saved rollouts keep the sampler's


def test_the_learner_scores_policy_gradient_tokens_at_the_rollout_temperature(tiny_model, tmp_path, monkeypatch):
    """With rollout.temperature T != 1 the learner's pi_old and pi are log softmax(logits / T) (the distribution the
    tokens were drawn from): equal to the full-logits path at T, so the first step's ratio is still 1; the sampler's
    untempered log-probs are refused as pi_old at T != 1 (one line)."""
    from align.logprobs import full_token_logps
    from align.trainers.online import _learner_logprobs

    p, w = [5, 6, 7], [8, 9]
    (row,) = _learner_logprobs(
        tiny_model, [{"prompt_ids": p, "ids": w, "logprobs": [0.0, 0.0], "adv": 1.0}], True, 4, 0, "cpu", 1, 0, 0.7
    )
    with torch.no_grad():
        full = full_token_logps(tiny_model, torch.tensor([p + w]), temperature=0.7)[0, len(p) - 1 :].tolist()
    assert row["logprobs"] == pytest.approx(full, abs=1e-5)
    seen = capture_pg_batches(monkeypatch)
    over = SMALL + ["online.iterations=1", "online.epochs_per_iteration=1", "loss.name=rloo", "rollout.temperature=0.7"]
    run(load_recipe(RECIPE, over), tmp_path / "t")
    (logged,) = metrics_rows(tmp_path / "t")
    assert logged["ratio_first_step_max_dev"] < 1e-5
    b = seen[0]  # the first update: pi (scored at T) equals the learner's pi_old (scored at T)
    assert torch.allclose(b.token_logps.detach(), b.old_token_logps, atol=1e-5)
    with pytest.raises(UserError, match="old_logprobs sampler with rollout.temperature 0.7"):
        load_recipe(RECIPE, over + ["online.old_logprobs=sampler"])


def test_generations_sample_from_the_updated_policy_and_a_crash_between_them_resumes_identically(tmp_path, monkeypatch):
    """online.generation_batch_size 8 = 2 prompts x 4 per generation: an iteration of 8 prompts is 4 generations,
    each saved (iter-N-gen-M.json) and trained on before the next is sampled. A crash in iteration 2's third
    generation, then --resume, ends with the same weights as the uninterrupted run (on this machine)."""
    import torch
    from safetensors.torch import load_file

    import align.trainers.online as online

    over = SMALL + ["online.generation_batch_size=8", "train.batch_size=4", "online.epochs_per_iteration=1"]
    recipe = load_recipe(RECIPE, over + ["loss.name=rloo"])
    run(recipe, tmp_path / "full")
    files = sorted(p.name for p in (tmp_path / "full" / "rollouts").iterdir())
    assert files == [f"iter-{i}-gen-{m}.json" for i in (1, 2) for m in (1, 2, 3, 4)]
    rows = metrics_rows(tmp_path / "full")
    gens = [json.loads((tmp_path / "full" / "rollouts" / f).read_text())["groups"] for f in files[:4]]
    assert all(len(g) == 2 for g in gens) and rows[0]["train_rows"] == sum(
        sum(abs(a) > 0 for a in group_advantages("rloo", [s["reward"] for s in g["samples"]]))
        for gen in gens
        for g in gen
    )
    kept = [
        sum(abs(a) > 0 for g in gen for a in group_advantages("rloo", [s["reward"] for s in g["samples"]]))
        for gen in gens
    ]
    assert rows[0]["generations"] == 4 and rows[0]["updates"] == sum(math.ceil(n / 4) for n in kept)  # 1 pass of 4
    assert rows[0]["grad_norm"] > 0 and 0 <= rows[0]["grad_clipped"] <= 1  # measured before clipping at 1.0

    real, calls = online.rollout_iteration, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # iteration 2, generation 3
            raise RuntimeError("simulated crash between generations")
        return real(*args, **kwargs)

    monkeypatch.setattr(online, "rollout_iteration", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(recipe, tmp_path / "part")
    monkeypatch.setattr(online, "rollout_iteration", real)
    run(recipe, tmp_path / "part", resume=True)
    a, b = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "part" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_rows(tmp_path / "part") == rows  # the same samples, rewards and losses


def test_conversational_prompt_rows_from_a_dataset_folder_train_through_the_chat_template(tmp_path):
    """TRL's conversational prompt-only rows in datasets' on-disk format (hf:FOLDER, data.split): the engine samples
    from the chat-templated conversation, the reward functions see the prompt text, the messages and the answer."""
    import datasets

    from align.models import char_tokenizer

    rows = [{"prompt": [{"role": "user", "content": f"count a's: {'a' * i}"}], "answer": str(i)} for i in range(1, 9)]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:6]), "dev": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "ds"))
    seen = []

    def check(prompts, completions, answer, prompt_messages, **_):
        seen.append((prompts[0], prompt_messages[0]))
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    over = SMALL + ["online.iterations=1", "online.prompts_per_iteration=8", f"data.train=hf:{tmp_path / 'ds'}"]
    summary = align.train(
        load_recipe(RECIPE, over + ["data.split=dev"]), output_dir=tmp_path / "run", reward_funcs=[check]
    )
    assert summary["final"]
    text, messages = seen[0]
    assert text.startswith("count a's: ") and messages == [{"role": "user", "content": text}]
    group = json.loads((tmp_path / "run" / "rollouts" / "iter-1.json").read_text())["groups"][0]
    tok = char_tokenizer()
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": group["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    assert tok.decode(group["prompt_ids"]) == rendered  # the chat template, though data.chat_template is off
    with pytest.raises(UserError, match="ds: 6 prompts < online.prompts_per_iteration 8"):
        align.train(load_recipe(RECIPE, over), output_dir=tmp_path / "train6", reward_funcs=[check])


def test_a_reward_model_is_a_pointwise_reward_function_beside_python_ones(tmp_path, rm_judge):
    """judge.functions "reward_model:PATH": the model's scalar r(x, y) per completion (the score the pairwise judge
    compares), weighted with the other functions; checked but not loaded by --dry-run; a missing folder is one line."""
    from align.judges import RewardModelJudge

    path = rm_judge[1].split("=", 1)[1]
    fns = [f"reward_model:{path}", "align.rewards:exact_match"]
    over = SMALL + ["online.iterations=1", f"judge.functions=[{','.join(fns)}]", "judge.weights=[0.5,1.0]"]
    run(load_recipe(RECIPE, over), tmp_path / "g")
    groups = json.loads((tmp_path / "g" / "rollouts" / "iter-1.json").read_text())["groups"]
    rm = RewardModelJudge(path)
    texts = [s["text"] for s in groups[0]["samples"]]
    expected = rm.rewards([groups[0]["prompt"]] * len(texts), texts)
    got = [s["scores"]["reward_model"] for s in groups[0]["samples"]]
    assert got == pytest.approx(expected, abs=1e-5) and len(set(got)) > 1
    for s in groups[0]["samples"]:
        assert s["reward"] == pytest.approx(0.5 * s["scores"]["reward_model"] + s["scores"]["exact_match"])
    res = run_align("train", str(RECIPE), "--dry-run", *over)
    assert res.returncode == 0 and "0.5 x reward_model, 1 x exact_match" in res.stdout
    res = run_align(
        "train", str(RECIPE), "--dry-run", *SMALL, "judge.functions=[reward_model:/nope]", "judge.weights=null"
    )
    assert res.returncode == 2 and error_lines(res.stderr) == [
        "error: judge.functions: 'reward_model:/nope': not a reward-model folder"
    ]


def test_truncated_importance_weights_scale_each_token_by_learner_over_sampler_capped(tmp_path, monkeypatch):
    """online.is_cap (TIS, TRL's vllm_importance_sampling_cap): with a sampler whose log-probs are 0.3 above the
    learner's, every response token's loss is weighted by min(exp(-0.3), cap) (padding 0); the loss by hand with
    those weights; off for the sampler's own pi_old (one line)."""
    import align.losses.policy as policy

    skew_sampler(monkeypatch, 0.3)
    seen = capture_pg_batches(monkeypatch)
    over = SMALL + ["online.iterations=1", "online.epochs_per_iteration=1", "train.batch_size=64", "loss.name=rloo"]
    for cap, w in (("2.0", math.exp(-0.3)), ("0.5", 0.5)):
        seen.clear()
        run(load_recipe(RECIPE, over + [f"online.is_cap={cap}"]), tmp_path / cap)
        b = seen[0]
        mask = b.token_mask.bool()
        assert torch.allclose(b.is_weights[mask], torch.full_like(b.is_weights[mask], w), atol=1e-5)
        assert (b.is_weights[~mask] == 0).all()
        per, _ = policy._surrogate(torch.ones_like(b.is_weights), b.advantages[:, None], 0.8, 1.2)  # first step: rho 1
        expected = (per * w * mask).sum(-1) / mask.sum(-1)
        loss, _ = LOSSES["rloo"].fn(b, LossConfig(name="rloo"))
        assert torch.allclose(loss.detach(), expected, atol=1e-5)
    seen.clear()
    run(load_recipe(RECIPE, over), tmp_path / "off")
    assert seen[0].is_weights is None
    with pytest.raises(UserError, match="online.is_cap applies to policy-gradient losses"):
        load_recipe(RECIPE, over + ["online.is_cap=2", "online.old_logprobs=sampler"])


@pytest.mark.parametrize("correct", range(9))
def test_spo_on_the_checker_is_rloo_on_exact_match_scaled_by_k_over_2k_minus_2(correct):
    """With a right/wrong judge that calls ties 1/2, SPO's win rate of a sample is an affine function of its
    correctness whose slope is K / (2 (K - 1)) for every group, and the leave-one-out baseline removes the offset:
    SPO's advantages are RLOO's on the exact-match reward times K / (2 (K - 1)) (4/7 at K = 8). Under Adam the
    scale changes the update only through gradient clipping and eps (docs/benchmarks.md, bench online)."""
    from align import tasks as T
    from align.judges import CheckerJudge
    from align.rewards import exact_match
    from align.trainers.online import win_rates

    k = 8
    task = T.make_tasks(1, seed=3, families=["sort"])[0]
    texts = [task.answer] * correct + [T.sloppy_answer(task)] * (k - correct)
    rates = win_rates(CheckerJudge(), task.prompt, texts)
    spo = group_advantages("spo", rates)
    rloo = group_advantages("rloo", exact_match([task.prompt] * k, texts, [task.answer] * k))
    assert spo == pytest.approx([a * k / (2 * (k - 1)) for a in rloo], abs=1e-12)
    assert max(rates) - min(rates) == pytest.approx(4 / 7 if 0 < correct < k else 0.0)  # right minus wrong
