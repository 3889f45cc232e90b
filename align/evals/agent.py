"""Agent harness: ``align eval agent --world builtin --split test --model DIR --output DIR`` (and ``--world appworld``).

Plays every task of the split once with the policy (greedy by default) through the shared rollout engine and the
environment (built-in world in a sandbox, or the real AppWorld over HTTP), and writes into DIR:

    transcripts.jsonl   one line per finished task: the model's turns, the environment's replies, passed/total
    report.json         TGC (% tasks with every check passed), SGC (% scenarios with every task passed), mean
                        reward, TGC per difficulty, counts
    report.md           a readable summary;  report.png  TGC per difficulty

Resumable: tasks already in transcripts.jsonl are not rerun (a killed evaluation continues where it stopped).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from align.errors import UserError


def _write_report(out: Path, rows: list[dict], meta: dict) -> dict:
    from align.agents.play import scores
    from align.runs import atomic_write

    sc = scores(rows)
    report = {**meta, **sc, "passed": {r["task"]: bool(r["success"]) for r in rows}}
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    worlds = f" (seeds {meta['world_seeds']})" if "world_seeds" in meta else ""
    lines = [
        f"# Agent evaluation: {meta['model']}",
        "",
        f"world `{meta['world']}`{worlds}, split `{meta['split']}`, {sc['tasks']} tasks in {sc['scenarios']} scenarios",
        "",
        "| metric | value |",
        "|---|---|",
        f"| TGC | {sc['tgc']:.1f}% |",
        f"| SGC | {sc['sgc']:.1f}% |",
        f"| mean reward (checks passed) | {sc['reward']:.3f} |",
    ]
    lines += [f"| TGC, difficulty {d} | {v:.1f}% |" for d, v in sc["tgc_by_difficulty"].items()]
    by_scen: dict = {}
    for r in rows:
        by_scen.setdefault(r["scenario"], []).append(r["success"])
    lines += ["", "| scenario | tasks passed |", "|---|---|"] + [
        f"| {s} | {sum(v)}/{len(v)} |" for s, v in sorted(by_scen.items())
    ]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    from align.extras import require

    require("matplotlib", "the agent report's chart")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    diffs = list(sc["tgc_by_difficulty"])
    ax.bar([f"difficulty {d}" for d in diffs], [sc["tgc_by_difficulty"][d] for d in diffs], color="tab:blue")
    ax.set_ylim(0, 100)
    ax.set_ylabel("TGC (%)")
    ax.set_title(f"{meta['split']}: TGC {sc['tgc']:.1f}%, SGC {sc['sgc']:.1f}%")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=80)
    plt.close(fig)
    return report


def evaluate_agent(
    model_path: str,
    output: str,
    world: str = "builtin",
    split: str = "test",
    limit: int | None = None,
    max_turns: int = 2,
    max_new_tokens: int = 160,
    temperature: float = 0.0,
    show_docs: bool = False,
    backend: str = "hf",
    appworld_url: str = "http://127.0.0.1:8000",
    seed: int | list[int] = 0,
) -> dict:
    from align.agents.play import load_tasks, make_env, mid_turn_suppressed, play
    from align.config import ModelConfig, Recipe, RolloutConfig
    from align.models import load_policy
    from align.rollout import SamplingParams, make_engine

    recipe = Recipe(trainer="agent")
    recipe.loss.name = "loop"
    recipe.agent.world, recipe.agent.appworld_url, recipe.agent.show_docs = world, appworld_url, show_docs
    seeds = [seed] if isinstance(seed, int) else list(seed)
    tasks = []
    for s in seeds:
        recipe.agent.world_seed = s
        part = load_tasks(recipe, split)
        if len(seeds) > 1:  # several worlds: a task (and a scenario, for SGC) is named by its world too
            part = [dataclasses.replace(t, id=f"w{s}:{t.id}", scenario=f"w{s}:{t.scenario}") for t in part]
        tasks += part
    tasks = tasks[:limit] if limit else tasks
    model, tok = load_policy(ModelConfig(name_or_path=model_path))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "transcripts.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                done[r["task"]] = r
            except (json.JSONDecodeError, KeyError):
                break  # a torn last line from a kill: that task is rerun
    todo = [t for t in tasks if t.id not in done]
    print(f"[eval agent] {len(tasks)} tasks, {len(done)} already done, {len(todo)} to run", file=sys.stderr, flush=True)
    from align.models import for_inference

    engine = make_engine(RolloutConfig(backend=backend, batch_size=64), for_inference(model), tok)
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seeds[0],
        suppress_token_ids=mid_turn_suppressed(tok),
    )
    from align.agents.play import EPISODE_CHUNK

    step = EPISODE_CHUNK
    for s in range(0, len(todo), step):
        rows = play(engine, tok, todo[s : s + step], 1, sampling, max_turns, lambda t: make_env(recipe, t))
        with open(path, "a") as f:
            for r in rows:
                slim = {k: v for k, v in r.items() if k not in ("token_ids", "mask", "logprobs")}
                f.write(json.dumps(slim) + "\n")
                done[r["task"]] = slim
        print(f"[eval agent] {len(done)}/{len(tasks)}", file=sys.stderr, flush=True)
    rows = [done[t.id] for t in tasks]
    meta = {"model": model_path, "world": world, "split": split}
    if world == "builtin":
        meta["world_seeds"] = seeds
    return _write_report(out, rows, meta)


def main_eval_agent(args) -> int:
    if not Path(args.model).is_dir() and not args.model.startswith("tiny:"):
        raise UserError(f"--model {args.model!r}: not a model folder")
    report = evaluate_agent(
        args.model,
        args.output,
        world=args.world,
        split=args.split,
        limit=args.limit,
        max_turns=args.max_turns,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        show_docs=args.show_docs,
        backend=args.backend,
        appworld_url=args.appworld_url,
        seed=getattr(args, "world_seeds", 0),  # AppWorld has no generator seed
    )
    print(json.dumps({k: report[k] for k in ("tgc", "sgc", "reward", "tasks", "scenarios")}))
    return 0


def _seeds(text: str) -> list[int]:
    import argparse

    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is repeated")
    return seeds


def _arguments(a, world: bool) -> None:
    a.add_argument("--model", required=True, help="policy folder (HF format) or a training run's output folder")
    if world:
        a.add_argument("--world", choices=["builtin", "appworld"], default="builtin")
    a.add_argument("--split", default="test", help="built-in: train|dev|test; AppWorld: dev|test_normal|test_challenge")
    a.add_argument("--output", required=True, help="folder for transcripts.jsonl, report.json, report.md, report.png")
    a.add_argument("--limit", type=int, help="only the first N tasks")
    a.add_argument("--max-turns", type=int, default=2)
    a.add_argument("--max-new-tokens", type=int, default=160)
    a.add_argument("--temperature", type=float, default=0.0)
    a.add_argument("--show-docs", action="store_true", help="put the API docs in the first observation")
    if world:
        a.add_argument(
            "--world-seeds",
            type=_seeds,
            default=[0],
            help="built-in world: comma-separated seeds of the task generator (e.g. 0,1,2,3,4: 180 test tasks)",
        )
    a.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    a.add_argument("--appworld-url", default="http://127.0.0.1:8000", help="AppWorld environment server")


def add_parser(esub) -> None:
    a = esub.add_parser("agent", help="agent harness: TGC/SGC of a policy on the built-in world or AppWorld")
    _arguments(a, world=True)
    a.set_defaults(fn=main_eval_agent)
    w = esub.add_parser("appworld", help="agent harness on the real AppWorld (`appworld serve environment` running)")
    _arguments(w, world=False)
    w.set_defaults(fn=main_eval_agent, world="appworld")
