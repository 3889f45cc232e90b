"""Bootstrap confidence intervals for the benchmarks that compare training methods.

A method's score is a [seeds, items] array (items: test tasks or prompts, the same items in the same order for every
method; seeds: independent training runs). One bootstrap draw resamples the items with replacement and the seeds with
replacement, both *paired*: every method sees the same item draw, and methods with the same number of seeds the same
seed draw (seed i of every method shares its start and its random seed). A method's value in a draw is the mean over
its resampled seeds of the weighted item mean; a difference is taken within the draw. The interval is the 2.5th and
97.5th percentiles over the draws (percentile bootstrap), so it covers the variation from both the test set and the
training run.
"""

from __future__ import annotations

import numpy as np


def bootstrap(
    scores: dict[str, np.ndarray | list],
    differences: dict[str, tuple[str, str]] | None = None,
    draws: int = 4000,
    seed: int = 0,
    scale: float = 1.0,
    digits: int = 4,
) -> dict[str, dict]:
    """``{name: {"mean": m, "ci95": [lo, hi]}}`` for every method in ``scores`` and every ``differences`` entry
    ``name: (a, b)`` (a minus b). ``scale`` multiplies everything (100 for percent); values are rounded to
    ``digits``. Deterministic in ``seed``."""
    arrays = {m: np.atleast_2d(np.asarray(v, dtype=np.float64)) for m, v in scores.items()}
    items = {a.shape[1] for a in arrays.values()}
    if len(items) != 1:
        raise ValueError(f"bootstrap: every method needs the same items, got {sorted(items)} items")
    n = items.pop()
    rng = np.random.default_rng(seed)
    item_w = rng.multinomial(n, np.full(n, 1.0 / n), size=draws) / n  # [draws, n]: weights of one item resample
    seed_w = {}
    for s in sorted({a.shape[0] for a in arrays.values()}):
        seed_w[s] = rng.multinomial(s, np.full(s, 1.0 / s), size=draws) / s  # [draws, s]
    samples = {}
    for m, a in arrays.items():
        per_seed = a @ item_w.T  # [s, draws]: each seed's mean over the resampled items
        samples[m] = scale * np.einsum("ds,sd->d", seed_w[a.shape[0]], per_seed)
    out = {m: _summary(scale * a.mean(), samples[m], digits) for m, a in arrays.items()}
    for name, (a, b) in (differences or {}).items():
        out[name] = _summary(scale * (arrays[a].mean() - arrays[b].mean()), samples[a] - samples[b], digits)
    return out


def _summary(mean: float, draws: np.ndarray, digits: int) -> dict:
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"mean": round(float(mean), digits), "ci95": [round(float(lo), digits), round(float(hi), digits)]}


def half_width(entry: dict) -> float:
    lo, hi = entry["ci95"]
    return round((hi - lo) / 2, 4)
