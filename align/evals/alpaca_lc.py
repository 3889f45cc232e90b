"""AlpacaEval 2 length-controlled (LC) win rate: alpaca_eval's GLM, written from its description and source.

Reference: alpaca_eval, ``src/alpaca_eval/metrics/glm_winrate.py`` (``get_length_controlled_winrate``,
``_get_featurized_data``, ``fit_LogisticRegressionCV``; GLM ``length_controlled_v1``), Apache-2.0, and Dubois et al.
2024, "Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators" (arXiv:2404.04475). This is our
own implementation of that method (numpy + scikit-learn's liblinear solver), not a copy of their code.

The model (one fit per evaluated model, against the reference ``gpt4_1106_preview``)::

    P(model beats reference on instruction i) = sigmoid( w_len * tanh(std_delta_len_i)
                                                        + w_diff * instruction_difficulty_i
                                                        + w_bias * not_gamed_baseline_i )      (no intercept)

- ``std_delta_len_i = (len(output_1) - len(output_2)) / std`` in characters, reference minus model, divided by the
  sample standard deviation (ddof=1) over all the model's annotation rows;
- ``instruction_difficulty_i``: a fixed per-instruction number (alpaca_eval fitted it once, jointly over many models,
  and publishes it on the hub); the instruction of annotation row ``i`` is its *position* in the annotations file,
  as in alpaca_eval (``reset_index``), so a file with a missing instruction shifts every later row by one -- the
  public leaderboard was computed that way and we reproduce it (see ``docs/benchmarks.md``);
- ``not_gamed_baseline``: 1 for the model's own rows. The training set also holds the rows of ``df_gamed.csv``: the
  annotations of the reference's own verbose and concise variants (``gpt4_1106_preview_{verbose,concise}``), with
  ``not_gamed_baseline = 0`` (no bias term) and sample weight ``lambda / 2`` (lambda =
  ``regularize_to_baseline_lambda`` = 0.2, halved because there are two gamed baselines) against 1 for the model's
  rows. They tie the length slope to how the *same* model's win rate moves when only its length changes.
- Targets are soft: ``preference - 1`` in [0, 1] (a legacy 0 is a draw, 0.5); rows without a preference are left out
  of the fit. A soft label y is fitted as two rows, label 1 with weight ``y * w`` and label 0 with weight
  ``(1 - y) * w``, which is the cross-entropy against y.
- Fit: L1-penalised logistic regression (liblinear, no intercept, ``random_state=123``), C chosen by 5-fold
  ``GroupKFold`` cross-validation over ``Cs = logspace(-4, 4, 10)`` (both copies of a row in the same fold), the score
  being the weighted soft cross-entropy on the held-out rows (mean of ``w * CE``); then refitted on all rows with the
  best C (ties: the smaller C, as ``LogisticRegressionCV``).
- LC win rate: predict every annotation row with the length term set to 0 (``std_delta_len = 0``),
  ``p_i = sigmoid(w_diff * d_i + w_bias)``; ``length_controlled_winrate = 100 * mean(p_i)`` and
  ``lc_standard_error = 100 * std(p_i, ddof=1) / sqrt(n)`` -- the standard error of the mean of the predictions, as
  alpaca_eval computes it. The reference against itself is 50 by definition (standard error 0).

Inputs. With the two hub files (``instruction_difficulty.csv``: ``index,instruction_difficulty``; ``df_gamed.csv``:
rows with ``index, preference, std_delta_len, instruction_difficulty, not_gamed_baseline``) this follows the official
method: like alpaca_eval, the difficulty of instruction ``k`` is read from ``df_gamed.csv`` (its first row with
``index == k``); ``instruction_difficulty.csv`` holds the same vector (alpaca_eval uses it only to change the
baseline) and, when both are given, is only checked against it (a disagreement prints a warning). Given alone, it
replaces the difficulty of the model's rows and of the gamed rows.

Offline, without the hub files, we ship estimates of both in the same formats (``align/evals/data/alpaca_lc_*.csv``),
made by ``evals/alpaca_lc/estimate.py``:

- difficulty: with the published per-model GLM weights (alpaca_eval's weights CSV, fitted with the official
  difficulty) held fixed, the annotations of 48 models on instruction k form a one-parameter logistic regression in
  d_k; we take its posterior mode under a N(0, 1.5^2) prior. This recovers d on the official scale and offset.
- gamed rows: lengths from the reference's verbose/concise outputs; as preferences, the variants' expected
  judgements under their own published weights, ``sigmoid(w_len * tanh(std_delta_len) + w_diff * d)``.

Leave-one-model-out against the public leaderboard (the scored model never contributes to the estimate), 48 models:
mean |LC error| 0.25 points, max 1.34; ``lc_standard_error`` within 0.06 of the 6 public values. Details, the
alternatives tried and the exact command are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import csv
import gzip
import inspect
import io
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from align.errors import UserError
from align.extras import require

REGULARIZE_TO_BASELINE_LAMBDA = 0.2
"""alpaca_eval's ``regularize_to_baseline_lambda`` of ``length_controlled_v1``: total weight of the gamed rows."""

