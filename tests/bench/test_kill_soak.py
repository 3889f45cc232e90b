"""align/bench/kill_soak.py for a trainer other than the offline one, two rounds on a shortened recipe: the soak's
plumbing (start, SIGKILL, --resume, phase read-out, bitwise comparison), not a soak (docs/reliability.md has those)."""

import json
import subprocess
import sys

import pytest

from align.paths import REPO_ROOT


@pytest.mark.slow  # CI time: the reward trainer's SIGKILL/resume is tested in tests/trainers/test_reward.py
def test_kill_soak_reward_two_rounds():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "align.bench.kill_soak",
            "--trainer",
            "reward",
            "--rounds",
            "2",
            "--seed",
            "0",
            "--quiet",
            "--set",
            "train.max_steps=40",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    out = json.loads(res.stdout)  # one JSON object, nothing else on stdout
    assert res.returncode == 0, (out, res.stderr[-2000:])
    assert out["trainer"] == "reward" and out["steps"] == 40 and out["rounds"] == 2
    assert out["identical_weights"] and out["identical_metrics"] and not any(out["left_behind"].values())
    assert sum(out["landed"].values()) == out["kills"]
