"""The BabyLlama story goal: prompts, the programmatic score, the judge, and an online run that uses them."""

import json

from align.config import load_recipe
from align.judges import make_judge
from align.paths import REPO_ROOT
from align.stories import all_prompts, story_prompts, story_score


def test_score_halves_topic_and_happy_ending():
    assert story_score("The cat sat. Then they were happy.", "cat") == 1.0
    assert story_score("Two cats played all day long and then went to bed quietly without a word.", "cat") == 0.5
    assert story_score("A concatenated word and a dog.", "cat") == 0.0  # whole words only
    long_tail = "She was happy at first. " + "Then it rained and rained and everyone stayed inside all day long. " * 2
    assert story_score(long_tail, "dog") == 0.0  # the happy word is not near the end
    assert story_score("The DOG smiled.", "dog") == 1.0


def test_prompts_split_disjoint_and_never_name_the_topic():
    train, test = story_prompts(10**6, split="train"), story_prompts(10**6, split="test")
    assert len(train) + len(test) == len(all_prompts()) and not set(train) & set(test)
    assert len(test) > 100 and story_prompts(5, seed=1) == story_prompts(5, seed=1) != story_prompts(5, seed=2)
    assert not any(story_score(p, "cat") for p in all_prompts())


def test_story_judge_prefers_the_goal():
    recipe = load_recipe(REPO_ROOT / "recipes" / "spo" / "babyllama-story.yaml", ["judge.goal=dog"])
    judge = make_judge(recipe.judge)
    p = judge.compare(["x"] * 3, ["The dog was happy.", "A dog.", "Nothing."], ["Nothing.", "Nothing.", "Nothing."])
    assert p == [1.0, 0.75, 0.5]


def test_online_run_on_story_openings(tmp_path):
    from align.trainers import run

    recipe = load_recipe(
        REPO_ROOT / "recipes" / "spo" / "babyllama-story.yaml",
        [
            "model.name_or_path=tiny:llama",
            "model.tiny_max_positions=128",
            "online.iterations=1",
            "online.prompts_per_iteration=8",
            "rollout.max_new_tokens=8",
            "logging.plots=false",
            "logging.progress=false",
        ],
    )
    run(recipe, tmp_path / "run")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["judge_calls"] > 0 and 0 <= row["sample_goal_score"] <= 1
    saved = json.loads((tmp_path / "run" / "rollouts" / "iter-1.json").read_text())
    assert all(g["prompt"] in set(story_prompts(10**6, seed=0, split="train")) for g in saved["groups"])