N_SPLITS = 5
CS = np.logspace(-4, 4, 10)
"""The C grid of scikit-learn's ``LogisticRegressionCV(Cs=10)``."""
RANDOM_STATE = 123
WEIGHT_NAMES = ("np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)")
"""Names of the three GLM weights, as in alpaca_eval's weights CSV."""

DATA_DIR = Path(__file__).resolve().parent / "data"
SHIPPED_DIFFICULTY = DATA_DIR / "alpaca_lc_instruction_difficulty.csv"
"""Our offline estimate of the hub's ``instruction_difficulty.csv`` (same format)."""
SHIPPED_GAMED = DATA_DIR / "alpaca_lc_gamed.csv"
"""Our offline rebuild of the hub's ``df_gamed.csv`` (same columns)."""

GAMED_COLUMNS = ("index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline")


@dataclass(frozen=True)
class GamedRows:
    """The gamed-baseline rows of the regularisation (``df_gamed.csv``), as arrays of equal length."""

    index: np.ndarray  # int: instruction index
    preference: np.ndarray  # float in [0, 1], NaN = no judgement
    std_delta_len: np.ndarray
    instruction_difficulty: np.ndarray
    not_gamed_baseline: np.ndarray  # bool


@dataclass(frozen=True)
class LCInputs:
    """What the LC GLM needs besides the annotations: difficulty per instruction index and the gamed rows."""

    difficulty: np.ndarray  # difficulty[k] for instruction index k = 0..N-1
    gamed: GamedRows | None  # None: no gamed-baseline regularisation
    source: str  # where they came from, for the report and error messages
    regularize_to_baseline_lambda: float | None = REGULARIZE_TO_BASELINE_LAMBDA


# ----------------------------------------------------------------------------- file loading


def _read_csv(path: Path, what: str) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, gzip.BadGzipFile) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable {what} CSV file: {detail}") from None
    rows = [r for r in rows if r]
    if len(rows) < 2:
        raise UserError(f"{path}: {what} CSV has no data rows")
    return [h.strip() for h in rows[0]], rows[1:]


def _float(value: str, path: Path, line: int, column: str, *, allow_empty: bool = False) -> float:
    v = value.strip()
    if v == "" or v.lower() == "nan":
        if allow_empty:
            return math.nan
        raise UserError(f"{path}: line {line}: column '{column}' is empty")
    try:
        x = float(v)
    except ValueError:
        raise UserError(f"{path}: line {line}: column '{column}' = {value!r} is not a number") from None
    if not math.isfinite(x):
        raise UserError(f"{path}: line {line}: column '{column}' = {value!r} is not finite")
    return x


def _int(value: str, path: Path, line: int, column: str) -> int:
    x = _float(value, path, line, column)
    if x != int(x) or x < 0:
        raise UserError(
            f"{path}: line {line}: column '{column}' = {value!r} is not an instruction index (integer >= 0)"
        )
    return int(x)


def _check_complete(found: dict[int, float], path: Path, what: str) -> np.ndarray:
    n = max(found) + 1
    missing = [k for k in range(n) if k not in found]
    if missing:
        raise UserError(
            f"{path}: {what} has no value for instruction index {missing[0]} (indices must cover 0..{n - 1})"
        )
    return np.array([found[k] for k in range(n)], dtype=float)


