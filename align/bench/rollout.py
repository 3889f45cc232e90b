"""``align bench rollout``: the rollout engine against transformers' ``generate``, in one command.

Models: BabyLlama (the real TinyStories checkpoint from the shared data folder, converted on the fly; skipped
with a reason when that folder is absent) and a tiny random Llama with head_dim 64. Each generates ``new``
tokens for ``batch`` prompts, sampling at temperature 1 with EOS disabled, so every method produces the same
number of tokens. Throughput = generated tokens per second of wall time.
    per_prompt_generate   model.generate called once per prompt (the naive loop)
    batched_generate      model.generate on the left-padded batch
    hf                    our engine (one prefill, KV cache, lean sampling loop)
    vllm                  our vLLM backend, when vllm is installed (else null, with the reason)
``weight_sync_fraction``: time of ``engine.update_weights(model)`` over one online step (generate K=4 samples for
the batch's prompts + one DPO-shaped forward/backward/optimizer step + the sync) for the backend used.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULTS = {"batch": 64, "new": 128, "per_prompt": 8, "seed": 0}


def _say(msg: str) -> None:
    print(f"[bench rollout] {msg}", file=sys.stderr, flush=True)


def _prompts(tok, batch: int) -> list[list[int]]:
    base = [
        "Once upon a time",
        "The little dog",
        "One day, a girl named Lily",
        "Tom and his mom",
        "The sun was",
        "In a small town",
        "A big red ball",
        "The cat saw",
    ]
    return [tok(base[i % len(base)] + ("," if i // len(base) % 2 else ""))["input_ids"] for i in range(batch)]


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def _hf_generate_rates(model, tok, prompts, new: int, per_prompt: int) -> dict:
    kw = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for p in prompts[:per_prompt]:
        model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
    per = per_prompt * new / (time.perf_counter() - t0)
    ids, mask = _left_pad(prompts, kw["pad_token_id"])
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, **kw)
    assert out.shape[1] - ids.shape[1] == new
    batched = len(prompts) * new / (time.perf_counter() - t0)
    return {"per_prompt_generate": per, "batched_generate": batched}


def _engine_rate(engine, prompts, new: int) -> float:
    from align.rollout import SamplingParams

    sp = SamplingParams(
        max_new_tokens=new,
        temperature=1.0,
        seed=0,
        stop_token_ids=[],
        suppress_token_ids=[engine.tokenizer.eos_token_id],
    )
    t0 = time.perf_counter()
    out = engine.generate(prompts, n=1, sampling=sp)
    n_tokens = sum(len(g[0].token_ids) for g in out)
    assert n_tokens == len(prompts) * new
    return n_tokens / (time.perf_counter() - t0)


def _online_step_fraction(engine, model, tok, prompts, new: int) -> dict:
    """One online step: sample K=4, a DPO-shaped forward/backward/step on [chosen; rejected], then the sync."""
    from align.data import Example, collate
    from align.logprobs import sequence_logps
    from align.rollout import SamplingParams

    t0 = time.perf_counter()
    groups = engine.generate(prompts, n=4, sampling=SamplingParams(max_new_tokens=new // 2, temperature=1.0, seed=1))
    t_gen = time.perf_counter() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    t0 = time.perf_counter()
    exs = [
        Example(i, g[0].prompt_ids, g[0].token_ids or [tok.eos_token_id], g[1].token_ids or [tok.eos_token_id])
        for i, g in enumerate(groups)
    ]
    for s in range(0, len(exs), 16):
        logps, _ = sequence_logps(model, collate(exs[s : s + 16], tok.pad_token_id or 0))
        logps.sum().backward()
    opt.step()
    opt.zero_grad()
    model.eval()
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.update_weights(model)
    t_sync = time.perf_counter() - t0
    return {
        "generate_seconds": t_gen,
        "train_seconds": t_train,
        "sync_seconds": t_sync,
        "weight_sync_fraction": t_sync / (t_gen + t_train + t_sync),
    }


def _vllm_available() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return f"vllm not importable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None


def run(extra: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.bench import parse_options
    from align.convert import convert_shared_babyllama
    from align.models import build_tiny_model, char_tokenizer
    from align.rollout.hf import HFEngine

    o = parse_options("rollout", DEFAULTS, extra)
    torch.manual_seed(o["seed"])
    result: dict = {"benchmark": "rollout", "device": "cpu", "options": o, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {}
        path, why = convert_shared_babyllama(tmp / "babyllama")
        if path:
            models["babyllama"] = (
                AutoModelForCausalLM.from_pretrained(path).eval(),
                AutoTokenizer.from_pretrained(path),
            )
        else:
            result["babyllama"] = {"skipped": why}
        tok = char_tokenizer()
        tiny = build_tiny_model(
            "llama", hidden_size=256, layers=4, heads=4, intermediate_size=768, max_positions=512, seed=0, tokenizer=tok
        ).eval()
        models["tiny_head_dim64"] = (tiny, tok)
        for name, (model, tok) in models.items():
            _say(f"{name}: generate per prompt / batched, our hf engine")
            prompts = _prompts(tok, o["batch"])
            rates = _hf_generate_rates(model, tok, prompts, o["new"], o["per_prompt"])
            engine = HFEngine(model, tok, batch_size=o["batch"])
            rates["hf"] = _engine_rate(engine, prompts, o["new"])
            rates["speedup_vs_batched_generate"] = rates["hf"] / rates["batched_generate"]
            rates["speedup_vs_per_prompt_generate"] = rates["hf"] / rates["per_prompt_generate"]
            result[name] = rates
        tiny, tok = models["tiny_head_dim64"]
        prompts = _prompts(tok, o["batch"])
        why = _vllm_available()
        if why is None:
            from align.rollout.vllm import VLLMEngine

            _say("vllm engine on the head_dim-64 model")
            v = VLLMEngine(tiny, tok, batch_size=o["batch"])
            _engine_rate(v, prompts[:4], 8)  # warm-up
            result["tiny_head_dim64"]["vllm"] = _engine_rate(v, prompts, o["new"])
            result["vllm_vs_hf"] = result["tiny_head_dim64"]["vllm"] / result["tiny_head_dim64"]["hf"]
            result["online_step_vllm"] = _online_step_fraction(v, tiny, tok, prompts, o["new"])
        else:
            result["vllm_vs_hf"] = None
            result["vllm_skipped"] = why
        _say("one online step with the hf engine")
        result["online_step_hf"] = _online_step_fraction(
            HFEngine(tiny, tok, batch_size=256), tiny, tok, prompts, o["new"]
        )
    main = result.get("babyllama") if "hf" in result.get("babyllama", {}) else result["tiny_head_dim64"]
    result["speedup_vs_batched_generate"] = main["speedup_vs_batched_generate"]
    result["speedup_vs_per_prompt_generate"] = main["speedup_vs_per_prompt_generate"]
    step = result.get("online_step_vllm") or result["online_step_hf"]
    result["weight_sync_fraction"] = step["weight_sync_fraction"]
    return result
