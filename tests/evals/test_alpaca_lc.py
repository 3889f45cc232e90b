"""AlpacaEval 2 length-controlled win rate (``align/evals/alpaca_lc.py``) and its offline estimate.

- the GLM on small synthetic sets whose answer can be worked out by hand;
- the fit equals scikit-learn's ``LogisticRegressionCV`` set up as alpaca_eval's ``fit_LogisticRegressionCV`` does;
- the official path (``--instruction-difficulty`` / ``--gamed`` files) on small constructed hub files;
- the shipped offline estimate against the public leaderboard for a few shared models, and one leave-one-out run of
  ``evals/alpaca_lc/estimate.py`` (the full sweep is in that script; its numbers are in docs/benchmarks.md);
- bad files: exit 2 with one line, nothing written.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomllib

from align.errors import UserError
from align.evals.alpaca import leaderboard_row, load_annotations
from align.evals.alpaca_lc import (
    SHIPPED_DIFFICULTY,
    SHIPPED_GAMED,
    WEIGHT_NAMES,
    GamedRows,
    LCInputs,
    fit_soft_logistic,
    lc_from_features,
    length_controlled_winrate,
    load_gamed,
    load_instruction_difficulty,
    load_lc_inputs,
)
from align.paths import REPO_ROOT, shared_data_dir
from tests.conftest import error_lines, run_align

_DATA = shared_data_dir()
ALPACA = _DATA / "alpaca_eval" if _DATA is not None and (_DATA / "alpaca_eval").is_dir() else None
NO_DATA = "shared data folder ../shared/data/alpaca_eval not found (set ALIGN_SHARED_DATA)"

# measured (docs/benchmarks.md): held-out max |LC error| 1.34, lc_standard_error error <= 0.06; the shipped
# estimate is in-sample for the shared models (max |LC error| 0.72, lc_standard_error error <= 0.19)
LC_TOL = 1.5
SE_TOL = 0.25


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=float)))


def _no_gamed(difficulty) -> LCInputs:
    return LCInputs(difficulty=np.asarray(difficulty, dtype=float), gamed=None, source="test")


# ----------------------------------------------------------------------------- the GLM by hand


def test_constant_preference_gives_its_win_rate():
    # no length spread, no difficulty: only the bias is identifiable, sigmoid(b) = 0.8, the same for every row
    n = 40
    res = lc_from_features(np.full(n, 0.8), np.zeros(n), np.zeros(n), _no_gamed(np.zeros(n)))
    assert res["length_controlled_winrate"] == pytest.approx(80.0, abs=0.05)
    assert res["lc_standard_error"] == pytest.approx(0.0, abs=1e-9)
    assert res["weights"][WEIGHT_NAMES[2]] == pytest.approx(math.log(0.8 / 0.2), abs=0.01)


def test_length_term_is_removed_and_difficulty_kept():
    # preferences generated exactly by the GLM: w_len = -2, w_diff = 1, w_bias = 0.5. The model is longer on 3 of 4
    # instructions (std_delta_len < 0 -> it wins more), so its raw win rate is inflated; the LC win rate predicts
    # every row with the length term at 0: mean sigmoid(d_i + 0.5).
    n = 80
    rng = np.random.default_rng(0)
    sdl = np.where(np.arange(n) % 4 == 0, 1.0, -1.0) * rng.uniform(0.2, 2.0, n)
    d = rng.normal(0, 1, n)
    y = _sigmoid(-2 * np.tanh(sdl) + d + 0.5)
    res = lc_from_features(y, sdl, d, _no_gamed(d))
    w = res["weights"]
    assert (w[WEIGHT_NAMES[0]], w[WEIGHT_NAMES[1]], w[WEIGHT_NAMES[2]]) == pytest.approx((-2, 1, 0.5), abs=0.02)
    expected = _sigmoid(d + 0.5)
    assert res["length_controlled_winrate"] == pytest.approx(100 * expected.mean(), abs=0.3)
    assert res["lc_standard_error"] == pytest.approx(100 * expected.std(ddof=1) / math.sqrt(n), abs=0.05)
    assert y.mean() * 100 > res["length_controlled_winrate"] + 5  # the raw win rate is the length-inflated one


def test_rows_without_preference_are_predicted_but_not_fitted():
    n = 40
    y = np.full(n, 0.25)
    y_nan = np.r_[y, [np.nan] * 5]
    res = lc_from_features(y_nan, np.zeros(n + 5), np.zeros(n + 5), _no_gamed(np.zeros(n + 5)))
    assert res["length_controlled_winrate"] == pytest.approx(25.0, abs=0.05)


def test_fit_equals_logistic_regression_cv_as_alpaca_eval_sets_it_up():
    """alpaca_eval's fit_LogisticRegressionCV: duplicated rows, GroupKFold(5), weighted soft log-loss scorer."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    def soft_logloss(y_true, y_pred, true_prob, true_sample_weight):
        t = np.where(y_true == 1, true_prob, 1 - true_prob)
        q = np.clip(y_pred, 1e-15, 1 - 1e-15)
        return -np.mean(true_sample_weight * (t * np.log(q) + (1 - t) * np.log(1 - q)))

    rng = np.random.default_rng(1)
    n = 120
    X = np.c_[np.tanh(rng.normal(size=n)), rng.normal(size=n), (rng.random(n) < 0.7).astype(float)]
    y = np.clip(_sigmoid(X @ [-1.5, 0.8, 0.4]) + rng.normal(0, 0.1, n), 0, 1)
    sw = np.where(X[:, 2] == 1, 1.0, 0.1)
    X2, label = np.r_[X, X], np.r_[np.ones(n), np.zeros(n)]
    true_prob, true_sw, groups = np.r_[y, 1 - y], np.r_[sw, sw], np.r_[np.arange(n), np.arange(n)]
    kwargs = {"l1_ratios": (1.0,)} if "l1_ratios" in LogisticRegressionCV().get_params() else {"penalty": "l1"}
    with sklearn.config_context(enable_metadata_routing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer = make_scorer(soft_logloss, response_method="predict_proba", greater_is_better=False)
        scorer = scorer.set_score_request(true_sample_weight=True, true_prob=True)
        ref = LogisticRegressionCV(
            cv=GroupKFold(n_splits=5),
            scoring=scorer,
            solver="liblinear",
            fit_intercept=False,
            random_state=123,
            **kwargs,
        )
        ref.set_fit_request(sample_weight=True)
        ref.fit(
            X2, label, sample_weight=true_prob * true_sw, groups=groups, true_sample_weight=true_sw, true_prob=true_prob
        )
    coef, C = fit_soft_logistic(X, y, sw)
    assert C == pytest.approx(float(np.ravel(ref.C_)[0]))
    np.testing.assert_allclose(coef, ref.coef_[0], atol=1e-10)


# ----------------------------------------------------------------------------- the official path, constructed files


N_INSTR = 40


def _world(seed=2):
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 1, N_INSTR)
    ref_len = rng.integers(200, 1200, N_INSTR)
    model_len = (ref_len * rng.uniform(0.4, 2.5, N_INSTR)).astype(int)
    sdl = (ref_len - model_len) / np.std(ref_len - model_len, ddof=1)
    pref = _sigmoid(-1.5 * np.tanh(sdl) + 0.9 * d - 0.7)
    annotations = [
        {
            "instruction": f"q{i}",
            "output_1": "r" * int(ref_len[i]),
            "output_2": "m" * int(model_len[i]),
            "generator_1": "ref",
            "generator_2": "model",
            "preference": 1 + float(pref[i]),
        }
        for i in range(N_INSTR)
    ]
    gamed_rows = []
    for name, scale in (("ref_verbose", 2.0), ("ref_concise", 0.5)):
        g_len = (ref_len * scale * rng.uniform(0.8, 1.2, N_INSTR)).astype(int)
        g_sdl = (ref_len - g_len) / np.std(ref_len - g_len, ddof=1)
        g_pref = _sigmoid(-2.0 * np.tanh(g_sdl) + 0.9 * d)
        gamed_rows += [(name, i, g_pref[i], g_sdl[i], d[i], False) for i in range(N_INSTR)]
    return d, annotations, gamed_rows


