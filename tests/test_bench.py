"""`align bench NAME --json` prints exactly one JSON object on stdout with the keys its issue names."""

import json

import pytest

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
    res = run_align("bench", "online", "--json", "prompts=60", "iterations=2", "test=30", timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    for method in ("sft", "dpo", "iterative_dpo", "inpo", "spo"):
        assert {"accuracy", "win_rate_vs_sft", "kl_to_ref", "judge_calls", "wall_seconds"} <= set(out["verifiable"][method])
