"""The lean decoder (align.rollout.decode) against transformers' forward: same greedy tokens, same log-probs,
for Llama (grouped-query) and Qwen2 (q/k/v biases), shared prefills, LoRA enabled and disabled, bf16; and the
cases it must leave to transformers."""

import pytest
import torch

from align.models import build_tiny_model, char_tokenizer
from align.rollout import SamplingParams
from align.rollout.decode import llama_decoder
from align.rollout.hf import HFEngine

PROMPTS = ["12+34=", "rev abcdef=", "max 1 2 3=", "x", "sort 9 8 7 6 5 4 3 2 1="]


def _both(model, tok, n=2, **kw):
    sp = SamplingParams(max_new_tokens=kw.pop("new", 24), temperature=kw.pop("temperature", 0.0), seed=0, **kw)
    lean = HFEngine(model, tok, fast=True).generate(PROMPTS, n=n, sampling=sp)
    ref = HFEngine(model, tok, fast=False).generate(PROMPTS, n=n, sampling=sp)
    return [c for g in lean for c in g], [c for g in ref for c in g]


def _assert_same(lean, ref, tol):
    assert [c.token_ids for c in lean] == [c.token_ids for c in ref]
    assert [c.finish_reason for c in lean] == [c.finish_reason for c in ref]
    diff = max(abs(a - b) for x, y in zip(lean, ref) for a, b in zip(x.logprobs, y.logprobs))
    assert diff < tol, diff


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_decoder_equals_transformers(arch):
    tok = char_tokenizer()
    model = build_tiny_model(
        arch, tokenizer=tok, hidden_size=128, layers=3, heads=4, intermediate_size=256, seed=1
    ).eval()
    if arch == "qwen2":  # make the q/k/v biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    m.bias.normal_(0, 0.5)
    assert llama_decoder(model) is not None
    _assert_same(*_both(model, tok, n=3), tol=1e-4)
    # sampling with the same seed draws the same tokens as well
    _assert_same(*_both(model, tok, n=2, temperature=1.0, top_k=20), tol=1e-4)


def test_lean_decoder_folds_lora_in_both_adapter_states():
    from peft import LoraConfig, get_peft_model

    tok = char_tokenizer()
    base = build_tiny_model("llama", tokenizer=tok, hidden_size=64, layers=2, heads=2, intermediate_size=128, seed=2)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ).eval()
    assert llama_decoder(model) is not None
    with_adapter = _both(model, tok)
    _assert_same(*with_adapter, tol=1e-4)
    with model.disable_adapter():
        without = _both(model, tok)
        _assert_same(*without, tol=1e-4)
    assert [c.token_ids for c in with_adapter[0]] != [c.token_ids for c in without[0]]  # the adapter did matter


def test_lean_decoder_bf16_close_to_transformers():
    tok = char_tokenizer()
    model = (
        build_tiny_model("llama", tokenizer=tok, hidden_size=64, layers=2, heads=2, intermediate_size=128, seed=3)
        .to(torch.bfloat16)
        .eval()
    )
    lean, ref = _both(model, tok, n=1, new=8)
    # bf16 rounding differs (folded norms, fused projections): compare the first token's log-prob loosely
    assert all(abs(a.logprobs[0] - b.logprobs[0]) < 0.1 for a, b in zip(lean, ref))


def test_lean_decoder_declines_what_it_does_not_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = char_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert llama_decoder(gpt2) is None
    llama = build_tiny_model("llama", tokenizer=tok, hidden_size=64, layers=1, heads=2, intermediate_size=128)
    llama.config.rope_parameters = {**llama.config.rope_parameters}
    llama.model.rotary_emb.rope_type = "dynamic"
    assert llama_decoder(llama) is None
    # the engine still generates with the models the lean path declines
    out = HFEngine(gpt2, tok).generate(
        PROMPTS[:2], n=2, sampling=SamplingParams(max_new_tokens=4, temperature=1.0, seed=0)
    )
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for g in out for c in g)


def test_the_lean_decoder_steps_aside_when_its_copy_does_not_fit_or_it_fails(monkeypatch):
    """A fused copy larger than half the free memory is not built; a failure inside the lean path (an out-of-memory
    error, say) redoes the chunk with transformers' forward, from the same random state: the same samples."""
    import align.rollout.decode as decode

    tok = char_tokenizer()
    model = build_tiny_model("llama", hidden_size=64, layers=2, heads=2, intermediate_size=128, seed=0, tokenizer=tok)
    assert decode.fused_bytes(model) > 0 and decode.free_bytes("cpu") > decode.fused_bytes(model)
    assert llama_decoder(model) is not None
    monkeypatch.setattr(decode, "free_bytes", lambda device: decode.fused_bytes(model))  # copy > half of what is free
    assert llama_decoder(model) is None
    monkeypatch.undo()

    sp = SamplingParams(max_new_tokens=10, temperature=1.0, seed=4)
    ref = HFEngine(model, tok, fast=False).generate(PROMPTS, n=2, sampling=sp)

    def broken(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(decode.LlamaDecoder, "step", broken)
    out = HFEngine(model, tok, fast=True).generate(PROMPTS, n=2, sampling=sp)
    assert [[c.token_ids for c in g] for g in out] == [[c.token_ids for c in g] for g in ref]
