"""Chunked log-probs and packed rows against the full-logits, padded path: values and gradients within 1e-5 (fp32),
for untied and tied embeddings, LoRA on the LM head, logit soft-capping and a sampling temperature."""

from __future__ import annotations

import copy

import pytest
import torch

from align.data import Example, collate, collate_packed
from align.logprobs import full_token_logps, sequence_logps, token_logps_of
from align.models import build_tiny_model, char_tokenizer

TOK = char_tokenizer()


def _model(arch="llama", tie=False, seed=0):
    return build_tiny_model(
        arch, hidden_size=64, layers=2, heads=2, intermediate_size=128, seed=seed, tokenizer=TOK, tie_embeddings=tie
    )


def _batch(rows=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for i in range(rows):
        p = torch.randint(5, 90, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(5, 90, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(5, 90, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        exs.append(Example(i, p, c, r))
    return exs


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, fn_a, fn_b, tol=1e-5):
    a_model, b_model = model, copy.deepcopy(model)
    a = fn_a(a_model)
    b = fn_b(b_model)
    assert a.shape == b.shape and (a - b).abs().max().item() < tol
    (a * torch.linspace(0.5, 1.5, a.numel()).view_as(a)).sum().backward()
    (b * torch.linspace(0.5, 1.5, b.numel()).view_as(b)).sum().backward()
    ga, gb = _grads(a_model), _grads(b_model)
    assert ga.keys() == gb.keys() and ga
    worst = max((ga[k] - gb[k]).abs().max().item() for k in ga)
    assert worst < tol, worst


@pytest.mark.parametrize("arch, tie, temperature", [("llama", False, 1.0), ("qwen2", True, 1.0), ("llama", False, 0.7)])
def test_chunked_equals_full_logits_values_and_gradients(arch, tie, temperature):
    model = _model(arch, tie)
    b = collate(_batch(), TOK.pad_token_id)
    mask = b["completion_mask"][:, 1:].bool()

    def full(m):
        return full_token_logps(m, b["input_ids"], b["attention_mask"], temperature=temperature) * mask

    def chunked(m):  # chunks of 5 tokens: several chunks, one ragged
        return token_logps_of(m, b["input_ids"], b["attention_mask"], mask, temperature=temperature, chunk=5)

    _compare(model, full, chunked)


def test_chunked_with_lora_on_the_lm_head_and_softcapping():
    from peft import LoraConfig, get_peft_model

    model = _model()
    model.config.final_logit_softcapping = 3.0  # Gemma-2 style: logits = cap * tanh(logits / cap)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    b = collate(_batch(), TOK.pad_token_id)
    mask = b["completion_mask"][:, 1:].bool()

    def full(m):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        logits = torch.tanh(logits / 3.0) * 3.0
        return torch.gather(logits.log_softmax(-1), -1, b["input_ids"][:, 1:, None])[..., 0] * mask

    _compare(peft, full, lambda m: token_logps_of(m, b["input_ids"], b["attention_mask"], mask, chunk=7))


def test_packed_rows_equal_padded_rows_per_sequence():
    exs = _batch(rows=7, seed=3)
    padded, packed = collate(exs, TOK.pad_token_id), collate_packed(exs, TOK.pad_token_id)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    real = int((packed["seq_id"] < packed["n_seq"]).sum())
    assert real == int(padded["attention_mask"].sum())  # every token once, nothing else but row-end padding
    _compare(
        _model(), lambda m: torch.stack(sequence_logps(m, padded)), lambda m: torch.stack(sequence_logps(m, packed))
    )


def test_only_masked_positions_reach_the_lm_head():
    model = _model()
    b = collate(_batch(), TOK.pad_token_id)
    mask = b["completion_mask"][:, 1:].bool()
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0] if inp[0].dim() == 2 else 0))
    token_logps_of(model, b["input_ids"], b["attention_mask"], mask, chunk=4)
    assert sum(seen) == int(mask.sum()) and max(seen) <= 4  # chunks of the response positions only


def test_dropout_is_off_by_default_and_can_be_kept():
    from align.config import LoraConfig, ModelConfig
    from align.models import load_policy

    def dropouts(model):
        return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] + [
            m.attention_dropout for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)
        ]

    cfg = dict(name_or_path="tiny:llama", tiny_hidden_size=64, tiny_layers=1, tiny_heads=2, tiny_intermediate_size=64)
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1)
    model, _ = load_policy(ModelConfig(**cfg), lora)
    attn = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert attn and all(m.attention_dropout == 0.0 for m in attn)
    assert sorted(set(dropouts(model))) == [0.0, 0.1]  # the adapter keeps lora.dropout
    from transformers import LlamaConfig, LlamaForCausalLM

    with_dropout = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            attention_dropout=0.2,
        )
    )
    from align.models import disable_dropout

    assert disable_dropout(with_dropout) >= 1 and set(dropouts(with_dropout)) == {0.0}


