"""Reports of the evaluation harnesses: ``report.png`` (a chart) and ``report.md`` (a short summary) next to the JSON.

- ``alpaca_report``: win rate and length-controlled win rate with 95% error bars (1.96 standard errors) against the
  reference's 50%;
- ``mtbench_report``: mean score per category (turn 1, turn 2) on the 1-10 scale;
- ``arena_report``: win rate against the baseline with its bootstrap 95% interval, against the baseline's 50%;
- ``bar_chart``: the generic helper (values per group, optional symmetric or asymmetric error bars, optional reference
  line), e.g. TGC per difficulty for the agent harness.

Charts are drawn with matplotlib's Agg backend (no display) and written atomically (temporary file, rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from align.runs import atomic_write

Z95 = 1.959963984540054
"""Normal quantile of a two-sided 95% interval: error bars are +- Z95 standard errors."""


def _pyplot():
    from align.extras import require

    require("matplotlib", "the report's charts")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=90)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bar_chart(
    path: str | os.PathLike,
    values: Mapping[str, float | None],
    *,
    ylabel: str,
    title: str = "",
    errors: Mapping[str, float | tuple[float, float] | None] | None = None,
    ylim: tuple[float, float] | None = (0.0, 100.0),
    reference: float | None = None,
    reference_label: str | None = None,
    series: Mapping[str, Mapping[str, float | None]] | None = None,
    annotate: bool = True,
) -> Path:
    """One bar per group (``values``: label -> value; None draws no bar), or grouped bars when ``series`` (series name
    -> {label: value}) is given instead. ``errors``: label -> half-width, or (below, above) for an asymmetric
    interval. ``reference`` draws a dashed horizontal line (e.g. the baseline's 50%). Returns the path."""
    plt = _pyplot()
    path = Path(path)
    groups = list(values) if series is None else list(dict.fromkeys(k for s in series.values() for k in s))
    fig, ax = plt.subplots(figsize=(max(3.6, 0.9 * len(groups) + 1.6), 3.2))
    xs = list(range(len(groups)))
    if series is None:
        heights = [values[g] if values[g] is not None else 0.0 for g in groups]
        err, hi = None, [0.0] * len(groups)
        if errors:
            lo = [(errors.get(g) if not isinstance(errors.get(g), tuple) else errors[g][0]) or 0.0 for g in groups]
            hi = [(errors.get(g) if not isinstance(errors.get(g), tuple) else errors[g][1]) or 0.0 for g in groups]
            err = [lo, hi]
        bars = ax.bar(xs, heights, yerr=err, capsize=5, color="tab:blue", alpha=0.85)
        if annotate:
            for b, g, up in zip(bars, groups, hi):
                if values[g] is not None:
                    ax.annotate(
                        f"{values[g]:.1f}",
                        (b.get_x() + b.get_width() / 2, b.get_height() + up),
                        xytext=(0, 2),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
    else:
        width = 0.8 / max(1, len(series))
        for j, (sname, svals) in enumerate(series.items()):
            offs = [x - 0.4 + width * (j + 0.5) for x in xs]
            ax.bar(offs, [svals.get(g) or 0.0 for g in groups], width=width, label=sname)
        ax.legend(fontsize=7)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label=reference_label)
        if reference_label:
            ax.legend(fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels(
        groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center", fontsize=8
    )
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def alpaca_report(out: str | os.PathLike, name: str, row: dict, meta: Mapping | None = None) -> None:
    """``report.png`` (win rate and LC win rate, +-1.96 SE, reference at 50%) and ``report.md`` for one leaderboard
    row."""
    out = Path(out)
    meta = dict(meta or {})
    ref = meta.get("reference_generator") or "reference"
    values = {"win rate": row["win_rate"], "LC win rate": row.get("length_controlled_winrate")}
    errors = {
        "win rate": Z95 * row["standard_error"] if row.get("standard_error") is not None else None,
        "LC win rate": Z95 * row["lc_standard_error"] if row.get("lc_standard_error") is not None else None,
    }
    top = max([v + (errors[k] or 0) for k, v in values.items() if v is not None] + [60.0])
    bar_chart(
        out / "report.png",
        values,
        errors=errors,
        ylabel=f"% wins against {ref}",
        ylim=(0, min(100, top + 10)),
        reference=50.0,
        reference_label=f"{ref} (50%)",
        title=f"AlpacaEval 2: {name}, n = {row['n_total']} (error bars: 95%)",
    )
    lines = [
        f"# AlpacaEval 2: {name}",
        "",
        f"Judged against `{ref}` by `{meta.get('annotator', '?')}` ({meta.get('judge', '?')}) on "
        f"{meta.get('instructions', row['n_total'])} instructions; reference outputs from "
        f"`{meta.get('reference', '?')}`.",
        "",
        "| column | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in row.items()]
    lines += [
        "",
        "Error bars in `report.png`: 1.96 standard errors (95%).",
        f"LC inputs: {meta.get('lc_inputs') or 'none (not the official 805-instruction reference set)'}.",
        "",
        "| phase | seconds |",
        "|---|---|",
        f"| generation | {_fmt(meta.get('generation_seconds'), 1)} |",
        f"| judging | {_fmt(meta.get('judging_seconds'), 1)} |",
        f"| total (wall) | {_fmt(meta.get('wall_seconds'), 1)} |",
        "",
        "Files: `model_outputs.json`, `annotations.json`, `leaderboard.json`, `report.png`.",
    ]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")


def mtbench_report(out: str | os.PathLike, results: dict) -> None:
    """``report.png`` (mean score per category, turns 1 and 2) and ``report.md`` from MT-Bench's ``results.json``."""
    out = Path(out)
    cats = results["by_category"]
    series = {
        "turn 1": {c: v.get("turn_1") for c, v in cats.items()},
        "turn 2": {c: v.get("turn_2") for c, v in cats.items()},
    }
    bar_chart(
        out / "report.png",
        {c: v.get("score") for c, v in cats.items()},
        series=series,
        ylabel="score (1-10)",
        ylim=(0, 10),
        reference=results.get("score"),
        reference_label=f"overall {_fmt(results.get('score'))}",
        title=f"MT-Bench: {results['model']} (judge {results['judge']})",
    )
    lines = [
        f"# MT-Bench: {results['model']}",
        "",
        f"Judge `{results['judge']}`, single-answer grading (1-10) with the reference answers for "
        f"{', '.join(results.get('reference_categories', []))}; {results['n_questions']} questions.",
        "",
        "| | score |",
        "|---|---|",
        f"| overall | {_fmt(results.get('score'))} |",
        f"| turn 1 | {_fmt(results.get('turn_1'))} |",
        f"| turn 2 | {_fmt(results.get('turn_2'))} |",
        "",
        "| category | turn 1 | turn 2 | mean | judgments |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c} | {_fmt(v.get('turn_1'))} | {_fmt(v.get('turn_2'))} | {_fmt(v.get('score'))} | {v.get('n', 0)} |"
        for c, v in cats.items()
    ]
    lines += [
        "",
        f"Unparsed judgements (no rating, left out): {results.get('n_unparsed', 0)} of "
        f"{results.get('n_judgments', 0)}.",
        "",
        "Files: `model_answers.jsonl`, `judgments.jsonl`, `results.json`, `report.png`.",
    ]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")


def arena_report(out: str | os.PathLike, results: dict) -> None:
    """``report.png`` (win rate against the baseline with its bootstrap 95% interval) and ``report.md``."""
    out = Path(out)
    wr, (lo, hi) = results["win_rate"], results["ci"]
    bar_chart(
        out / "report.png",
        {results["model"]: wr},
        errors={results["model"]: (wr - lo, hi - wr)},
        ylabel=f"% win rate against {results['baseline']}",
        reference=50.0,
        reference_label=f"{results['baseline']} (50%)",
        title=f"Arena-Hard: {results['model']} (95% bootstrap CI)",
    )
    counts = results.get("verdicts", {})
    lines = [
        f"# Arena-Hard: {results['model']}",
        "",
        f"Pairwise against `{results['baseline']}`, judge `{results['judge']}`, two games per question (positions "
        f"swapped); {results['n_questions']} questions.",
        "",
        "| | value |",
        "|---|---|",
        f"| win rate | {_fmt(wr)} |",
        f"| 95% CI | {_fmt(lo)} - {_fmt(hi)} |",
        f"| battles (weighted) | {results['n_battles']} |",
        f"| games without a verdict | {results.get('n_unparsed', 0)} |",
        f"| avg answer tokens | {_fmt(results.get('avg_tokens'), 1)} |",
        "",
        "| verdict (model vs baseline) | games |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", "Files: `model_answers.jsonl`, `judgments.jsonl`, `results.json`, `report.png`."]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
