"""A short check of the GPU-only paths of the vLLM backend, for anyone with GPUs (a few minutes):

    python bench/gpu_check.py [--out gpu_check.json]

1. colocate placement (2+ GPUs): ``torchrun --nproc_per_node 2`` of this script's worker; each rank builds a colocated
   engine (external_launcher) and generates. Passes when rank r's engine took its memory on cuda:r only and the
   trainer's current device is still cuda:r afterwards.
2. server-mode sync: ``align vllm-serve`` on the last GPU (bf16), a full-weight push (vLLM's NCCL weight transfer
   with 2+ GPUs, a safetensors folder with one) and a LoRA push; passes when greedy tokens after each push equal
   the trainer's own model's and the sampled log-probs are within bf16 tolerance (0.05).
3. sleep/wake: a colocated engine with ``sleep_level`` 1 on cuda:0; passes when sleeping releases memory and waking
   (weights pushed again, KV cache back) gives the same greedy tokens.

Prints one JSON object (each check: passed, measured numbers) and writes it to ``--out``. The model is a small
random Qwen2-shaped model built locally (no download). Until this has been run, docs/scaling.md says plainly that
these paths are unverified on GPU. Not part of the test suite (CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(folder: Path):
    """A random Qwen2-shaped model (head_dim 64, 4 layers) with the char tokenizer, saved to ``folder`` in bf16."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from align.models import char_tokenizer

    tok = char_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


PROMPTS = ["12+34=", "sort 3142=", "Once upon a time", "max 7 2 9="]


