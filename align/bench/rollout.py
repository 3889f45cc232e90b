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

With vLLM installed, against a real ``align vllm-serve`` process on the head_dim-64 model (fp32):
    vllm_server   ``full_sync_seconds`` (full weights: rank 0 streams a safetensors folder, the server reloads it),
                  ``lora_sync_seconds`` (a LoRA r8 adapter loaded under a new name), ``weight_sync_fraction`` (the
                  full sync over one online step through the server), ``greedy_matches_after_sync`` (greedy tokens
                  after each push equal the trainer's own model's)
    judge         an LLM judge (the pairwise prompt, log-probs of '1' vs '2', both orders) against the same server:
                  ``serial_calls_per_s`` (one request at a time), ``concurrent_calls_per_s`` (``judge.max_concurrency``
                  16), ``speedup``, and ``identical`` (the two gave the same probabilities)
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


def _server_rows(model, tok, prompts, new: int, tmp: Path) -> tuple[dict, dict]:
    """(vllm_server, judge) measured against one real ``align vllm-serve`` process on ``model``."""
    import copy
    import os
    import signal
    import subprocess
    import urllib.request

    from align.config import VLLMConfig
    from align.judges import LLMJudge
    from align.rollout import SamplingParams
    from align.rollout.hf import HFEngine
    from align.rollout.vllm_server import VLLMServerEngine

    folder = tmp / "served"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "align",
            "vllm-serve",
            "--model",
            str(folder),
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--max-num-seqs",
            "256",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"align vllm-serve did not start (see {tmp / 'server.log'})") from None
                time.sleep(0.5)
        settings = VLLMConfig(mode="server", server_urls=[url])
        greedy = SamplingParams(max_new_tokens=16, temperature=0.0)

        def matches(engine, reference) -> bool:
            got = engine.generate(prompts[:16], n=1, sampling=greedy)
            want = HFEngine(reference, tok).generate(prompts[:16], n=1, sampling=greedy)
            return [g[0].token_ids for g in got] == [w[0].token_ids for w in want]

        full = VLLMServerEngine(model, tok, batch_size=len(prompts), settings=settings)
        full.generate(prompts[:4], n=1, sampling=SamplingParams(max_new_tokens=4))  # warm-up
        step = _online_step_fraction(full, model, tok, prompts, new)  # ends with the full push of the trained model
        ok_full = matches(full, model)
        from types import SimpleNamespace

        from align.models import add_lora

        peft = add_lora(copy.deepcopy(model), SimpleNamespace(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))
        lora = VLLMServerEngine(peft, tok, batch_size=len(prompts), settings=settings)
        with torch.no_grad():
            for n_, p in peft.named_parameters():
                if "lora_B" in n_:
                    p.normal_(0.0, 0.05)
        t0 = time.perf_counter()
        lora.update_weights(peft)
        lora_s = time.perf_counter() - t0
        ok_lora = matches(lora, peft.eval())
        server = {
            "full_sync_seconds": step["sync_seconds"],
            "lora_sync_seconds": lora_s,
            **step,
            "greedy_matches_after_sync": bool(ok_full and ok_lora),
        }
        full.update_weights(model)  # the judge below scores with the trained model (any model will do)
        triples = [(tok.decode(p), f"{k} is the answer", f"{k + 1} is it") for k, p in enumerate(prompts[:48])]
        args = [list(x) for x in zip(*triples)]
        rates, probs = {}, {}
        for name, workers in (("serial", 1), ("concurrent", 16)):
            judge = LLMJudge(url + "/v1", str(folder), max_concurrency=workers)
            judge.compare(*[a[:2] for a in args])  # warm-up (connections)
            t0 = time.perf_counter()
            probs[name] = judge.compare(*args)
            rates[name] = 2 * len(triples) / (time.perf_counter() - t0)  # two calls (both orders) per triple
        judged = {
            "serial_calls_per_s": rates["serial"],
            "concurrent_calls_per_s": rates["concurrent"],
            "speedup": rates["concurrent"] / rates["serial"],
            "max_concurrency": 16,
            "calls": 2 * len(triples),
            "identical": probs["serial"] == probs["concurrent"],
        }
        return server, judged
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


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
            _say("vllm server: weight pushes and the LLM judge")
            result["vllm_server"], result["judge"] = _server_rows(tiny, tok, prompts, o["new"], tmp)
        else:
            result["vllm_vs_hf"] = None
            result["vllm_skipped"] = why
            result["vllm_server"] = result["judge"] = {"skipped": why}
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
