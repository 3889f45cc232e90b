"""``python -m align.agents``: the sandbox level on this machine, the start-up time of an episode's worker at every
level this machine can give (``startup_ms``: median and p95 of 200 starts each, the sandbox closed after each), and
the cost of episodes (every gold solution of the built-in world through WorldEnv), as one JSON object."""

from __future__ import annotations

import json
import statistics
import time

from align.agents.env import WorldEnv
from align.agents.sandbox import LEVELS, Sandbox, sandbox_level
from align.agents.world import make_tasks


def startup_by_level(top: str, n: int = 200) -> dict:
    """{level: {median, p95} ms} for every level up to ``top`` (a worker started, asked nothing, closed)."""
    out = {}
    for lv in LEVELS[: LEVELS.index(top) + 1][::-1]:
        times = []
        for _ in range(n):
            with Sandbox({}, max_level=lv) as sb:
                times.append(sb.startup_seconds)
                got = sb.levels["level"]
        out[lv] = {"median": round(1000 * statistics.median(times), 2), "p95": _ms(times, 0.95), "level_in_force": got}
    return out


def _ms(xs, q):
    return round(1000 * sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 2)


def main() -> dict:
    t = time.perf_counter()
    level = sandbox_level()
    zygote_s = time.perf_counter() - t
    startup = startup_by_level(level["level"])
    tasks = make_tasks()
    starts, steps, failed = [], [], []
    t = time.perf_counter()
    for task in tasks:
        env = WorldEnv(task)
        env.reset()
        starts.append(env.startup_seconds)
        s = time.perf_counter()
        _, done = env.step(task.solution)
        steps.append(time.perf_counter() - s)
        if not (done and env.evaluate()["success"]):
            failed.append(task.id)
        env.close()
    total = time.perf_counter() - t

    return {
        "sandbox_level": level,
        "first_sandbox_ms": round(1000 * zygote_s, 1),
        "startup_ms": startup,
        "tasks": len(tasks),
        "gold_failed": failed,
        "reset_ms": {"median": round(1000 * statistics.median(starts), 2), "p90": _ms(starts, 0.9)},
        "gold_step_ms": {"median": round(1000 * statistics.median(steps), 2), "p90": _ms(steps, 0.9)},
        "all_gold_episodes_s": round(total, 3),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
