"""The offline trainer end to end on a tiny model: outputs, resume after SIGKILL, LoRA reference, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_recipe
from align.paths import REPO_ROOT
from align.trainers import run
from tests.conftest import crashed_copy, error_lines, kill_train_when, metrics_rows, run_align

TINY = REPO_ROOT / "recipes" / "dpo" / "tiny.yaml"


def test_tiny_recipe_writes_every_output(tmp_path):
    recipe = load_recipe(TINY, ["logging.progress=false"])
    summary = run(recipe, tmp_path / "run")
    out = tmp_path / "run"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 1
    saved = json.loads((out / "summary.json").read_text())
    assert {"trainer", "steps", "wall_seconds", "final"} <= set(saved) and saved["steps"] == 16
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]  # keep 2
    assert load_recipe(out / "recipe.yaml").loss.name == "dpo"  # the resolved recipe loads back
    assert rows[-1]["rewards/margin"] > 0


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_sigkill_after_first_checkpoint_then_resume_gives_identical_weights(tmp_path):
    overrides = ["train.epochs=6", "train.save_steps=4", "logging.progress=false"]
    full = tmp_path / "full"
    assert run_align("train", str(TINY), "-o", str(full), *overrides).returncode == 0

    part = tmp_path / "part"
    kill_train_when(part / "checkpoint-4" / "trainer_state.json", TINY, part, *overrides, timeout=120)

    resumed = run_align("train", str(TINY), "-o", str(part), "--resume", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rows_part = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    drop = ("tokens_per_second",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows_full] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows_part
    ]


def test_resume_from_a_checkpoint_between_two_logged_steps_logs_the_same_averages(tmp_path):
    # rows every 3 steps, checkpoints every 2: checkpoint-4 holds step 4, which the row at step 6 averages in
    # (found by align/bench/kill_soak.py on the reward trainer: the resumed run logged the mean of steps 5-6 only)
    recipe = load_recipe(
        TINY,
        [
            "train.logging_steps=3",
            "train.save_steps=2",
            "train.keep_checkpoints=10",
            "logging.progress=false",
            "logging.plots=false",
        ],
    )
    run(recipe, tmp_path / "full")
    crashed_copy(tmp_path / "full", tmp_path / "part", 4)
    run(recipe, tmp_path / "part", resume=True)
    assert metrics_rows(tmp_path / "part") == metrics_rows(tmp_path / "full")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_recipe(tmp_path):
    out = tmp_path / "run"
    assert run_align("train", str(TINY), "-o", str(out), "logging.progress=false").returncode == 0
    again = run_align("train", str(TINY), "-o", str(out), "logging.progress=false")
    assert again.returncode == 2 and "--resume" in error_lines(again.stderr)[-1]
    other = run_align("train", str(TINY), "-o", str(out), "--resume", "train.lr=0.5", "logging.progress=false")
    lines = error_lines(other.stderr)
    assert other.returncode == 2 and len(lines) == 1 and "different recipe" in lines[0]


def test_lora_uses_the_disabled_adapter_as_reference(tmp_path):
    recipe = load_recipe(
        TINY,
        [
            "lora.enabled=true",
            "lora.r=8",
            "lora.alpha=16",
            "train.lr=3.0e-3",
            "train.epochs=4",
            "train.save_steps=0",
            "logging.progress=false",
        ],
    )
    summary = run(recipe, tmp_path / "lora")
    assert summary["reference"] == "model"  # the LoRA base, no copy
    rows = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert sum(r["loss"] for r in rows[-4:]) / 4 < 0.68
    assert (tmp_path / "lora" / "adapter_config.json").is_file() and (
        tmp_path / "lora" / "adapter_model.safetensors"
    ).is_file()


def test_reference_free_simpo_and_sft(tmp_path):
    s = run(
        load_recipe(TINY, ["loss.name=simpo", "loss.beta=2.0", "train.save_steps=0", "logging.progress=false"]),
        tmp_path / "simpo",
    )
    assert s["reference"] == "none"
    sft = run(
        load_recipe(
            TINY, ["trainer=sft", "loss.name=sft", "train.epochs=3", "train.save_steps=0", "logging.progress=false"]
        ),
        tmp_path / "sft",
    )
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft["reference"] == "none" and rows[-1]["loss"] < rows[0]["loss"] - 0.5


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    """batch 4 x accumulation 2 takes the same optimizer steps as batch 8 x 1 (same examples per step)."""
    base = ["train.save_steps=0", "logging.progress=false", "train.max_steps=3", "train.max_grad_norm=null"]
    run(load_recipe(TINY, base + ["train.batch_size=8", "train.grad_accum=1"]), tmp_path / "b8")
    run(load_recipe(TINY, base + ["train.batch_size=4", "train.grad_accum=2"]), tmp_path / "b4")
    a, b = _weights(tmp_path / "b8"), _weights(tmp_path / "b4")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "nan"
    res = run_align(
        "train",
        str(TINY),
        "-o",
        str(out),
        "train.lr=1.0e30",
        "train.save_steps=1",
        "train.max_grad_norm=null",
        "logging.progress=false",
    )
    lines = error_lines(res.stderr)
    assert res.returncode == 1 and "non-finite loss at step" in lines[-1]
    assert "Traceback" not in res.stderr
    assert any(out.glob("checkpoint-*/trainer_state.json"))


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint_and_resumes_identically(tmp_path):
    """Checkpoints are written to checkpoint-N.tmp and renamed when complete: a kill while a .tmp folder exists
    (the write in progress) must leave the previous complete checkpoint usable, and the resumed run must end with
    the uninterrupted run's weights."""
    overrides = [
        "train.epochs=6",
        "train.save_steps=1",
        "train.keep_checkpoints=2",
        "logging.progress=false",
        "logging.plots=false",
    ]
    full = tmp_path / "full"
    assert run_align("train", str(TINY), "-o", str(full), *overrides).returncode == 0
    # the process kills itself inside the third checkpoint's write: its files are in checkpoint-3.tmp, not yet renamed
    die_in_write = (
        "import os, signal, sys\n"
        "import align.runs as runs\n"
        "finish = runs.finish_checkpoint\n"
        "def finish_or_die(tmp, final, state, keep):\n"
        "    if state['step'] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return finish(tmp, final, state, keep)\n"
        "runs.finish_checkpoint = finish_or_die\n"
        "from align.cli import main\n"
        "sys.exit(main())\n"
    )  # main() reads sys.argv[1:]: the arguments after -c's script
    part = tmp_path / "part"
    proc = subprocess.run(
        [sys.executable, "-c", die_in_write, "train", str(TINY), "-o", str(part), *overrides],
        cwd=REPO_ROOT,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (part / "checkpoint-3.tmp").is_dir() and not (part / "checkpoint-3").exists()
    assert not (part / "summary.json").exists()
    complete = [p for p in part.glob("checkpoint-*") if not p.name.endswith(".tmp")]
    assert complete and all((p / "trainer_state.json").is_file() for p in complete)
    resumed = run_align("train", str(TINY), "-o", str(part), "--resume", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(full), _weights(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not any(p.name.endswith(".tmp") for p in part.glob("checkpoint-*"))  # the torn write was cleaned up


@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_packed_rows_train_the_padded_model(tmp_path, loss):
    """data.packing (padding-free rows) against padded rows: the same reference log-probs, loss and weights after
    optimizer steps, within 1e-5 (fp32)."""
    over = ["train.max_steps=3", "train.lr=1e-3", "logging.progress=false", "logging.plots=false", "train.save_steps=0"]
    if loss == "sft":
        over += ["trainer=sft", "loss.name=sft"]
    for packing in ("true", "false"):
        run(load_recipe(TINY, [*over, f"data.packing={packing}"]), tmp_path / packing)
    a, b = _weights(tmp_path / "true"), _weights(tmp_path / "false")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ra, rb = metrics_rows(tmp_path / "true"), metrics_rows(tmp_path / "false")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) < 1e-5


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_dpo_trains_the_adapter_on_a_quantized_base_and_resumes_identically(tmp_path, bits):
    """model.quantization (QLoRA) through bitsandbytes' CPU backend: the base's linear layers are bitsandbytes modules,
    only the adapter trains (the reference is the quantized base with the adapter off: the first loss is ln 2), and
    a run resumed from a mid-run checkpoint ends with the same adapter and metrics (on this machine)."""
    pytest.importorskip("bitsandbytes")
    from align.models import build_tiny_model, char_tokenizer, load_policy

    tok = char_tokenizer()
    base = tmp_path / "base"
    build_tiny_model(
        "llama", hidden_size=64, layers=2, heads=2, intermediate_size=128, seed=0, tokenizer=tok
    ).save_pretrained(base)
    tok.save_pretrained(base)
    over = [
        f"model.name_or_path={base}",
        f"model.quantization={bits}",
        "lora.enabled=true",
        "lora.r=4",
        "train.max_steps=4",
        "train.save_steps=2",
        "train.keep_checkpoints=5",
        "logging.progress=false",
        "logging.plots=false",
    ]
    recipe = load_recipe(TINY, over)
    model, _ = load_policy(recipe.model, recipe.lora)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Linear4bit" if bits == "4bit" else "Linear8bitLt") in kinds
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    run(recipe, tmp_path / "full")
    rows = metrics_rows(tmp_path / "full")
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4) and rows[-1]["loss"] != rows[0]["loss"]
    crashed_copy(tmp_path / "full", tmp_path / "part", 2)
    run(recipe, tmp_path / "part", resume=True)
    assert metrics_rows(tmp_path / "part") == rows
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantization_needs_lora_saved_weights_and_an_offline_trainer(tmp_path):
    from align.errors import UserError

    with pytest.raises(UserError, match="set lora.enabled=true"):
        load_recipe(TINY, ["model.quantization=4bit", "model.name_or_path=/x"])
    with pytest.raises(UserError, match="must be a folder or hub id"):
        load_recipe(TINY, ["model.quantization=4bit", "lora.enabled=true"])
    with pytest.raises(UserError, match="applies to trainers 'preference' and 'sft', not 'online'"):
        load_recipe(REPO_ROOT / "recipes" / "spo" / "tiny.yaml", ["model.quantization=4bit", "lora.enabled=true"])