def _write_hub_files(tmp_path: Path, d, gamed_rows, *, difficulty_shift=0.0):
    diff_path, gamed_path = tmp_path / "instruction_difficulty.csv", tmp_path / "df_gamed.csv"
    with open(diff_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "instruction_difficulty"])
        w.writerows([i, repr(float(v) + difficulty_shift)] for i, v in enumerate(d))
    with open(gamed_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline"])
        w.writerows([m, i, repr(float(p)), repr(float(s)), repr(float(dd)), ng] for m, i, p, s, dd, ng in gamed_rows)
    return diff_path, gamed_path


def _by_the_method(d, annotations, gamed_rows, lam=0.2):
    """The LC win rate assembled step by step from the method's description (not through lc_from_features)."""
    l1 = np.array([len(a["output_1"]) for a in annotations], dtype=float)
    l2 = np.array([len(a["output_2"]) for a in annotations], dtype=float)
    sdl = (l1 - l2) / np.std(l1 - l2, ddof=1)
    y = np.array([a["preference"] - 1 for a in annotations])
    X_model = np.c_[np.tanh(sdl), d, np.ones(len(y))]
    X_gamed = np.array([[math.tanh(s), dd, 0.0] for _, _, _, s, dd, _ in gamed_rows])
    y_gamed = np.array([p for _, _, p, _, _, _ in gamed_rows])
    coef, _ = fit_soft_logistic(
        np.r_[X_gamed, X_model], np.r_[y_gamed, y], np.r_[np.full(len(y_gamed), lam / 2), np.ones(len(y))]
    )
    pred = _sigmoid(coef[1] * d + coef[2])
    return 100 * pred.mean(), 100 * pred.std(ddof=1) / math.sqrt(len(pred)), coef


def test_official_path_with_supplied_hub_files(tmp_path):
    d, annotations, gamed_rows = _world()
    diff_path, gamed_path = _write_hub_files(tmp_path, d, gamed_rows)
    inputs = load_lc_inputs(diff_path, gamed_path)
    np.testing.assert_allclose(inputs.difficulty, d)
    assert len(inputs.gamed.index) == 2 * N_INSTR and not inputs.gamed.not_gamed_baseline.any()

    res = length_controlled_winrate(annotations, inputs)
    lc, se, coef = _by_the_method(d, annotations, gamed_rows)
    assert res["length_controlled_winrate"] == pytest.approx(lc, abs=1e-9)
    assert res["lc_standard_error"] == pytest.approx(se, abs=1e-9)
    np.testing.assert_allclose(list(res["weights"].values()), coef, atol=1e-12)
    # the gamed rows regularise: without them (lambda 0) the fit differs
    no_reg = length_controlled_winrate(annotations, LCInputs(d, inputs.gamed, "t", regularize_to_baseline_lambda=None))
    assert no_reg["weights"] != res["weights"]
    # the leaderboard row carries the two numbers
    row = leaderboard_row(annotations, "model", lc=inputs)
    assert (row["length_controlled_winrate"], row["lc_standard_error"]) == (
        res["length_controlled_winrate"],
        res["lc_standard_error"],
    )

    # through the command line: the same numbers in leaderboard.json
    src = tmp_path / "annotations.json"
    src.write_text(json.dumps(annotations))
    out = tmp_path / "lb"
    proc = run_align(
        "eval",
        "alpaca",
        "--annotations",
        str(src),
        "--output",
        str(out),
        "--instruction-difficulty",
        str(diff_path),
        "--gamed",
        str(gamed_path),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["model"]["length_controlled_winrate"] == pytest.approx(lc, abs=1e-9)
    assert board["model"]["lc_standard_error"] == pytest.approx(se, abs=1e-9)


def test_difficulty_comes_from_df_gamed_as_in_alpaca_eval(tmp_path):
    d, annotations, gamed_rows = _world()
    diff_path, gamed_path = _write_hub_files(tmp_path, d, gamed_rows, difficulty_shift=1.0)
    warned = []
    inputs = load_lc_inputs(diff_path, gamed_path, warn=warned.append)
    np.testing.assert_allclose(inputs.difficulty, d)  # df_gamed's column, not the shifted file
    assert len(warned) == 1 and "as alpaca_eval does" in warned[0]
    # the two files agreeing: no warning
    diff_path, gamed_path = _write_hub_files(tmp_path, d, gamed_rows)
    load_lc_inputs(diff_path, gamed_path, warn=warned.append)
    assert len(warned) == 1


def test_difficulty_file_alone_replaces_the_shipped_difficulty(tmp_path):
    d805 = np.linspace(-2, 2, 805)
    path = tmp_path / "instruction_difficulty.csv"
    path.write_text("index,instruction_difficulty\n" + "".join(f"{i},{float(v)!r}\n" for i, v in enumerate(d805)))
    only = load_lc_inputs(path, None)
    np.testing.assert_allclose(only.difficulty, d805)
    np.testing.assert_allclose(only.gamed.instruction_difficulty, d805[only.gamed.index])  # shipped gamed rows
    short = tmp_path / "short.csv"
    short.write_text("index,instruction_difficulty\n0,0.5\n")
    with pytest.raises(UserError, match="covers 1 instructions"):
        load_lc_inputs(short, None)


def test_rows_map_to_instructions_by_position():
    # alpaca_eval indexes the difficulty by the row's position: dropping instruction 0 shifts every later row
    d, annotations, gamed_rows = _world()
    rows = GamedRows(*(np.array(c) for c in list(zip(*gamed_rows))[1:]))
    inputs = LCInputs(difficulty=d, gamed=rows, source="t")
    shifted = length_controlled_winrate(annotations[1:], inputs)
    aligned = length_controlled_winrate(annotations[1:], inputs, instruction_index=range(1, N_INSTR))
    explicit = length_controlled_winrate(annotations[1:], inputs, instruction_index=range(N_INSTR - 1))
    assert shifted == explicit and shifted != aligned


def test_reference_against_itself_is_50():
    ann = [
        {"output_1": "a" * i, "output_2": "a" * i, "generator_1": "ref", "generator_2": "ref", "preference": 1.5}
        for i in range(1, 6)
    ]
    res = length_controlled_winrate(ann, _no_gamed(np.zeros(5)))
    assert res["length_controlled_winrate"] == 50.0 and res["lc_standard_error"] == 0.0


# ----------------------------------------------------------------------------- shipped estimate vs the leaderboard


def test_shipped_estimate_files_and_package_data():
    difficulty = load_instruction_difficulty(SHIPPED_DIFFICULTY)
    rows, from_gamed = load_gamed(SHIPPED_GAMED)
    assert len(difficulty) == 805 and len(rows.index) == 2 * 805
    np.testing.assert_allclose(from_gamed, difficulty)
    assert np.all((rows.preference > 0) & (rows.preference < 1)) and not rows.not_gamed_baseline.any()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "evals/data/*.csv" in pyproject["tool"]["setuptools"]["package-data"]["align"]


# a strong and a weak model with a public lc_standard_error, a mid-range one, and one with a missing instruction
@pytest.mark.parametrize("model", ["NullModel", "FuseChat-Llama-3.2-1B-Instruct", "claude-2", "text_davinci_001"])
def test_shipped_estimate_matches_public_lc(model, public_leaderboard):
    public = public_leaderboard[model]
    row = leaderboard_row(load_annotations(ALPACA / "annotations" / f"{model}.json.gz"), model, lc=load_lc_inputs())
    assert abs(row["length_controlled_winrate"] - float(public["length_controlled_winrate"])) <= LC_TOL, row
    if public["lc_standard_error"]:
        assert abs(row["lc_standard_error"] - float(public["lc_standard_error"])) <= SE_TOL, row


def _estimate_script():
    spec = importlib.util.spec_from_file_location(
        "alpaca_lc_estimate", REPO_ROOT / "evals" / "alpaca_lc" / "estimate.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_leave_one_out_for_two_models(public_leaderboard):
    est = _estimate_script()
    result = est.leave_one_out(
        ALPACA,
        gamed_bias="none",
        tau=est.PRIOR_TAU,
        only=["FuseChat-Gemma-2-9B-Instruct", "gpt4_0613_concise"],
        log=lambda s: None,
    )
    assert result["summary"]["n_models"] == 2
    for r in result["models"]:
        assert abs(r["lc_error"]) <= LC_TOL, r
        if r["lc_standard_error_public"] is not None:
            assert abs(r["lc_standard_error_error"]) <= SE_TOL, r


# ----------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    "content, match",
    [
        ("index,preference\n0,0.5\n", "lacks column"),
        (
            "model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline\nm,0,1.7,0.1,0.2,False\n",
            "outside",
        ),
        (
            "model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline\nm,1,0.5,0.1,0.2,False\n",
            "index 0",
        ),
        (
            "model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline\nm,0,0.5,abc,0.2,False\n",
            "line 2",
        ),
        (
            "model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline\nm,0,0.5,0.1,0.2,maybe\n",
            "True/False",
        ),
        ("", "no data rows"),
    ],
)
def test_bad_gamed_file(tmp_path, content, match):
    path = tmp_path / "df_gamed.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=match) as e:
        load_gamed(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize(
    "content, match",
    [
        ("index,instruction_difficulty\n0,0.1\n0,0.2\n", "twice"),
        ("index,instruction_difficulty\n0,x\n", "not a number"),
        ("index,a,b\n0,1,2\n", "2 columns"),
        ("index,instruction_difficulty\n0,inf\n", "not finite"),
    ],
)
def test_bad_difficulty_file(tmp_path, content, match):
    path = tmp_path / "instruction_difficulty.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        load_instruction_difficulty(path)


def test_too_many_rows_for_the_difficulty(tmp_path):
    d, annotations, _ = _world()
    with pytest.raises(UserError, match="covers only"):
        length_controlled_winrate(annotations + annotations, _no_gamed(d))


def test_cli_bad_hub_files_exit_2_one_line(tmp_path):
    src = tmp_path / "annotations.json"
    src.write_text(json.dumps(_world()[1]))
    bad = tmp_path / "df_gamed.csv"
    bad.write_text("model,index\nm,0\n")
    out = tmp_path / "lb"
    for option, path in (("--gamed", bad), ("--instruction-difficulty", tmp_path / "missing.csv")):
        proc = run_align(
            "eval", "alpaca", "--annotations", str(src), "--output", str(out), option, str(path), timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], proc.stderr
        assert not out.exists()