def worker(folder: str, out: str) -> None:
    """One torchrun rank of check 1."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.config import VLLMConfig
    from align.rollout import Placement, SamplingParams
    from align.rollout.vllm import VLLMEngine

    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(f"cuda:{local}")
    tok = AutoTokenizer.from_pretrained(folder)
    free_before = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    engine = VLLMEngine(
        model,
        tok,
        settings=VLLMConfig(gpu_memory_utilization=0.25),
        source=folder,
        placement=Placement(rank, local, world, f"cuda:{local}"),
    )
    out_ = engine.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=8, seed=rank))
    dist.barrier()
    free_after = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    record = {
        "rank": rank,
        "current_device": torch.cuda.current_device(),
        "executor": engine.engine_args.get("distributed_executor_backend"),
        "env": engine.engine_args.get("env"),
        "taken_gb": [(b - a) / 2**30 for b, a in zip(free_before, free_after)],
        "samples": sum(len(g) for g in out_),
    }
    Path(out, f"rank-{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def check_placement(folder: Path, tmp: Path) -> dict:
    import torch

    if torch.cuda.device_count() < 2:
        return {"passed": None, "skipped": "needs 2 GPUs"}
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            __file__,
            "--worker",
            str(folder),
            str(tmp),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    ranks = [json.loads(p.read_text()) for p in sorted(tmp.glob("rank-*.json"))]
    if res.returncode != 0 or len(ranks) != 2:
        return {"passed": False, "error": res.stderr[-2000:]}
    ok = all(
        r["current_device"] == r["rank"]
        and r["executor"] == "external_launcher"
        and r["taken_gb"][r["rank"]] > 0.5
        and r["taken_gb"][1 - r["rank"]] < 0.5 * r["taken_gb"][r["rank"]]
        for r in ranks
    )
    return {"passed": ok, "ranks": ranks}


def check_server(folder: Path, model, tok, tmp: Path) -> dict:
    import copy
    from types import SimpleNamespace

    import torch

    from align.config import VLLMConfig
    from align.logprobs import token_logps
    from align.models import add_lora
    from align.rollout import SamplingParams
    from align.rollout.hf import HFEngine
    from align.rollout.vllm_server import VLLMServerEngine
    from tests.servers import start_vllm_server, stop

    gpu = str(torch.cuda.device_count() - 1)
    transfer = "nccl" if torch.cuda.device_count() >= 2 else "folder"  # NCCL needs the two sides on distinct GPUs
    env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # the server process inherits it
    try:
        proc, url = start_vllm_server(
            folder,
            tmp / "server.log",
            "--dtype",
            "bfloat16",
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--weight-transfer",
            transfer,
            "--gpu-memory-utilization",
            "0.3",
        )
    finally:
        if env_before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_before
    try:
        model = model.to("cuda:0").eval()
        greedy = SamplingParams(max_new_tokens=12, temperature=0.0)

        def follows(engine, ref) -> tuple[bool, float]:
            got = engine.generate(PROMPTS, n=1, sampling=greedy)
            want = HFEngine(ref, tok).generate(PROMPTS, n=1, sampling=greedy)
            worst = 0.0
            for g in got:
                ids = torch.tensor([g[0].prompt_ids + g[0].token_ids], device=ref.device)
                with torch.no_grad():
                    lp = token_logps(ref(ids).logits[0, :-1], ids[0, 1:])[len(g[0].prompt_ids) - 1 :].cpu()
                worst = max(worst, (lp - torch.tensor(g[0].logprobs)).abs().max().item())
            return [g[0].token_ids for g in got] == [w[0].token_ids for w in want], worst

        new = copy.deepcopy(model)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        settings = VLLMConfig(mode="server", server_urls=[url], weight_transfer=transfer)
        full = VLLMServerEngine(new, tok, settings=settings)
        t0 = time.perf_counter()
        full.update_weights(new)
        full_s = time.perf_counter() - t0
        full_ok, full_gap = follows(full, new)
        peft = add_lora(copy.deepcopy(model), SimpleNamespace(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.05)
        full.update_weights(model)  # the adapter applies to the original base
        lora = VLLMServerEngine(peft, tok, settings=settings)
        t0 = time.perf_counter()
        lora.update_weights(peft)
        lora_s = time.perf_counter() - t0
        lora_ok, lora_gap = follows(lora, peft.eval())
        return {
            "passed": full_ok and lora_ok and max(full_gap, lora_gap) < 0.05,
            "transport": full.transport,
            "full_sync_seconds": full_s,
            "lora_sync_seconds": lora_s,
            "greedy_equal": [full_ok, lora_ok],
            "max_logprob_gap": [full_gap, lora_gap],
        }
    finally:
        stop(proc)


def check_sleep(folder: Path, model, tok) -> dict:
    import torch

    from align.config import VLLMConfig
    from align.rollout import SamplingParams
    from align.rollout.vllm import VLLMEngine

    model = model.to("cuda:0")
    engine = VLLMEngine(model, tok, settings=VLLMConfig(gpu_memory_utilization=0.3, sleep_level=1), source=str(folder))
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    free0 = torch.cuda.mem_get_info(0)[0]
    before = engine.generate(PROMPTS, n=1, sampling=greedy)
    awake = torch.cuda.mem_get_info(0)[0]
    engine.sleep()
    asleep = torch.cuda.mem_get_info(0)[0]
    engine.update_weights(model)  # wakes the weights, pushes them
    after = engine.generate(PROMPTS, n=1, sampling=greedy)  # wakes the KV cache
    held = (free0 - awake) / 2**30 if free0 > awake else None
    released = (asleep - awake) / 2**30
    same = [g[0].token_ids for g in before] == [g[0].token_ids for g in after]
    return {
        "passed": bool(released > 0 and same),
        "released_gb": released,
        "held_before_sleep_gb": held,
        "greedy_same_after_wake": same,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here: nothing to check", file=sys.stderr)
        return 2
    from align.rollout.vllm import check_vllm

    result = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "vllm": check_vllm(),
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, tok = build_model(tmp / "model")
        for name, fn in (
            ("colocate_placement", lambda: check_placement(tmp / "model", tmp)),
            ("server_sync", lambda: check_server(tmp / "model", model, tok, tmp)),
            ("sleep_wake", lambda: check_sleep(tmp / "model", model, tok)),
        ):
            t0 = time.time()
            try:
                result[name] = fn()
            except Exception as e:  # noqa: BLE001 - report every check
                result[name] = {"passed": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            result[name]["seconds"] = round(time.time() - t0, 1)
            print(f"[gpu_check] {name}: {result[name].get('passed')}", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return (
        0
        if all(result[k].get("passed") in (True, None) for k in ("colocate_placement", "server_sync", "sleep_wake"))
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
