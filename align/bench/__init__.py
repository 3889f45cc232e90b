"""Benchmarks: ``align bench NAME [key=value ...] --json`` prints exactly one JSON object on stdout.

Each benchmark runs its baseline in the same command and reports ratios; results go in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

from align.errors import UserError

BENCHMARKS = {
    "dpo": "align.bench.dpo",
    "rollout": "align.bench.rollout",
    "online": "align.bench.online",
    "reward": "align.bench.reward",
    "agent": "align.bench.agent",
}


def parse_options(name: str, defaults: dict[str, int | list[int]], extra: list[str]) -> dict:
    """``["steps=30", "lrs=50,100", ...]`` over a benchmark's integer (or integer-list: comma-separated) defaults;
    unknown keys and non-integers are UserErrors."""
    options = dict(defaults)
    for item in extra:
        key, _, value = item.partition("=")
        if key not in options:
            raise UserError(f"bench {name}: unknown option {key!r}; options: {', '.join(options)}")
        try:
            if isinstance(defaults[key], list):
                options[key] = [int(v) for v in value.split(",") if v.strip()]
            else:
                options[key] = int(value)
        except ValueError:
            kind = "comma-separated integers" if isinstance(defaults[key], list) else "an integer"
            raise UserError(f"bench {name}: option {key!r} needs {kind}, got {value!r}") from None
    return options


def run_bench(name: str, extra: list[str]) -> dict:
    if name not in BENCHMARKS:
        raise UserError(f"bench: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    with contextlib.redirect_stdout(sys.stderr):  # progress and library chatter never reach stdout
        return importlib.import_module(BENCHMARKS[name]).run(extra)


def plot_curves(curves: dict, path: str) -> None:
    """One PNG of a benchmark's ``curves``: {panel: {method: [value per round]}} (one subplot per panel) or
    {method: [values]} (one panel). Panels with nothing to draw are left out."""
    from align.extras import require

    require("matplotlib", "--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = curves if all(isinstance(v, dict) for v in curves.values()) else {"": curves}
    panels = {k: v for k, v in panels.items() if any(v.values())}
    if not panels:
        raise UserError("bench: this run has no curves to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for method, ys in lines.items():
            if ys:
                ax.plot(range(1, len(ys) + 1), ys, marker="o", label=method)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
