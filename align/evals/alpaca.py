"""AlpacaEval: score an existing annotations file into a leaderboard row (no generation, no judge calls here).

``align eval alpaca --annotations FILE`` scores a file; ``align eval alpaca --model PATH --judge JUDGE.yaml`` (the
generation path, ``align/evals/alpaca_generate.py``) generates, judges, and scores its annotations through the same
``leaderboard_row`` (``score_rows_and_write``). The two options are mutually exclusive.

An AlpacaEval annotations file is a JSON list (optionally gzipped) of pairwise judgements, one per instruction:
``output_1`` is the reference model's answer, ``output_2`` the evaluated model's, and ``preference`` in [1, 2] the
judge's preference for ``output_2`` (1 = reference wins, 2 = model wins; weighted annotators such as
``weighted_alpaca_eval_gpt4_turbo`` give a probability-weighted value in between).

The numbers follow alpaca_eval's definitions (``metrics.get_winrate`` and ``main.evaluate``), so a row computed from
a model's annotations equals that model's row of the public leaderboard:

- win probability per instruction: ``preference - 1``; a legacy ``0`` means a draw (1.5); ``None``/NaN preferences
  are dropped (they count in no column);
- ``win_rate``: mean win probability x 100; ``standard_error``: standard error of that mean (sample std, ddof=1) x 100;
- ``n_wins`` / ``n_wins_base`` / ``n_draws``: instructions with win probability > 0.5 / < 0.5 / exactly 0.5;
  ``n_total``: instructions with a preference;
- ``discrete_win_rate``: the same with every judgement rounded to win (1), loss (0) or exact draw (1/2), x 100;
- ``avg_length``: mean length of the model's answers (``output_2``) in characters, truncated to an int.

One difference is inherent to scoring annotations: alpaca_eval's ``avg_length`` averages over the model-outputs file,
while annotations exist only for non-empty outputs; where a model left some of the 805 instructions empty, the public
leaderboard's ``avg_length`` (computed when the empty outputs were still in the outputs file) is a little lower than
the mean over the annotated answers.

``length_controlled_winrate`` and ``lc_standard_error`` come from alpaca_eval's length-controlled GLM
(``align/evals/alpaca_lc.py``) when LC inputs are given: the hub's ``instruction_difficulty.csv`` / ``df_gamed.csv``
(``--instruction-difficulty``, ``--gamed``), else our shipped offline estimate of them. ``leaderboard_row`` without
LC inputs leaves both ``None``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from align.errors import UserError
from align.evals.annotations import load_annotations, win_probability
from align.runs import atomic_write

if TYPE_CHECKING:
    from align.evals.alpaca_lc import LCInputs

LEADERBOARD_FILE = "leaderboard.json"
"""The file ``score_annotations_file`` writes in its output folder: ``{model name: row}``."""

COLUMNS = (
    "win_rate",
    "standard_error",
    "n_wins",
    "n_wins_base",
    "n_draws",
    "n_total",
    "discrete_win_rate",
    "avg_length",
    "length_controlled_winrate",
    "lc_standard_error",
)
"""The row's keys, in alpaca_eval's leaderboard order."""


def generator_name(annotations: Iterable[dict]) -> str | None:
    """The evaluated model's name: the one ``generator_2`` shared by all rows, else None."""
    names = {row.get("generator_2") for row in annotations}
    if len(names) == 1:
        (name,) = names
        if isinstance(name, str) and name:
            return name
    return None


