"""`align bench NAME --json` prints exactly one JSON object on stdout with the keys its issue names."""

import json
import re

import pytest

from align.paths import shared_data_dir
from tests.conftest import run_align


def test_bench_dpo_json_contract():
    res = run_align(
        "bench",
        "dpo",
        "--json",
        "hidden=64",
        "layers=2",
        "intermediate=128",
        "heads=2",
        "rows=32",
        "steps=2",
        "hh=0",
        "large_vocab=0",
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)  # exactly one JSON document, nothing else on stdout
    assert {"speedup_vs_trl", "lora_memory_ratio", "ours_tokens_per_second", "trl_tokens_per_second"} <= set(out)
    assert out["speedup_vs_trl"] > 0 and out["lora_memory_ratio"] > 0
    assert out["hh"] == {"skipped": "hh=0"} and out["large_vocab"] == {"skipped": "large_vocab=0"}


@pytest.mark.slow
def test_bench_dpo_hh_and_large_vocab_contract(shared_data):
    res = run_align(
        "bench",
        "dpo",
        "--json",
        "hidden=64",
        "layers=2",
        "intermediate=128",
        "heads=2",
        "rows=32",
        "steps=2",
        "hh_rows=16",
        "hh_steps=2",
        "hh_batch=4",
        "hh_hidden=64",
        "hh_layers=1",
        "lv_batch=1",
        "lv_steps=1",
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert {
        "ours_tokens_per_s",
        "trl_tokens_per_s",
        "speedup_vs_trl",
        "padding_fraction_trl",
        "ours_peak_mb",
        "trl_peak_mb",
        "ours_fraction_of_peak",
    } <= set(out["hh"]) and out["hh"]["rows"] == 16
    assert {"ours_peak_mb", "trl_peak_mb", "memory_ratio", "speedup_vs_trl"} <= set(out["large_vocab"])


def test_bench_unknown_option_is_a_user_error():
    res = run_align("bench", "dpo", "--json", "nonsense=1")
    assert res.returncode == 2 and "unknown option 'nonsense'" in res.stderr and res.stdout == ""
    res = run_align("bench", "rollout", "--json", "batch=many")
    assert res.returncode == 2 and "needs an integer" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_bench_online_json_contract():
    res = run_align(
        "bench",
        "online",
        "--json",
        "prompts=80",
        "iterations=2",
        "test=30",
        "sft_size=300",
        "sft_epochs=1",
        "hidden=64",
        "story_prompts=16",
        "story_iterations=2",
        "story_test=8",
        "seeds=1",
        "spo_lrs_e6=100",
        "spo_pg_epochs=1",
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    v = out["verifiable"]
    assert out["seeds"] == [0] and v["spo_lr100e-6"]["ratio_first_step_max_dev"] < 1e-4
    # every SPO row samples in recipes/spo/tiny.yaml's generations of 32 prompts (rounds of 40: 32 + 8) and takes
    # pg_epochs (2) passes over each (the updates are counted in tests/trainers/test_online_rewards.py)
    assert v["spo"]["generations"] == v["spo_lr100e-6"]["generations"] == v["spo_epochs1"]["generations"] == 4
    assert all(v[m]["grad_clipped"] is None or 0 <= v[m]["grad_clipped"] <= 1 for m in ("spo", "grpo", "rloo"))
    for row in out["verifiable"].values():
        lo, hi = row["win_rate_vs_sft_ci95"]
        assert lo <= row["win_rate_vs_sft"] <= hi and row["win_rate_vs_sft_by_seed"] == [row["win_rate_vs_sft"]]
    diff = out["differences"]["verifiable"]["inpo_minus_dpo"]
    want = out["verifiable"]["inpo"]["win_rate_vs_sft"] - out["verifiable"]["dpo"]["win_rate_vs_sft"]
    assert abs(diff["mean"] - want) < 0.01 and diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    for method in ("sft", "dpo", "iterative_dpo", "inpo", "spo", "dpo_nll", "grpo", "rloo"):
        assert {"accuracy", "win_rate_vs_sft", "kl_to_ref", "judge_calls", "wall_seconds", "per_family"} <= set(
            out["verifiable"][method]
        )
    assert len(out["curves"]["verifiable"]["spo"]) == 2 and len(out["curves"]["verifiable"]["dpo"]) == 1
    for method in ("spo", "grpo", "rloo"):  # pi_old recomputed by the learner: the first step's ratio is 1
        assert (
            out["verifiable"][method]["clip_fraction"] is None or 0 <= out["verifiable"][method]["clip_fraction"] <= 1
        )
        assert out["verifiable"][method]["ratio_first_step_max_dev"] < 1e-4
    assert len(out["curves"]["verifiable"]["grpo"]) == 2 and len(out["curves"]["verifiable"]["rloo"]) == 2
    for method in ("sft", "dpo", "iterative_dpo", "inpo", "spo"):
        if shared_data_dir() is not None:
            assert {
                "gold_score",
                "win_rate_vs_sft",
                "kl_to_ref",
                "base_logp_per_token",
                "judge_calls",
                "wall_seconds",
            } <= set(out["babyllama"][method])
            assert 0 <= out["babyllama"][method]["gold_score"] <= 1
    if shared_data_dir() is None:
        assert "skipped" in out["babyllama"]
    else:
        assert len(out["curves"]["babyllama"]["inpo"]) == 2


@pytest.mark.skipif(
    shared_data_dir() is None,
    reason="shared data folder ../shared/data not found (the HH sets need it; set ALIGN_SHARED_DATA)",
)
def test_bench_reward_json_contract():
    res = run_align(
        "bench",
        "reward",
        "--json",
        "quick=1",
        "quick_pairs=96",
        "online_iterations=1",
        "online_prompts=8",
        "test_prompts=4",
        "rm_objectives=0",  # its judge labels every HH pair once (~5 min): covered by tests/test_userdata.py
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["hh_rm_objectives"] == {"skipped": "rm_objectives=0"}
    for name in ("pets", "hh_multiuser", "hh_objectives"):
        for kind in ("bt", "vpl"):
            assert {"accuracy", "controversial_accuracy"} <= set(out[name][kind]), (name, kind)
            assert 0.0 <= out[name][kind]["accuracy"] <= 1.0
        oracle = out[name]["oracle"]  # one BT model per user type, pooled over the types' held-out pairs
        assert set(oracle["per_type"]) == {k[len("accuracy/") :] for k in out[name]["bt"] if k.startswith("accuracy/")}
        # (quick=1 limits every run to its first rows, so the per-type evaluations hold more pairs than BT's here)
        assert oracle["pairs"] == sum(t["pairs"] for t in oracle["per_type"].values()) > 0
        gap = oracle["accuracy"] - out[name]["bt"]["accuracy"]
        vpl_gain = out[name]["vpl"]["accuracy"] - out[name]["bt"]["accuracy"]
        assert out[name]["vpl_recovered_fraction"] == pytest.approx(vpl_gain / gap, abs=1e-3)
    assert 0.0 <= out["hh_harmless_bt_accuracy"] <= 1.0
    for row in ("sft", "dog_user", "cat_user"):
        assert {"dog", "cat", "samples"} <= set(out["personalised"][row])


def test_bench_online_rejects_bad_options_before_training():
    res = run_align("bench", "online", "--json", "sloppy=150", "babyllama=0")
    assert res.returncode == 2 and "sloppy" in res.stderr and res.stdout == "" and "Traceback" not in res.stderr
    res = run_align("bench", "online", "--json", "--plot", "/nonexistent-folder/curves.png")
    assert res.returncode == 2 and "does not exist" in res.stderr and res.stdout == ""


def test_plot_curves_draws_panels(tmp_path):
    from align.bench import plot_curves
    from align.errors import UserError

    plot_curves({"verifiable": {"dpo": [0.3], "spo": [0.3, 0.5, 0.7]}, "babyllama": {}}, str(tmp_path / "a.png"))
    plot_curves({"loop": [0.1, 0.2], "grpo": [0.1, 0.15]}, str(tmp_path / "b.png"))
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="no curves"):
        plot_curves({"verifiable": {}, "babyllama": {}}, str(tmp_path / "c.png"))


def test_bench_agent_json_contract():
    res = run_align(
        "bench", "agent", "--json", "quick=1", "demo_seeds=1", "iterations=1", "tasks=4", "k=2", "seeds=2",
        "test_worlds=2", timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["train_seeds"] == [0, 1] and out["test_world_seeds"] == [0, 1]
    for method in ("sft", "loop", "grpo"):
        row = out["test"][method]
        assert {"tgc", "sgc", "ci95", "tgc_by_seed"} <= set(row), method
        assert 0.0 <= row["ci95"][0] <= row["tgc"] <= row["ci95"][1] <= 100.0, (method, row)
        assert len(row["tgc_by_seed"]) == (1 if method == "sft" else 2)
        assert abs(row["tgc"] - sum(row["tgc_by_seed"]) / len(row["tgc_by_seed"])) < 0.01
    for name, (a, b) in {"loop_minus_grpo": ("loop", "grpo"), "loop_minus_sft": ("loop", "sft")}.items():
        diff = out[name]
        assert set(diff) == {"mean", "ci95"} and diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
        assert abs(diff["mean"] - (out["test"][a]["tgc"] - out["test"][b]["tgc"])) < 0.02
    assert set(out["goals"]) == {
        "loop_minus_sft_at_least_20", "loop_minus_sft_ci_low_above_10", "loop_minus_grpo_half_width_at_most_5"
    }  # fmt: skip
    assert "at 95%" in out["loop_vs_grpo"]
    assert {len(c["loop"]) for c in out["curves"].values()} == {1} and set(out["curves"]) == {"seed 0", "seed 1"}
    bad = run_align("bench", "agent", "--json", "seeds=0")
    assert bad.returncode == 2 and "'seeds' must be at least 1" in bad.stderr


def test_agent_demonstrations_are_train_only_and_sloppy_fails_only_nothing_else_changed():
    from align.agents.world import World, check_details, tasks_for
    from align.bench.agent import demonstrations, sloppy

    train = tasks_for("train", seed=1)
    held_out = {t.instruction for s in ("dev", "test") for t in tasks_for(s, seed=1)}
    clean, messy = demonstrations(1, 0, 0), demonstrations(1, 100, 0)
    assert len(clean) == len(messy) == len(train)
    assert not {r["prompt"] for r in clean} & held_out
    assert not any('"done")' in r["chosen"] for r in clean)
    n_sloppy = 0
    for task in train:
        bad = sloppy(task.solution)
        if bad is None:  # nobody to message: events, notes, questions
            assert "contacts.delete" in task.solution or not re.search(
                r"messages\.send|payments\.pay|contacts\.(add|update)", task.solution
            )
            continue
        n_sloppy += 1
        w = World(task.db)
        w.run(bad)
        failed = [d for d, ok in check_details(task, w.db) if not ok]
        assert failed == ["nothing else changed"], (task.id, failed)
        assert bad in {r["chosen"] for r in messy}
    assert n_sloppy > len(train) / 2
    assert {r["chosen"] for r in clean} == {t.solution for t in train}
