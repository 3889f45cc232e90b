"""accelerate launch with 2 CPU processes: DeepSpeed ZeRO-3 trains the tiny recipe and matches plain DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from safetensors.torch import load_file

from align.paths import REPO_ROOT

pytestmark = pytest.mark.distributed


def _launch(config: str, out, *overrides: str) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=os.path.dirname(os.sys.executable)) or "accelerate"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        accelerate,
        "launch",
        "--config_file",
        str(REPO_ROOT / "recipes" / "accelerate" / config),
        "-m",
        "align",
        "train",
        str(REPO_ROOT / "recipes" / "dpo" / "tiny.yaml"),
        "--output-dir",
        str(out),
        "logging.progress=false",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_zero3_cpu_two_processes_matches_ddp(tmp_path):
    z3 = _launch("cpu_zero3.yaml", tmp_path / "z3")
    assert z3.returncode == 0, z3.stderr[-3000:]
    summary = json.loads((tmp_path / "z3" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 8  # 128 rows / (4 x 2 ranks) / accumulation 2
    ddp = _launch("cpu.yaml", tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = load_file(str(tmp_path / "z3" / "model.safetensors")), load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    rows = [json.loads(x) for x in (tmp_path / "z3" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
