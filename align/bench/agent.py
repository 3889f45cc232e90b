"""``align bench agent``: SFT -> LOOP vs the GRPO ablation on the built-in world, at the same rollout budget.

    1. demonstrations: the gold one-turn solutions of training-scenario tasks (world seeds 1..``demo_seeds``; the
       test split's scenarios are never shown), written by a sloppy annotator in a fraction ``sloppy_pct`` of them:
       after doing the task it also sends the person "done" (a collateral change the "nothing else changed" checks
       catch) -- the systematic mistake RL has to unlearn
    2. SFT a tiny Llama from scratch on them (``recipes/sft/agent-tiny.yaml``), once
    3. from the SFT policy, for each of ``seeds`` training seeds, the same budget (iterations x tasks x K rollouts) for
         loop   recipes/loop/tiny.yaml: leave-one-out advantages, 2 PPO epochs, per-token clipping
         grpo   the same with std-normalised advantages (agent.advantage: grpo)
    4. greedy evaluation (one episode per task) on the test split of ``test_worlds`` world seeds (0, 1, ...; 36 tasks
       each, scenarios never trained on): TGC and SGC in percent, per seed and averaged over seeds
    5. 95% bootstrap intervals (align/bench/stats.py: test tasks and training seeds resampled, paired across
       methods) for every method's TGC and for loop_minus_grpo, loop_minus_sft and grpo_minus_sft
The intervals are conditional on the one SFT policy (step 2 is not repeated per seed: it is most of the cost).
Curves (reward per iteration, per seed) come from each run's metrics.jsonl. ``dev=1`` adds the dev split.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

from align.paths import REPO_ROOT

DEFAULTS = {
    "seed": 0,
    "seeds": 5,
    "test_worlds": 5,
    "dev": 0,
    "demo_seeds": 16,
    "sloppy_pct": 80,
    "iterations": 10,
    "tasks": 40,
    "k": 6,
    "quick": 0,
}
RECIPES = REPO_ROOT / "recipes"


def _say(msg: str) -> None:
    print(f"[bench agent] {msg}", file=sys.stderr, flush=True)


def sloppy(solution: str) -> str | None:
    """The sloppy annotator's version: also message the first person the task names ('done'); None if nobody (or
    the task deletes that contact)."""
    m = re.search(r'apis\.(?:messages\.send|payments\.pay|contacts\.(?:add|update))\("([^"]+)"', solution)
    if not m or "apis.contacts.delete(" in solution:
        return None
    return solution.replace(
        "apis.supervisor.complete_task()", f'apis.messages.send("{m.group(1)}","done")\napis.supervisor.complete_task()'
    )


def demonstrations(demo_seeds: int, sloppy_pct: int, seed: int) -> list[dict]:
    import random

    from align.agents.env import first_observation
    from align.agents.world import tasks_for

    rng = random.Random(seed)
    rows = []
    for s in range(1, demo_seeds + 1):
        for t in tasks_for("train", seed=s):
            sol = t.solution
            if rng.random() * 100 < sloppy_pct:
                sol = sloppy(sol) or sol
            rows.append({"prompt": first_observation(t.instruction, False), "chosen": sol})
    rng.shuffle(rows)
    return rows


def run(extra: list[str]) -> dict:
    import numpy as np

    from align.bench import parse_options
    from align.bench.stats import bootstrap, half_width
    from align.config import load_recipe
    from align.errors import UserError
    from align.evals.agent import evaluate_agent
    from align.runs import read_metrics
    from align.trainers import run as train

    o = parse_options("agent", DEFAULTS, extra)
    for key in ("seeds", "test_worlds"):
        if o[key] < 1:
            raise UserError(f"bench agent: option {key!r} must be at least 1, got {o[key]}")
    quiet = ["logging.progress=false", "logging.plots=false"]
    worlds = list(range(o["test_worlds"]))
    seeds = [o["seed"] + i for i in range(o["seeds"])]
    splits = ("test", "dev") if o["dev"] else ("test",)
    limit = 6 if o["quick"] else None
    started = time.time()
    result: dict = {"benchmark": "agent", "options": o, "test_world_seeds": worlds, "train_seeds": seeds}
    runs: dict = {split: {} for split in splits}  # split -> method -> [one evaluation report per seed]
    curves: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def evaluate(name: str, folder: Path) -> None:
            for split in splits:
                report = evaluate_agent(
                    str(folder), str(tmp / f"eval-{name}-{split}"), split=split, limit=limit, seed=worlds
                )
                runs[split].setdefault(name.split("-")[0], []).append(report)

        demos = demonstrations(o["demo_seeds"], o["sloppy_pct"], o["seed"])
        (tmp / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demos))
        _say(f"SFT on {len(demos)} demonstrations ({o['sloppy_pct']}% sloppy)")
        t0 = time.time()
        quick = ["train.max_steps=10"] if o["quick"] else []
        sft_recipe = [f"data.train={tmp / 'demos.jsonl'}", f"train.seed={o['seed']}"] + quiet + quick
        train(load_recipe(RECIPES / "sft" / "agent-tiny.yaml", sft_recipe), tmp / "sft")
        result["sft_seconds"] = round(time.time() - t0, 1)
        _say(f"evaluating SFT on {len(worlds)} worlds' test tasks")
        evaluate("sft", tmp / "sft")
        budget = [
            f"agent.iterations={o['iterations']}",
            f"agent.tasks_per_iteration={o['tasks']}",
            f"rollout.n={o['k']}",
            "agent.eval_split=null",
            f"model.name_or_path={tmp / 'sft'}",
        ]
        train_seconds: dict = {}
        for seed in seeds:
            for name, over in (("loop", []), ("grpo", ["agent.advantage=grpo"])):
                _say(f"{name}, seed {seed}: {o['iterations']} iterations x {o['tasks']} tasks x K={o['k']}")
                t0 = time.time()
                recipe = load_recipe(RECIPES / "loop" / "tiny.yaml", budget + over + quiet + [f"train.seed={seed}"])
                train(recipe, tmp / f"{name}-{seed}")
                train_seconds.setdefault(name, []).append(round(time.time() - t0, 1))
                rows = read_metrics(tmp / f"{name}-{seed}" / "metrics.jsonl")
                curves.setdefault(f"seed {seed}", {})[name] = [round(r["reward/mean"], 4) for r in rows]
                evaluate(f"{name}-{seed}", tmp / f"{name}-{seed}")
    for split in splits:
        table = {}
        for method, reports in runs[split].items():
            table[method] = {
                "tgc": round(float(np.mean([r["tgc"] for r in reports])), 2),
                "tgc_by_seed": [round(r["tgc"], 2) for r in reports],
                "sgc": round(float(np.mean([r["sgc"] for r in reports])), 2),
                "reward": round(float(np.mean([r["reward"] for r in reports])), 3),
                "tasks": reports[0]["tasks"],
                "scenarios": reports[0]["scenarios"],
                "tgc_by_difficulty": {
                    d: round(float(np.mean([r["tgc_by_difficulty"][d] for r in reports])), 2)
                    for d in reports[0]["tgc_by_difficulty"]
                },
            }
            if method in train_seconds:
                table[method]["train_seconds"] = train_seconds[method]
        passed = {
            m: np.array([list(r["passed"].values()) for r in reps], dtype=float) for m, reps in runs[split].items()
        }
        diffs = {
            "loop_minus_grpo": ("loop", "grpo"),
            "loop_minus_sft": ("loop", "sft"),
            "grpo_minus_sft": ("grpo", "sft"),
        }
        ci = bootstrap(passed, diffs, scale=100.0, seed=o["seed"], digits=2)
        for method in table:
            table[method]["ci95"] = ci[method]["ci95"]
        result[split] = table
        result.update({name if split == "test" else f"dev_{name}": ci[name] for name in diffs})
    result["goals"] = {
        "loop_minus_sft_at_least_20": result["loop_minus_sft"]["mean"] >= 20.0,
        "loop_minus_sft_ci_low_above_10": result["loop_minus_sft"]["ci95"][0] > 10.0,
        "loop_minus_grpo_half_width_at_most_5": half_width(result["loop_minus_grpo"]) <= 5.0,
    }
    lo, hi = result["loop_minus_grpo"]["ci95"]
    result["loop_vs_grpo"] = (
        "LOOP above GRPO at 95%" if lo > 0 else "GRPO above LOOP at 95%" if hi < 0 else "no difference at 95%"
    ) + f" (LOOP - GRPO {result['loop_minus_grpo']['mean']:+.1f} points, 95% CI [{lo:+.1f}, {hi:+.1f}])"
    result["curves"] = curves
    result["demonstrations"] = len(demos)
    result["wall_seconds"] = round(time.time() - started, 1)
    if o["quick"]:
        result["note"] = "quick=1: plumbing check only, not a result"
    return result