def test_frozen_zero3_head_path_recomputes_chunks_to_the_same_values_and_gradients():
    """The path a frozen ZeRO-3 LM head (LoRA's base) takes: weight gathered in forward and backward, logits recomputed
    per chunk. On a plain weight (nothing to gather) it equals the checkpointed module path; the multi-process ZeRO-3
    run is tests/trainers/test_online_distributed.py::test_inpo_lora_zero3_matches_ddp (slow)."""
    from align.logprobs import _chunk_calls, _FrozenZero3Head, _head_logps

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    w = torch.randn(37, generator=g)
    ours = _FrozenZero3Head.apply(h, head.weight, labels, 30.0, 0.7, 8)
    (ga,) = torch.autograd.grad((ours * w).sum(), h)
    ref = _head_logps(head, 30.0, 0.7, h, labels)
    (gb,) = torch.autograd.grad((ref * w).sum(), h)
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(ga, gb, atol=1e-6)
    assert _chunk_calls(37, 8, zero3=False, device="cpu") == 5  # one process: no collective, ceil(37 / 8)


@pytest.mark.parametrize("softcap, temperature, trainable", [(None, 1.0, True), (30.0, 0.7, True), (5.0, 1.3, False)])
def test_fused_head_equals_autograd_logits_values_and_gradients(softcap, temperature, trainable):
    """The fused LM-head path (plain Linear heads: one reused logits buffer, gradient by hand, the weight's gradient
    accumulated in place) against autograd through the full logits: values, d/dh and d/dW within 1e-5."""
    from align.logprobs import _FusedHeadLogps, _head_logps

    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        head.weight.normal_(0, 2.0, generator=g)  # logits past the soft-cap's linear range
    head.requires_grad_(trainable)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    w = torch.randn(37, generator=g)
    wrt = (h, head.weight) if trainable else (h,)
    ours = _FusedHeadLogps.apply(h, head.weight, labels, softcap, temperature, 8)
    ga = torch.autograd.grad((ours * w).sum(), wrt)
    ref = _head_logps(head, softcap, temperature, h, labels)
    gb = torch.autograd.grad((ref * w).sum(), wrt)
    assert (ours - ref).abs().max() < 1e-5
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(ga, gb))


def test_plain_heads_take_the_fused_path_on_masked_positions_only(monkeypatch):
    import align.logprobs as lp

    calls = []
    real = lp._FusedHeadLogps.apply
    monkeypatch.setattr(lp._FusedHeadLogps, "apply", lambda *a: calls.append((a[0].shape[0], a[5])) or real(*a))
    model = _model(tie=True)
    b = collate(_batch(), TOK.pad_token_id)
    mask = b["completion_mask"][:, 1:].bool()
    token_logps_of(model, b["input_ids"], b["attention_mask"], mask, chunk=4)
    assert calls == [(int(mask.sum()), 4)]
    model.lm_head.register_forward_hook(lambda *a: None)  # a hooked head is called as a module (checkpointed chunks)
    token_logps_of(model, b["input_ids"], b["attention_mask"], mask, chunk=4)
    assert len(calls) == 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_per_token_rows_equal_padded_rows(temperature):
    """row_token_logps(packed=True), the per-token objectives' path (policy-gradient samples, agent episodes): the
    rows' real tokens packed into padding-free rows and every value put back at its row and position; values and
    gradients equal the padded rows' within 1e-5, and fewer tokens go through the model."""
    from align.logprobs import row_token_logps

    b = collate(_batch(rows=7, seed=5), TOK.pad_token_id)
    mask = b["completion_mask"][:, 1:].bool()
    seen = []

    def run(packed):
        def fn(m):
            m.model.register_forward_pre_hook(lambda mod, a, k: seen.append(k["input_ids"].numel()), with_kwargs=True)
            return row_token_logps(m, b["input_ids"], b["attention_mask"], mask, temperature, packed=packed)

        return fn

    _compare(_model(), run(False), run(True))
    assert seen[1] < seen[0] and seen[1] >= int(b["attention_mask"].sum())