def load_instruction_difficulty(path: str | Path) -> np.ndarray:
    """Read ``instruction_difficulty.csv`` (hub format: a header, then ``index,difficulty`` rows covering 0..N-1)."""
    path = Path(path)
    header, rows = _read_csv(path, "instruction difficulty")
    if len(header) != 2:
        raise UserError(
            f"{path}: expected 2 columns (index, instruction_difficulty), found {len(header)}: {','.join(header)}"
        )
    found: dict[int, float] = {}
    for line, row in enumerate(rows, start=2):
        if len(row) != 2:
            raise UserError(f"{path}: line {line}: expected 2 values, found {len(row)}")
        k = _int(row[0], path, line, header[0] or "index")
        if k in found:
            raise UserError(f"{path}: line {line}: instruction index {k} appears twice")
        found[k] = _float(row[1], path, line, header[1])
    return _check_complete(found, path, "instruction difficulty")


def _bool(value: str, path: Path, line: int) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "1.0"):
        return True
    if v in ("false", "0", "0.0"):
        return False
    raise UserError(f"{path}: line {line}: column 'not_gamed_baseline' = {value!r} is not True/False")


def load_gamed(path: str | Path) -> tuple[GamedRows, np.ndarray]:
    """Read ``df_gamed.csv``: the gamed-baseline rows and the difficulty vector alpaca_eval takes from them.

    Columns (others, such as ``model``, are ignored): ``index`` (instruction), ``preference`` (in [0, 1]; empty = no
    judgement), ``std_delta_len``, ``instruction_difficulty``, ``not_gamed_baseline`` (True/False). The difficulty of
    instruction k is that of the first row with ``index == k`` (alpaca_eval: ``drop_duplicates("index")``).
    """
    path = Path(path)
    header, rows = _read_csv(path, "gamed-baseline (df_gamed)")
    col = {name: i for i, name in enumerate(header)}
    missing = [c for c in GAMED_COLUMNS if c not in col]
    if missing:
        raise UserError(
            f"{path}: gamed-baseline CSV lacks column(s) {', '.join(missing)} (needs {', '.join(GAMED_COLUMNS)})"
        )
    out: dict[str, list] = {c: [] for c in GAMED_COLUMNS}
    first: dict[int, float] = {}
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise UserError(f"{path}: line {line}: expected {len(header)} values, found {len(row)}")
        k = _int(row[col["index"]], path, line, "index")
        pref = _float(row[col["preference"]], path, line, "preference", allow_empty=True)
        if not math.isnan(pref) and not 0 <= pref <= 1:
            raise UserError(
                f"{path}: line {line}: preference {pref} is outside [0, 1] (df_gamed stores preference - 1)"
            )
        diff = _float(row[col["instruction_difficulty"]], path, line, "instruction_difficulty")
        out["index"].append(k)
        out["preference"].append(pref)
        out["std_delta_len"].append(_float(row[col["std_delta_len"]], path, line, "std_delta_len"))
        out["instruction_difficulty"].append(diff)
        out["not_gamed_baseline"].append(_bool(row[col["not_gamed_baseline"]], path, line))
        first.setdefault(k, diff)
    gamed = GamedRows(
        index=np.array(out["index"], dtype=int),
        preference=np.array(out["preference"], dtype=float),
        std_delta_len=np.array(out["std_delta_len"], dtype=float),
        instruction_difficulty=np.array(out["instruction_difficulty"], dtype=float),
        not_gamed_baseline=np.array(out["not_gamed_baseline"], dtype=bool),
    )
    return gamed, _check_complete(first, path, "gamed-baseline CSV")


