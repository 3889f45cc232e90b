"""Playing episodes of agent tasks: which tasks a recipe names, their environments, K episodes per task through
the rollout engine, and AppWorld's scores (TGC, SGC). Shared by the agent trainer and the agent harness.

    tasks = load_tasks(recipe, "train")
    rows = play(engine, tokenizer, tasks, k, sampling, max_turns, env_for=lambda t: make_env(recipe, t))
    scores(rows)   # {"tgc", "sgc", "reward", ...}
"""

from __future__ import annotations

from align.config import Recipe
from align.errors import UserError
from align.rollout import SamplingParams
from align.rollout.episodes import run_episodes

EPISODE_CHUNK = 64  # environments (sandbox processes) alive at once


def load_tasks(recipe: Recipe, split: str) -> list:
    a = recipe.agent
    if a.world == "builtin":
        from align.agents.world import tasks_for

        tasks = tasks_for(split, seed=a.world_seed)
        if not tasks:
            raise UserError(f"agent.split: the built-in world has no {split!r} split (train, dev, test)")
        return tasks
    from align.agents.appworld import appworld_tasks

    return appworld_tasks(split, a.appworld_url)


def make_env(recipe: Recipe, task):
    a = recipe.agent
    if a.world == "builtin":
        from align.agents.env import WorldEnv

        env = WorldEnv(task, turn_timeout=a.turn_timeout)
        if not a.show_docs:
            env.show_docs = False
        return env
    from align.agents.appworld import AppWorldEnv

    return AppWorldEnv(task, a.appworld_url)


def play(
    engine,
    tokenizer,
    tasks: list,
    k: int,
    sampling: SamplingParams,
    max_turns: int,
    env_for,
    max_tokens: int | None = None,
) -> list[dict]:
    """K episodes per task; returns plain rows (task id, scenario, token ids, masks, log-probs, reward, success,
    truncated: the episode ended because its next turn would not fit in ``max_tokens``)."""
    jobs = [(t, j) for t in tasks for j in range(k)]
    rows = []
    for s in range(0, len(jobs), EPISODE_CHUNK):
        chunk = jobs[s : s + EPISODE_CHUNK]
        envs = [env_for(t) for t, _ in chunk]
        try:
            sp = SamplingParams(**{**sampling.__dict__, "seed": None if sampling.seed is None else sampling.seed + s})
            episodes = run_episodes(engine, tokenizer, envs, sp, max_turns=max_turns, max_tokens=max_tokens)
            for (task, _), env, ep in zip(chunk, envs, episodes):
                res = env.evaluate()
                rows.append(
                    {
                        "task": task.id,
                        "scenario": task.scenario,
                        "difficulty": getattr(task, "difficulty", None),
                        "token_ids": ep.token_ids,
                        "mask": ep.model_mask,
                        "logprobs": ep.logprobs,
                        "reward": float(res["reward"]),
                        "success": bool(res["success"]),
                        "turns": ep.turns,
                        "finished": ep.finished,
                        "truncated": ep.truncated,
                        "text": [m["content"] for m in ep.messages if m["role"] == "assistant"],
                    }
                )
        finally:
            for env in envs:
                env.close()
    return rows


def mid_turn_suppressed(tok) -> list[int]:
    """Token ids a small policy must not sample inside a turn: pad, bos and unk (eos ends the turn)."""
    return sorted(
        {i for i in (tok.pad_token_id, tok.bos_token_id, tok.unk_token_id) if i is not None and i != tok.eos_token_id}
    )


def scores(rows: list[dict]) -> dict:
    """TGC: % of tasks whose checks all passed; SGC: % of scenarios whose tasks all passed (AppWorld's metrics)."""
    by_task: dict = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    task_ok = {t: all(x["success"] for x in v) for t, v in by_task.items()}
    scen: dict = {}
    for t, v in by_task.items():
        scen.setdefault(v[0]["scenario"], []).append(task_ok[t])
    diff: dict = {}
    for t, v in by_task.items():
        diff.setdefault(str(v[0].get("difficulty")), []).append(task_ok[t])
    return {
        "tgc": 100.0 * sum(task_ok.values()) / max(len(task_ok), 1),
        "sgc": 100.0 * sum(all(v) for v in scen.values()) / max(len(scen), 1),
        "reward": sum(r["reward"] for r in rows) / max(len(rows), 1),
        "tasks": len(task_ok),
        "scenarios": len(scen),
        "tgc_by_difficulty": {d: 100.0 * sum(v) / len(v) for d, v in sorted(diff.items())},
    }
