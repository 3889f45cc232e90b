"""``align bench dpo``: our offline trainer against TRL's DPOTrainer, same model, data and batch.

Every configuration runs in its own fresh subprocess (so peak RSS is that configuration's own), all from
this one command:
    ours_full   our trainer, full fine-tuning, separate frozen reference copy (forward each step)
    trl_full    TRL DPOTrainer, full fine-tuning, separate reference model (its default)
    ours_lora   our trainer, LoRA, reference = the same network with the adapter disabled
Throughput counts the non-padding tokens of the policy forward passes (chosen + rejected) per second of the
training loop. ``speedup_vs_trl`` = ours_full / trl_full tokens/s; ``lora_memory_ratio`` = peak memory of
ours_lora over ours_full (on CPU: resident set growth over the process's footprint before the model loads).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULTS = {
    "hidden": 512,
    "layers": 6,
    "intermediate": 1536,
    "heads": 8,
    "rows": 192,
    "batch": 8,
    "steps": 12,
    "seed": 0,
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return _rss_mb()


def _setup(workdir: Path, o: dict) -> tuple[Path, Path]:
    """A tiny Llama saved as a HF folder and a pairs file from the built-in tasks (same for every run)."""
    from align import tasks
    from align.models import build_tiny_model, char_tokenizer

    model_dir, data = workdir / "model", workdir / "pairs.jsonl"
    tok = char_tokenizer()
    model = build_tiny_model(
        "llama",
        hidden_size=o["hidden"],
        layers=o["layers"],
        heads=o["heads"],
        intermediate_size=o["intermediate"],
        max_positions=128,
        seed=o["seed"],
        tokenizer=tok,
    )
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = tasks.preference_rows(tasks.make_tasks(o["rows"], seed=o["seed"]), seed=o["seed"])
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def _worker(mode: str, model_dir: str, data: str, out: str, o: dict) -> dict:
    import accelerate  # noqa: F401  (libraries first: the baseline footprint is measured after imports)
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    base = _current_rss_mb()
    if mode in ("ours_full", "ours_lora"):
        from align.config import recipe_from_dict
        from align.trainers.offline import train

        recipe = recipe_from_dict(
            {
                "model": {"name_or_path": model_dir, "attn_implementation": "sdpa"},
                "lora": {"enabled": mode == "ours_lora", "r": 16, "alpha": 32},
                "data": {"train": data, "max_length": 64, "max_prompt_length": 32},
                "loss": {"name": "dpo", "beta": 0.1},
                "train": {
                    "seed": o["seed"],
                    "batch_size": o["batch"],
                    "max_steps": o["steps"],
                    "lr": 1e-5,
                    "schedule": "constant",
                    "reference": "model",
                    "logging_steps": o["steps"],
                    "max_grad_norm": 1.0,
                },
                "logging": {"plots": False, "progress": False},
            },
            "bench",
        )
        summary = train(recipe, out)
        tokens_per_second = summary["tokens_per_second"]
    else:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        rows = [json.loads(x) for x in Path(data).read_text().splitlines()]
        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=o["batch"],
            max_steps=o["steps"],
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            logging_steps=o["steps"],
            beta=0.1,
            loss_type=["sigmoid"],
            max_length=64,
            seed=o["seed"],
            dataloader_num_workers=0,
            disable_tqdm=True,
            max_grad_norm=1.0,
        )
        trainer = DPOTrainer(
            model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
        )
        tokens = 0
        orig = trainer.compute_loss

        def counting(model, inputs, *a, **k):
            nonlocal tokens
            tokens += int(inputs["attention_mask"].sum())
            return orig(model, inputs, *a, **k)

        trainer.compute_loss = counting
        t0 = time.time()
        trainer.train()
        tokens_per_second = tokens / (time.time() - t0)
    return {
        "mode": mode,
        "tokens_per_second": tokens_per_second,
        "peak_rss_mb": _rss_mb(),
        "base_rss_mb": base,
        "peak_memory_mb": _rss_mb() - base,
    }


def run(extra: list[str]) -> dict:
    from align.bench import parse_options

    o = parse_options("dpo", DEFAULTS, extra)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, data = _setup(tmp, o)
        for mode in ("trl_full", "ours_full", "ours_lora"):
            print(f"[bench dpo] {mode} ...", file=sys.stderr, flush=True)
            env = dict(
                os.environ,
                TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
            )
            cmd = [
                sys.executable,
                "-m",
                "align.bench.dpo",
                mode,
                str(model_dir),
                str(data),
                str(tmp / mode),
                json.dumps(o),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"bench dpo: {mode} failed:\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "benchmark": "dpo",
        "device": "cuda" if _cuda() else "cpu",
        "options": o,
        "ours_tokens_per_second": results["ours_full"]["tokens_per_second"],
        "trl_tokens_per_second": results["trl_full"]["tokens_per_second"],
        "speedup_vs_trl": results["ours_full"]["tokens_per_second"] / results["trl_full"]["tokens_per_second"],
        "ours_peak_memory_mb": results["ours_full"]["peak_memory_mb"],
        "trl_peak_memory_mb": results["trl_full"]["peak_memory_mb"],
        "lora_peak_memory_mb": results["ours_lora"]["peak_memory_mb"],
        "lora_memory_ratio": results["ours_lora"]["peak_memory_mb"] / results["ours_full"]["peak_memory_mb"],
        "lora_tokens_per_second": results["ours_lora"]["tokens_per_second"],
        "runs": results,
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":  # worker: python -m align.bench.dpo MODE MODEL_DIR DATA OUT OPTIONS_JSON
    mode, model_dir, data, out, opts = sys.argv[1:6]
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        result = _worker(mode, model_dir, data, out, json.loads(opts))
    print(json.dumps(result))