def load_lc_inputs(
    instruction_difficulty: str | Path | None = None, gamed: str | Path | None = None, *, warn=None
) -> LCInputs:
    """The LC inputs: the hub files where given, our shipped estimates for what is not.

    - ``gamed`` given: its rows, and (as alpaca_eval) the difficulty it carries; an ``instruction_difficulty`` file
      given too is checked against it (``warn`` -- default: print to stderr -- reports a disagreement) and otherwise
      unused, since alpaca_eval's LC reads the difficulty from ``df_gamed.csv``.
    - only ``instruction_difficulty`` given: that difficulty for the model's rows, and the shipped gamed rows with
      their difficulty column replaced by it.
    - neither: both shipped estimates.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    supplied = load_instruction_difficulty(instruction_difficulty) if instruction_difficulty is not None else None
    if gamed is not None:
        rows, difficulty = load_gamed(gamed)
        if supplied is not None:
            n = min(len(supplied), len(difficulty))
            gap = float(np.max(np.abs(supplied[:n] - difficulty[:n]))) if n else 0.0
            if len(supplied) != len(difficulty) or gap > 1e-6:
                warn(
                    f"{instruction_difficulty} differs from the difficulty in {gamed} (max |diff| {gap:.3g}, "
                    f"{len(supplied)} vs {len(difficulty)} instructions); using {gamed}'s, as alpaca_eval does"
                )
        src = f"gamed rows and difficulty from {gamed}"
        return LCInputs(difficulty=difficulty, gamed=rows, source=src)
    shipped_rows, shipped_difficulty = load_gamed(SHIPPED_GAMED)
    if supplied is not None:
        if shipped_rows.index.max() >= len(supplied):
            raise UserError(
                f"{instruction_difficulty}: covers {len(supplied)} instructions, the shipped gamed rows need "
                f"{shipped_rows.index.max() + 1}"
            )
        rows = replace(shipped_rows, instruction_difficulty=supplied[shipped_rows.index])
        return LCInputs(
            difficulty=supplied,
            gamed=rows,
            source=f"difficulty from {instruction_difficulty}; shipped estimate of the gamed rows",
        )
    return LCInputs(
        difficulty=shipped_difficulty, gamed=shipped_rows, source="shipped offline estimate (evals/alpaca_lc)"
    )


# ----------------------------------------------------------------------------- the fit


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def _liblinear_l1(C: float):
    require("sklearn", "the length-controlled win rate")
    from sklearn.linear_model import LogisticRegression

    kwargs = dict(C=C, solver="liblinear", fit_intercept=False, random_state=RANDOM_STATE, dual=False)
    # scikit-learn 1.8 deprecated ``penalty`` for ``l1_ratio``; older versions need ``penalty="l1"``
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        kwargs["l1_ratio"] = 1.0
    else:
        kwargs["penalty"] = "l1"
    return LogisticRegression(**kwargs)


def _soft_cross_entropy(y: np.ndarray, q: np.ndarray, weight: np.ndarray) -> float:
    q = np.clip(q, 1e-15, 1 - 1e-15)
    return float(-np.mean(weight * (y * np.log(q) + (1 - y) * np.log(1 - q))))


def fit_soft_logistic(
    X: np.ndarray,
    y: np.ndarray,
    sample_weight: np.ndarray | None = None,
    *,
    n_splits: int = N_SPLITS,
    Cs: Sequence[float] = CS,
) -> tuple[np.ndarray, float]:
    """L1 logistic regression on soft targets ``y`` in [0, 1], C by grouped k-fold CV; returns (coef, C).

    Each row becomes a label-1 copy weighted ``y * w`` and a label-0 copy weighted ``(1 - y) * w`` (w = sample weight,
    default 1); both copies of a row stay in one fold. The CV score of a C is the sum over folds of the held-out
    mean ``w * CE(y, q)``; the smallest-loss C (first on ties) is refitted on all rows. With ``n_splits=0``, C =
    ``Cs[0]`` without cross-validation.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GroupKFold

    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    n = len(y)
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    X2 = np.vstack([X, X])
    label = np.r_[np.ones(n), np.zeros(n)]
    weight2 = np.r_[y * w, (1 - y) * w]
    y2, w2 = np.r_[y, y], np.r_[w, w]
    groups = np.r_[np.arange(n), np.arange(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if n_splits and len(Cs) > 1:
            loss = np.zeros(len(Cs))
            for train, test in GroupKFold(n_splits=n_splits).split(X2, label, groups):
                for j, C in enumerate(Cs):
                    model = _liblinear_l1(C).fit(X2[train], label[train], sample_weight=weight2[train])
                    loss[j] += _soft_cross_entropy(y2[test], model.predict_proba(X2[test])[:, 1], w2[test])
            best_C = float(Cs[int(np.argmax(-loss))])
        else:
            best_C = float(Cs[0])
        model = _liblinear_l1(best_C).fit(X2, label, sample_weight=weight2)
    return model.coef_[0].copy(), best_C


# ----------------------------------------------------------------------------- the LC win rate


def _model_features(annotations: list[dict], label: str) -> tuple[np.ndarray, np.ndarray]:
    """(win probability or NaN, std_delta_len) per annotation row."""
    from align.evals.annotations import win_probability

    probs, delta = [], []
    for i, row in enumerate(annotations):
        if not isinstance(row, dict) or "preference" not in row:
            raise UserError(f"{label}: row {i}: no 'preference' field")
        p = win_probability(row["preference"], f"{label}: row {i}")
        probs.append(math.nan if p is None else p)
        for key in ("output_1", "output_2"):
            if not isinstance(row.get(key), str):
                raise UserError(
                    f"{label}: row {i}: '{key}' is not a string (the length-controlled win rate needs both outputs)"
                )
        delta.append(len(row["output_1"]) - len(row["output_2"]))
    delta_arr = np.array(delta, dtype=float)
    std = float(np.std(delta_arr, ddof=1)) if len(delta_arr) > 1 else 0.0
    # alpaca_eval divides by the std; with no spread (or one row) there is no length signal: the term is 0
    sdl = delta_arr / std if std > 0 else np.zeros_like(delta_arr)
    return np.array(probs, dtype=float), sdl


def _is_baseline(annotations: list[dict]) -> bool:
    g1 = {row.get("generator_1") for row in annotations}
    g2 = {row.get("generator_2") for row in annotations}
    return len(g1) == 1 and g1 == g2 and isinstance(next(iter(g1)), str)


def length_controlled_winrate(
    annotations: list[dict],
    inputs: LCInputs,
    *,
    label: str = "annotations",
    instruction_index: Sequence[int] | None = None,
) -> dict:
    """``{"length_controlled_winrate", "lc_standard_error", "weights", "C"}`` for one model's annotations.

    ``instruction_index`` (default: the row positions, as alpaca_eval) maps each annotation row to its instruction.
    ``weights`` are the fitted GLM weights keyed as in alpaca_eval's weights CSV; ``C`` the chosen regularisation.
    """
    n = len(annotations)
    if n == 0:
        raise UserError(f"{label}: no annotations")
    if _is_baseline(annotations):  # the reference against itself: 50 by construction
        return {
            "length_controlled_winrate": 50.0,
            "lc_standard_error": 0.0 if n > 1 else None,
            "weights": dict.fromkeys(WEIGHT_NAMES, 0.0),
            "C": None,
        }
    probs, sdl = _model_features(annotations, label)
    idx = np.arange(n) if instruction_index is None else np.asarray(instruction_index, dtype=int)
    if len(idx) != n:
        raise UserError(f"{label}: {len(idx)} instruction indices for {n} annotations")
    if idx.max() >= len(inputs.difficulty):
        raise UserError(
            f"{label}: {n} annotation rows but the instruction difficulty ({inputs.source}) covers only "
            f"{len(inputs.difficulty)} instructions; is this an AlpacaEval 2 annotations file?"
        )
    if np.isnan(probs).all():
        raise UserError(f"{label}: no row has a preference (all are null)")
    return lc_from_features(probs, sdl, inputs.difficulty[idx], inputs)


def lc_from_features(probs: np.ndarray, std_delta_len: np.ndarray, difficulty: np.ndarray, inputs: LCInputs) -> dict:
    """The GLM on prepared per-row features: win probability (NaN = none), standardized length difference, difficulty.

    ``inputs`` supplies the gamed rows and lambda (its ``difficulty`` vector is not used here). Same result keys as
    ``length_controlled_winrate``.
    """
    probs = np.asarray(probs, dtype=float)
    sdl = np.asarray(std_delta_len, dtype=float)
    d = np.asarray(difficulty, dtype=float)
    n = len(probs)
    has = ~np.isnan(probs)

    X = np.column_stack([np.tanh(sdl[has]), d[has], np.ones(int(has.sum()))])
    y = probs[has]
    weight = None
    lam = inputs.regularize_to_baseline_lambda
    if lam and inputs.gamed is not None:
        g = inputs.gamed
        keep = ~np.isnan(g.preference)
        not_gamed = g.not_gamed_baseline[keep].astype(float)
        Xg = np.column_stack([np.tanh(g.std_delta_len[keep]), g.instruction_difficulty[keep], not_gamed])
        # gamed rows first, then the model's (alpaca_eval concatenates them in this order; it decides the CV folds)
        X = np.vstack([Xg, X])
        y = np.r_[g.preference[keep], y]
        weight = np.r_[not_gamed + lam * (1 - not_gamed) / 2, np.ones(int(has.sum()))]
    coef, C = fit_soft_logistic(X, y, weight)

    pred = _sigmoid(coef[1] * d + coef[2])  # every row, the length term at 0
    se = float(np.std(pred, ddof=1) / math.sqrt(n)) * 100 if n > 1 else None
    return {
        "length_controlled_winrate": float(pred.mean()) * 100,
        "lc_standard_error": se,
        "weights": dict(zip(WEIGHT_NAMES, map(float, coef))),
        "C": C,
    }
