"""``WorldEnv``: one built-in-world task as an Environment of the rollout engine (align/rollout/episodes.py).

    env = WorldEnv(task)
    first = env.reset()                  # the instruction (+ the API docs when show_docs): starts the sandbox worker
    obs, done = env.step(model_text)     # the model's turn is Python (markdown fences stripped); obs = printed
                                         # output and/or the error line; done once apis.supervisor.complete_task()
                                         # ran, or the worker died (a turn past its time limit, a crash)
    env.evaluate()                       # {"passed", "total", "reward" = passed/total, "success", "checks"}
    env.close()                          # ends the worker (also on garbage collection)

The state is copied back from the worker after every turn, so ``evaluate`` works after ``close`` and after a killed
turn (that turn's own changes are then lost: it did not finish).
"""

from __future__ import annotations

import re

from align.agents.sandbox import Limits, Sandbox
from align.agents.world import API_DOCS, Task, check_details

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n?(.*?)(?:```|\Z)", re.S)


def strip_fences(text: str) -> str:
    """The code of a model turn: the contents of its markdown code blocks if it has any, else the text itself."""
    if "```" not in text:
        return text
    blocks = [b for b in _FENCE.findall(text) if b.strip()]
    return "\n".join(b.rstrip() for b in blocks) if blocks else text.replace("```", "")


def first_observation(instruction: str, show_docs: bool) -> str:
    if not show_docs:
        return instruction
    return f"{instruction}\n\nWrite Python. APIs:\n{API_DOCS}"


class WorldEnv:
    """The Environment protocol (``reset() -> str``, ``step(text) -> (str | None, bool)``) for one ``Task``."""

    def __init__(
        self,
        task: Task,
        turn_timeout: float = 5.0,
        max_output_chars: int = 2000,
        show_docs: bool = True,
        limits: Limits | None = None,
        privileged: bool | None = None,
    ):
        self.task, self.turn_timeout, self.max_output_chars = task, float(turn_timeout), int(max_output_chars)
        self.show_docs, self.limits, self.privileged = show_docs, limits, privileged
        self.db = task.db
        self.done = False
        self.turns: list[dict] = []  # code, output, error per turn (for transcripts and debugging)
        self.startup_seconds: float | None = None
        self._sandbox: Sandbox | None = None

    def reset(self) -> str:
        self.close()
        self.db, self.done, self.turns = self.task.db, False, []
        self._sandbox = Sandbox(
            self.task.db, limits=self.limits, max_output_chars=self.max_output_chars, privileged=self.privileged
        )
        self.startup_seconds = self._sandbox.startup_seconds
        return first_observation(self.task.instruction, self.show_docs)

    def step(self, text: str) -> tuple[str | None, bool]:
        if self.done or self._sandbox is None:
            return "the episode is over", True
        code = strip_fences(text)
        r = self._sandbox.run(code, timeout=self.turn_timeout)
        if r.db is not None:
            self.db = r.db
        obs = r.output
        if r.error:
            obs = (obs.rstrip("\n") + "\n" if obs.strip() else "") + r.error
        obs = obs if obs.strip() else "(no output)"
        if len(obs) > self.max_output_chars + 80:
            obs = obs[: self.max_output_chars] + "\n...[truncated]"
        self.turns.append({"code": code, "output": r.output, "error": r.error, "seconds": round(r.seconds, 4)})
        if r.done or r.dead:
            self.done = True
            self.close()
        return obs, self.done

    def evaluate(self) -> dict:
        details = check_details(self.task, self.db)
        passed, total = sum(ok for _, ok in details), len(details)
        return {
            "passed": passed,
            "total": total,
            "reward": passed / total if total else 0.0,
            "success": total > 0 and passed == total,
            "checks": details,
        }

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
