"""``align bench agent``: SFT -> LOOP vs the GRPO ablation on the built-in world, at the same rollout budget.

    1. demonstrations: the gold one-turn solutions of training-scenario tasks (world seeds 1..``demo_seeds``; the
       test split's scenarios are never shown), written by a sloppy annotator in a fraction ``sloppy_pct`` of them:
       after doing the task it also sends the person "done" (a collateral change the "nothing else changed" checks
       catch) -- the systematic mistake RL has to unlearn
    2. SFT a tiny Llama from scratch on them (``recipes/sft/agent-tiny.yaml``)
    3. from the SFT policy, the same budget (iterations x tasks x K rollouts) for
         loop   recipes/loop/tiny.yaml: leave-one-out advantages, 2 PPO epochs, per-token clipping
         grpo   the same with std-normalised advantages (agent.advantage: grpo)
    4. greedy evaluation (one episode per task) on the test split (world seed 0): TGC and SGC in percent
Curves (reward per iteration) come from each run's metrics.jsonl.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

from align.paths import REPO_ROOT

DEFAULTS = {"seed": 0, "demo_seeds": 16, "sloppy_pct": 80, "iterations": 10, "tasks": 40, "k": 6, "quick": 0}
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
    from align.bench import parse_options
    from align.config import load_recipe
    from align.evals.agent import evaluate_agent
    from align.runs import read_metrics
    from align.trainers import run as train

    o = parse_options("agent", DEFAULTS, extra)
    quiet = ["logging.progress=false", "logging.plots=false", f"train.seed={o['seed']}"]
    started = time.time()
    result: dict = {"benchmark": "agent", "options": o, "test": {}, "dev": {}, "curves": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demos = demonstrations(o["demo_seeds"], o["sloppy_pct"], o["seed"])
        (tmp / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demos))
        _say(f"SFT on {len(demos)} demonstrations ({o['sloppy_pct']}% sloppy)")
        quick = ["train.max_steps=10"] if o["quick"] else []
        train(
            load_recipe(RECIPES / "sft" / "agent-tiny.yaml", [f"data.train={tmp / 'demos.jsonl'}"] + quiet + quick),
            tmp / "sft",
        )
        limit = 6 if o["quick"] else None
        for split in ("test", "dev"):
            result[split]["sft"] = evaluate_agent(
                str(tmp / "sft"), str(tmp / f"eval-sft-{split}"), split=split, limit=limit
            )
        budget = [
            f"agent.iterations={o['iterations']}",
            f"agent.tasks_per_iteration={o['tasks']}",
            f"rollout.n={o['k']}",
            "agent.eval_split=null",
            f"model.name_or_path={tmp / 'sft'}",
        ]
        for name, over in (("loop", []), ("grpo", ["agent.advantage=grpo"])):
            _say(f"{name}: {o['iterations']} iterations x {o['tasks']} tasks x K={o['k']}")
            t0 = time.time()
            summary = train(load_recipe(RECIPES / "loop" / "tiny.yaml", budget + over + quiet), tmp / name)
            rows = read_metrics(tmp / name / "metrics.jsonl")
            result["curves"][name] = [round(r["reward/mean"], 4) for r in rows]
            for split in ("test", "dev"):
                result[split][name] = evaluate_agent(
                    str(tmp / name), str(tmp / f"eval-{name}-{split}"), split=split, limit=limit
                )
                result[split][name]["train_seconds"] = round(time.time() - t0, 1)
            result[f"{name}_summary"] = {k: summary[k] for k in ("steps", "wall_seconds")}
    for split in ("test", "dev"):
        result[split] = {
            m: {
                k: round(v, 2) if isinstance(v, float) else v
                for k, v in r.items()
                if k in ("tgc", "sgc", "reward", "tasks", "scenarios", "tgc_by_difficulty", "train_seconds")
            }
            for m, r in result[split].items()
        }
    result["demonstrations"] = len(demos)
    result["wall_seconds"] = round(time.time() - started, 1)
    if o["quick"]:
        result["note"] = "quick=1: plumbing check only, not a result"
    return result
