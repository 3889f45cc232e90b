"""Checker-based evaluation on the built-in tasks: accuracy and win rate against a baseline's answers."""

from __future__ import annotations

from align.rollout import SamplingParams
from align.tasks import Task


def answers(engine, tasks: list[Task], max_new_tokens: int = 16) -> list[str]:
    """Greedy answer of the engine's policy to every task."""
    out = engine.generate(
        [t.prompt for t in tasks], n=1, sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    )
    return [g[0].text for g in out]


def accuracy(tasks: list[Task], answers: list[str]) -> float:
    return sum(t.check(a) for t, a in zip(tasks, answers)) / max(len(tasks), 1)


def per_prompt_wins(tasks: list[Task], answers: list[str], baseline: list[str]) -> list[float]:
    """Checker-judged outcome per prompt: 1 when only the policy is right, 0 when only the baseline is, 1/2 for ties."""
    out = []
    for t, a, b in zip(tasks, answers, baseline):
        pa, pb = t.check(a), t.check(b)
        out.append(1.0 if pa > pb else 0.0 if pa < pb else 0.5)
    return out


def win_rate(tasks: list[Task], answers: list[str], baseline: list[str]) -> float:
    """Checker-judged win rate: the mean of ``per_prompt_wins``."""
    return sum(per_prompt_wins(tasks, answers, baseline)) / max(len(tasks), 1)


def per_family_accuracy(tasks: list[Task], answers: list[str]) -> dict[str, float]:
    fams: dict[str, list[bool]] = {}
    for t, a in zip(tasks, answers):
        fams.setdefault(t.family, []).append(t.check(a))
    return {f: sum(v) / len(v) for f, v in fams.items()}