def leaderboard_row(
    annotations: list[dict], name: str | None = None, *, source: str | None = None, lc: LCInputs | None = None
) -> dict:
    """alpaca_eval's leaderboard columns for one model's annotations.

    ``name`` (the model) and ``source`` (the file) only label error messages; the row itself is keyed by the model
    name in the leaderboard, as in alpaca_eval. Raises UserError for a row without ``preference`` or with a value that
    is not a preference, and when no row has one. ``lc`` (``alpaca_lc.load_lc_inputs()``) fills the two
    length-controlled columns; without it they are ``None``.
    """
    label = source or (f"annotations of {name}" if name else "annotations")
    probs: list[float] = []
    for i, row in enumerate(annotations):
        if not isinstance(row, dict) or "preference" not in row:
            raise UserError(f"{label}: row {i}: no 'preference' field")
        p = win_probability(row["preference"], f"{label}: row {i}")
        if p is not None:
            probs.append(p)
    n = len(probs)
    if n == 0:
        raise UserError(f"{label}: no row has a preference (all are null)")

    mean = math.fsum(probs) / n
    if n > 1:
        variance = math.fsum((p - mean) ** 2 for p in probs) / (n - 1)
        standard_error = math.sqrt(variance / n) * 100
    else:
        standard_error = None  # undefined for one judgement (alpaca_eval: NaN)
    n_wins = sum(p > 0.5 for p in probs)
    n_wins_base = sum(p < 0.5 for p in probs)
    n_draws = n - n_wins - n_wins_base

    lengths = [len(row["output_2"]) for row in annotations if isinstance(row.get("output_2"), str)]
    avg_length = sum(lengths) // len(lengths) if lengths else None  # alpaca_eval: int(mean character length)

    lc_winrate = lc_se = None
    if lc is not None:
        from align.evals.alpaca_lc import length_controlled_winrate

        res = length_controlled_winrate(annotations, lc, label=label)
        lc_winrate, lc_se = res["length_controlled_winrate"], res["lc_standard_error"]

    return {
        "win_rate": mean * 100,
        "standard_error": standard_error,
        "n_wins": n_wins,
        "n_wins_base": n_wins_base,
        "n_draws": n_draws,
        "n_total": n,
        "discrete_win_rate": (n_wins + 0.5 * n_draws) / n * 100,
        "avg_length": avg_length,
        "length_controlled_winrate": lc_winrate,
        "lc_standard_error": lc_se,
    }


def read_leaderboard(path: Path) -> dict[str, dict]:
    try:
        board = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: existing leaderboard is not readable JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(board, dict) or not all(isinstance(v, dict) for v in board.values()):
        raise UserError(
            f"{path}: existing leaderboard is not a {{model name: row}} object; remove it or pick another --output"
        )
    return board


def score_annotations_file(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    name: str | None = None,
    *,
    instruction_difficulty: str | os.PathLike | None = None,
    gamed: str | os.PathLike | None = None,
    length_controlled: bool = True,
) -> dict:
    """Score an annotations file and write ``output_dir/leaderboard.json`` atomically; returns the model's row.

    The leaderboard is ``{model name: row}`` (alpaca_eval's layout, one entry per model). The name is ``name``, else
    the annotations' single ``generator_2``, else the file name without ``.json[.gz]``. A leaderboard already in the
    folder keeps its other models (as alpaca_eval adds a model to its leaderboard); entries are sorted by win rate.
    The LC columns use the hub files where given (``instruction_difficulty``, ``gamed``), else the shipped estimate;
    ``length_controlled=False`` leaves them ``None``. Nothing is written when an input is bad.
    """
    return score_file(
        path,
        output_dir,
        name,
        instruction_difficulty=instruction_difficulty,
        gamed=gamed,
        length_controlled=length_controlled,
    )[1]


def score_file(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    name: str | None,
    *,
    instruction_difficulty=None,
    gamed=None,
    length_controlled: bool = True,
) -> tuple[str, dict]:
    """``score_annotations_file`` returning (the model's name in the leaderboard, its row)."""
    path = Path(path)
    annotations = load_annotations(path)
    lc = None
    if length_controlled:
        from align.evals.alpaca_lc import load_lc_inputs

        lc = load_lc_inputs(instruction_difficulty, gamed)
    model = name or generator_name(annotations) or path.name.removesuffix(".gz").removesuffix(".json")
    return model, score_rows_and_write(annotations, output_dir, model, source=str(path), lc=lc)


def score_rows_and_write(
    annotations: list[dict], output_dir: str | os.PathLike, model: str, *, source: str, lc: LCInputs | None = None
) -> dict:
    """``leaderboard_row`` of annotations already in memory, merged into ``output_dir/leaderboard.json`` (atomic
    write, other models kept, sorted by win rate); returns the row. The generation path of ``align eval alpaca
    --model`` scores its annotations through here."""
    output_dir = Path(output_dir)
    row = leaderboard_row(annotations, model, source=source, lc=lc)

    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: --output exists and is not a folder")
    out = output_dir / LEADERBOARD_FILE
    board = read_leaderboard(out) if out.exists() else {}
    board[model] = row
    board = dict(sorted(board.items(), key=lambda kv: -(kv[1].get("win_rate") or 0.0)))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out, json.dumps(board, indent=2, allow_nan=False) + "\n")
    except OSError as e:
        raise UserError(f"{out}: cannot write the leaderboard: {e.strerror or e}") from None
    return row
