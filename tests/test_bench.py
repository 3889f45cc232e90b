"""`align bench NAME --json` prints exactly one JSON object on stdout with the keys its issue names."""

import json

import pytest

from align.paths import shared_data_dir
from tests.conftest import run_align


def test_bench_dpo_json_contract():
    res = run_align("bench", "dpo", "--json", "hidden=64", "layers=2", "intermediate=128", "heads=2", "rows=32", "steps=2", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)  # exactly one JSON document, nothing else on stdout
    assert {"speedup_vs_trl", "lora_memory_ratio", "ours_tokens_per_second", "trl_tokens_per_second"} <= set(out)
    assert out["speedup_vs_trl"] > 0 and out["lora_memory_ratio"] > 0


def test_bench_unknown_option_is_a_user_error():
    res = run_align("bench", "dpo", "--json", "nonsense=1")
    assert res.returncode == 2 and "unknown option 'nonsense'" in res.stderr and res.stdout == ""
    res = run_align("bench", "rollout", "--json", "batch=many")
    assert res.returncode == 2 and "needs an integer" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_bench_online_json_contract():
    res = run_align("bench", "online", "--json", "prompts=60", "iterations=2", "test=30", "story_prompts=16",
                    "story_iterations=2", "story_test=8", timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    for method in ("sft", "dpo", "iterative_dpo", "inpo", "spo"):
        assert {"accuracy", "win_rate_vs_sft", "kl_to_ref", "judge_calls", "wall_seconds"} <= set(out["verifiable"][method])
        if shared_data_dir() is not None:
            assert {"gold_score", "win_rate_vs_sft", "kl_to_ref", "base_logp_per_token", "judge_calls", "wall_seconds"} <= set(out["babyllama"][method])
            assert 0 <= out["babyllama"][method]["gold_score"] <= 1
    if shared_data_dir() is None:
        assert "skipped" in out["babyllama"]


@pytest.mark.skipif(shared_data_dir() is None, reason="shared data folder ../shared/data not found (the HH sets need it; set ALIGN_SHARED_DATA)")
def test_bench_reward_json_contract():
    res = run_align("bench", "reward", "--json", "quick=1", "online_iterations=1", "online_prompts=8", "test_prompts=4", timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    for name in ("pets", "hh_multiuser"):
        for kind in ("bt", "vpl"):
            assert {"accuracy", "controversial_accuracy"} <= set(out[name][kind]), (name, kind)
            assert 0.0 <= out[name][kind]["accuracy"] <= 1.0
    assert 0.0 <= out["hh_harmless_bt_accuracy"] <= 1.0
    for row in ("sft", "dog_user", "cat_user"):
        assert {"dog", "cat", "samples"} <= set(out["personalised"][row])


def test_bench_agent_json_contract():
    res = run_align("bench", "agent", "--json", "quick=1", "demo_seeds=1", "iterations=1", "tasks=4", "k=2", timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    for method in ("sft", "loop", "grpo"):
        assert {"tgc", "sgc"} <= set(out["test"][method]), method
        assert 0.0 <= out["test"][method]["tgc"] <= 100.0
    assert len(out["curves"]["loop"]) == 1
