"""The benchmarks' bootstrap intervals (align/bench/stats.py), on cases whose answer is worked out by hand."""

import numpy as np
import pytest

from align.bench.stats import bootstrap, half_width


def test_constant_scores_have_a_zero_width_interval():
    out = bootstrap({"a": np.full((3, 50), 0.4)}, scale=100)
    assert out["a"] == {"mean": 40.0, "ci95": [40.0, 40.0]}


def test_paired_draws_cancel_in_a_difference():
    # the same per-item outcomes for both methods: every draw resamples the same items and seeds for both, so the
    # difference is exactly 0 in every draw (an unpaired bootstrap would give an interval about +-14 points wide)
    x = (np.random.default_rng(1).random((3, 100)) < 0.5).astype(float)
    out = bootstrap({"a": x, "b": x.copy()}, {"a_minus_b": ("a", "b")}, scale=100)
    assert out["a_minus_b"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert half_width(out["a"]) > 5


def test_one_seed_of_coin_flips_matches_the_normal_interval():
    # 400 items, 200 successes: the normal interval is 50 +- 1.96 * sqrt(.25 / 400) = 50 +- 4.9 points
    x = np.zeros(400)
    x[::2] = 1
    out = bootstrap({"a": x}, scale=100, draws=8000)
    assert out["a"]["mean"] == 50.0
    assert 4.4 <= half_width(out["a"]) <= 5.4
    assert out["a"]["ci95"][0] < 50 < out["a"]["ci95"][1]


def test_seed_resampling_spans_the_seed_means():
    # three seeds whose every item scores 0, 0.5 and 1: item resampling changes nothing; a seed draw is all seed 0
    # (or all seed 2) with probability 1/27 = 3.7% > 2.5%, so the interval is [0, 100] exactly
    x = np.array([[0.0] * 20, [0.5] * 20, [1.0] * 20])
    out = bootstrap({"a": x}, scale=100)
    assert out["a"] == {"mean": 50.0, "ci95": [0.0, 100.0]}


def test_a_difference_with_a_one_seed_baseline():
    # baseline: one seed; method: three seeds, each 30 points above it on every item -> the difference is 30 exactly
    base = (np.arange(60) % 3 == 0).astype(float)
    out = bootstrap({"m": np.stack([base + 0.3] * 3), "base": base}, {"m_minus_base": ("m", "base")}, scale=100)
    assert out["m_minus_base"] == {"mean": 30.0, "ci95": [30.0, 30.0]}


def test_items_must_match_and_results_repeat():
    with pytest.raises(ValueError, match="same items"):
        bootstrap({"a": np.zeros(5), "b": np.zeros(6)})
    x = np.random.default_rng(0).random((2, 30))
    assert bootstrap({"a": x}, seed=3) == bootstrap({"a": x}, seed=3)


def test_bench_online_aggregates_seeds_with_intervals():
    from align.bench.online import aggregate

    def seed_rows(dpo_acc, spo_acc, clip):
        return {
            "sft": {"accuracy": 0.1, "win_rate_vs_sft": 0.5, "kl_to_ref": 0.0, "judge_calls": 0, "wall_seconds": 10},
            "dpo": {"accuracy": dpo_acc, "win_rate_vs_sft": 0.6, "kl_to_ref": 1.0, "judge_calls": 9, "wall_seconds": 5},
            "spo": {"accuracy": spo_acc, "win_rate_vs_sft": 0.8, "kl_to_ref": 2.0, "judge_calls": 11, "wall_seconds": 7,
                    "clip_fraction": clip, "ratio_first_step_max_dev": 0.02 if clip else 0.01},
        }  # fmt: skip

    # 4 prompts; per-prompt wins vs SFT: dpo wins 2 and ties 1 of 4 on both seeds, spo wins 3 of 4 and ties 1
    items = {
        "sft": {"win_rate_vs_sft": [0.5] * 4, "accuracy": [0, 0, 1, 0]},
        "dpo": {"win_rate_vs_sft": [1, 1, 0.5, 0], "accuracy": [1, 1, 1, 0]},
        "spo": {"win_rate_vs_sft": [1, 1, 1, 0.5], "accuracy": [1, 1, 1, 0]},
    }
    rows, diffs = aggregate([seed_rows(0.5, 0.7, 0.2), seed_rows(0.7, 0.9, None)], [items, items])
    assert rows["dpo"]["accuracy"] == 0.6 and rows["spo"]["accuracy"] == 0.8 and rows["spo"]["judge_calls"] == 11
    assert rows["spo"]["clip_fraction"] == 0.2 and rows["spo"]["ratio_first_step_max_dev"] == 0.02  # Nones skipped
    assert "clip_fraction" not in rows["dpo"]
    assert rows["dpo"]["win_rate_vs_sft_by_seed"] == [0.625, 0.625] and rows["spo"]["accuracy_by_seed"] == [0.75, 0.75]
    assert rows["sft"]["win_rate_vs_sft_ci95"] == [0.5, 0.5]
    # spo - dpo per prompt: 0, 0, +0.5, +0.5 -> mean 0.25; the seeds agree, so only the prompts vary: resampling 4
    # prompts of which half are +0.5 gives 0 (all zeros, p = 1/16) to 0.5 (p = 1/16) -> the interval is [0, 0.5]
    assert diffs == {"spo_minus_dpo": {"mean": 0.25, "ci95": [0.0, 0.5]}}


def test_bench_options_take_integer_lists():
    from align.bench import parse_options
    from align.errors import UserError

    assert parse_options("x", {"lrs": [], "n": 1}, ["lrs=50,100,300", "n=2"]) == {"lrs": [50, 100, 300], "n": 2}
    with pytest.raises(UserError, match="'lrs' needs comma-separated integers"):
        parse_options("x", {"lrs": []}, ["lrs=5,x"])
