"""Shared fixtures: tiny models built locally, the shared data folder (skipped when absent), a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.paths import REPO_ROOT, shared_data_dir
from align.runs import read_metrics

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data not found (set ALIGN_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from align.models import char_tokenizer

    return char_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    from align.models import build_tiny_model

    return build_tiny_model(
        "llama", hidden_size=64, layers=2, heads=2, intermediate_size=128, seed=0, tokenizer=tiny_tokenizer
    )


@pytest.fixture(scope="session")
def rm_judge(tmp_path_factory) -> list[str]:
    """Recipe overrides that judge with a random tiny sequence-classification reward model: a deterministic, varied
    preference, so every sample group has a best and a worst response and every online objective trains even from
    a random policy (the checker judge would tie them all)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from align.models import char_tokenizer

    tok, path = char_tokenizer(), tmp_path_factory.mktemp("judge") / "rm"
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return ["judge.kind=reward_model", f"judge.path={path}"]


def run_align(
    *args: str, env: dict | None = None, timeout: float = 300, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess:
    """``python -m align ARGS`` in a subprocess; returns the completed process (text output)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "align", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd
    )


def kill_train_when(marker: Path, recipe, output: Path, *overrides: str, timeout: float = 180) -> None:
    """Start ``align train RECIPE -o OUTPUT OVERRIDES``, SIGKILL it as soon as ``marker`` exists, and check the kill
    came before the run finished (no summary.json)."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "align", "train", str(recipe), "-o", str(output), *overrides],
        cwd=REPO_ROOT,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, f"run ended (or timed out) before {marker} appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (output / "summary.json").exists(), "the kill came too late to test anything"


def crashed_copy(full: Path, part: Path, step: int) -> None:
    """Into ``part``: the finished run ``full`` as a crash right after writing its checkpoint-``step`` leaves it (that
    checkpoint, the metrics log, the rollouts of the iterations up to ``step``; no later checkpoint, no final model).
    ``full`` must have kept that checkpoint (train.keep_checkpoints)."""
    import shutil

    shutil.copytree(full / f"checkpoint-{step}", part / f"checkpoint-{step}")
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")
    for i in range(1, step + 1):
        if (full / "rollouts" / f"iter-{i}.json").exists():
            (part / "rollouts").mkdir(exist_ok=True)
            shutil.copy(full / "rollouts" / f"iter-{i}.json", part / "rollouts" / f"iter-{i}.json")


def metrics_rows(out: Path) -> list[dict]:
    """metrics.jsonl of a run without its timing column."""
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in read_metrics(out / "metrics.jsonl")]


def error_lines(stderr: str) -> list[str]:
    """stderr without the DeepSpeed import banner."""
    return [line for line in stderr.splitlines() if line.strip() and "real_accelerator" not in line]


SPECIALS = [0, 1, 3]  # <pad>, <s>, <unk> of the character tokenizer: a random model would sample them mid-text


class Echo:
    """Replies with a fixed observation for two turns, then ends."""

    def __init__(self, task: str):
        self.task, self.seen = task, []

    def reset(self):
        return self.task

    def step(self, text):
        self.seen.append(text)
        return (f"obs{len(self.seen)}", False) if len(self.seen) < 3 else (None, True)


def pg_batch(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, advantages: list[float]):
    """A policy-gradient PairBatch (one sampled response per row) from per-token log-probs under pi and pi_old, the
    mask of the tokens that are scored, and each row's advantage."""
    from align.losses import PairBatch

    return PairBatch(
        chosen_logps=(new * mask).sum(-1),
        chosen_lengths=mask.sum(-1).float(),
        token_logps=new * mask,
        old_token_logps=old * mask,
        token_mask=mask,
        advantages=torch.tensor(advantages),
    )
