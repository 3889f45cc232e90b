"""Reward functions: the user's own Python code as the online trainer's reward (``judge.kind: function``).

A reward function is any callable, as TRL's ``GRPOTrainer(reward_funcs=...)`` takes them:

    def reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
        ...                     # columns: every other column of the prompt rows, one value per completion

``judge.functions`` names them as ``"package.module:function"``, ``"path/to/file.py:function"`` (a path starting
with ``./`` is relative to the recipe's folder), ``"reward_model:PATH"`` (a reward model's pointwise score) and
``"llm:MODEL@BASE_URL"`` (an LLM judge's pointwise score; both resolved by ``align.judges.load_reward_function``) or,
from the Python API, ``align.train(..., reward_funcs=[...])``.
The reward of a completion is ``sum_k judge.weights[k] * f_k(...)`` (weights 1 by default); each function's mean
is logged as ``reward/<name>`` (each sample's scores are saved with the rollouts). Pairwise judges (checker, reward
model, LLM) give win rates instead; both feed the same objectives (``align/trainers/online.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

from align.errors import UserError


def load_function(spec: str):
    """The callable ``spec`` names (``module:attr``, ``file.py:attr`` or ``memory:<name>``); UserError otherwise."""
    if spec.startswith("memory:"):
        from align.memory import lookup

        fn = lookup(spec, "judge.functions")
    else:
        where, sep, attr = spec.rpartition(":")
        if not sep or not where or not attr:
            raise UserError(f"judge.functions: {spec!r}: expected 'package.module:function' or 'file.py:function'")
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UserError(f"judge.functions: {spec!r}: file {where} not found")
            mod_spec = importlib.util.spec_from_file_location(f"align_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            try:
                mod_spec.loader.exec_module(module)
            except Exception as e:  # the user's module failed to import: one line
                raise UserError(f"judge.functions: {spec!r}: {type(e).__name__}: {e}".splitlines()[0]) from None
        else:
            try:
                module = importlib.import_module(where)
            except ImportError as e:
                raise UserError(f"judge.functions: {spec!r}: cannot import {where} ({e})".splitlines()[0]) from None
        fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"judge.functions: {spec!r} is not a callable")
    return fn


def function_name(spec: str, fn) -> str:
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name != "<lambda>" else spec.rsplit(":", 1)[-1]


class RewardFunctions:
    """Pointwise rewards: a weighted sum of reward functions. ``score`` returns one reward per completion."""

    pointwise = True

    def __init__(self, specs: list[str], weights: list[float] | None = None, resolve=None):
        """``resolve(spec) -> callable`` (default ``load_function``; the judges module adds reward models and LLM
        judges as pointwise functions)."""
        resolve = resolve or load_function
        if not specs:
            raise UserError("judge.functions: judge.kind 'function' needs at least one reward function")
        if weights is not None and len(weights) != len(specs):
            raise UserError(f"judge.weights: {len(weights)} weights for {len(specs)} judge.functions")
        self.functions = [(function_name(s, f), f) for s, f in ((s, resolve(s)) for s in specs)]
        self.weights = list(weights) if weights is not None else [1.0] * len(specs)
        self.calls = 0
        self.last: dict[str, list] = {}  # each function's scores in the last call, by name
        self.cache: dict = {}  # (nothing memoised: the rewards are saved with the rollouts; the judge protocol)

    def added_since(self, n: int) -> dict:
        return {}

    def remember(self, judged, rank: int = 0) -> None:
        """Nothing to restore: a resumed run reads the rewards from the saved rollouts."""

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None) -> list:
        total = [0.0] * len(completions)
        self.last = {}
        for (name, fn), w in zip(self.functions, self.weights):
            self.calls += 1
            out = fn(prompts=list(prompts), completions=list(completions), **(columns or {}))
            try:
                values = [float(v) for v in out]
            except (TypeError, ValueError):
                raise UserError(f"reward function {name!r} must return a list of numbers, got {out!r:.80}") from None
            if len(values) != len(completions) or not all(math.isfinite(v) for v in values):
                raise UserError(
                    f"reward function {name!r} returned {len(values)} values for {len(completions)} completions "
                    "(one finite number per completion is required)"
                )
            self.last[name] = values
            total = [t + w * v for t, v in zip(total, values)]
        return total


def exact_match(prompts: list[str], completions: list[str], answer: list, **_) -> list[float]:
    """1.0 where the completion, stripped, equals the row's ``answer`` column (e.g. the built-in tasks'), else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]
