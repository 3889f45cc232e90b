"""The quickstart (``make demo``): the whole alignment loop on a CPU in a few minutes.

    1. SFT    a tiny Llama built from scratch learns the built-in tasks from mixed-quality demonstrations
              (half of them by a sloppy annotator with a systematic mistake per task family)
    2. pairs  the SFT policy samples K answers per training prompt; the programmatic checker judges them;
              (correct, wrong) answers of the same prompt become preference pairs
    3. DPO    trained on those pairs, reference = the SFT policy
    4. INPO   online: each iteration the policy samples, the checker judges, INPO updates (recipes/inpo/tiny.yaml)
    5. eval   greedy accuracy on held-out prompts and checker-judged win rate against the SFT policy

Everything lands in ``runs/quickstart/``: one folder per stage (model, metrics.jsonl, plots/), pairs.jsonl,
eval.json (one entry per stage with ``accuracy`` and ``win_rate_vs_sft``) and plots/eval.png.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

from align import tasks as T
from align.config import load_recipe
from align.evaluate import accuracy, answers, per_family_accuracy, win_rate
from align.models import load_pretrained
from align.rollout import SamplingParams

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "quickstart"
FAMILIES = ["sort", "count", "max"]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def self_judged_pairs(engine, tasks: list[T.Task], n: int, temperature: float, seed: int) -> list[dict]:
    """K samples per prompt, judged by the checker; one (correct, wrong) pair per prompt that has both."""
    groups = engine.generate(
        [t.prompt for t in tasks], n=n, sampling=SamplingParams(max_new_tokens=12, temperature=temperature, seed=seed)
    )
    rng = random.Random(seed)
    rows = []
    for task, group in zip(tasks, groups):
        good = sorted({c.text for c in group if task.check(c.text)})
        bad = sorted({c.text for c in group if not task.check(c.text) and c.text.strip()})
        if good and bad:
            rows.append({"prompt": task.prompt, "chosen": rng.choice(good), "rejected": rng.choice(bad)})
    return rows


def run_demo(output_dir: str = "runs/quickstart", quick: bool = False) -> dict:
    from align.rollout.hf import HFEngine
    from align.trainers import run

    out = Path(output_dir)
    if out.exists():
        shutil.rmtree(out)  # the demo owns its folder: a rerun starts clean
    out.mkdir(parents=True)
    started = time.time()
    small = ["data.builtin_size=960", "train.epochs=2"] if quick else []

    say("== 1/5 SFT: tiny Llama from scratch on the built-in tasks (mixed-quality demonstrations)")
    sft = load_recipe(RECIPES / "sft.yaml", [f"data.builtin_families={FAMILIES}"] + small)
    run(sft, out / "sft")

    say("== 2/5 pairs: the SFT policy samples, the checker judges")
    model, tok = load_pretrained(out / "sft")
    engine = HFEngine(model, tok, batch_size=256)
    train_tasks = T.make_tasks(200 if quick else 2000, seed=1, split="train", families=FAMILIES)
    pairs = self_judged_pairs(engine, train_tasks, n=8, temperature=1.0, seed=0)
    (out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    say(f"   {len(pairs)} pairs from {len(train_tasks)} prompts")

    say("== 3/5 DPO on the self-judged pairs")
    dpo = load_recipe(
        RECIPES / "dpo.yaml",
        [f"model.name_or_path={out / 'sft'}", f"data.train={out / 'pairs.jsonl'}"]
        + (["train.epochs=1", "train.logging_steps=1"] if quick else []),
    )
    run(dpo, out / "dpo")

    say("== 4/5 INPO online from the SFT policy (sample, judge, update; 3 iterations)")
    online = [f"model.name_or_path={out / 'sft'}"] + (
        ["online.prompts_per_iteration=64", "online.iterations=2"] if quick else []
    )
    run(load_recipe(RECIPES.parent / "inpo" / "tiny.yaml", online), out / "inpo")

    say("== 5/5 evaluation on held-out prompts")
    test = T.make_tasks(60 if quick else 300, seed=2, split="test", families=FAMILIES)
    results, ans = {}, {}
    stages = ("sft", "dpo", "inpo")
    for stage in stages:
        model, tok = load_pretrained(out / stage)
        ans[stage] = answers(HFEngine(model, tok, batch_size=256), test)
    for stage in stages:
        results[stage] = {
            "accuracy": accuracy(test, ans[stage]),
            "win_rate_vs_sft": win_rate(test, ans[stage], ans["sft"]),
            "per_family": per_family_accuracy(test, ans[stage]),
        }
    summary = {
        "stages": list(results),
        "test_prompts": len(test),
        "pairs": len(pairs),
        "wall_seconds": round(time.time() - started, 1),
        **results,
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    _plot(out, results)
    print(table(results))
    say(f"done in {summary['wall_seconds']:.0f}s; results in {out}/eval.json, curves in {out}/*/plots/")
    return summary


def table(results: dict) -> str:
    lines = [f"{'stage':8s} {'accuracy':>9s} {'win rate vs SFT':>16s}", "-" * 35]
    for stage, r in results.items():
        lines.append(f"{stage:8s} {100 * r['accuracy']:8.1f}% {100 * r['win_rate_vs_sft']:15.1f}%")
    return "\n".join(lines)


def _plot(out: Path, results: dict) -> None:
    from align.extras import require

    require("matplotlib", "the demo's chart")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(results)
    ax.bar([n + " acc" for n in names], [100 * results[n]["accuracy"] for n in names], color="tab:blue")
    ax.bar([n + " win" for n in names], [100 * results[n]["win_rate_vs_sft"] for n in names], color="tab:orange")
    ax.axhline(50, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("%")
    ax.set_title("quickstart: held-out accuracy and win rate vs SFT")
    fig.tight_layout()
    fig.savefig(out / "plots" / "eval.png", dpi=80)
    plt.close(fig)
