"""The transformers backend: log-probs equal the trainer's recomputation, seeds reproduce, prefill sharing is exact."""

import torch

from align.logprobs import token_logps
from align.rollout import SamplingParams
from align.rollout.hf import HFEngine

PROMPTS = ["12+34=", "rev abcdef=", "max 1 2 3=", "x"]


def _recompute(model, c):
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad():
        lp = token_logps(model(ids).logits[0, :-1], ids[0, 1:])
    return lp[len(c.prompt_ids) - 1 :]


def test_logprobs_match_recomputation_with_left_padding(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    out = engine.generate(
        PROMPTS, n=3, sampling=SamplingParams(max_new_tokens=12, temperature=1.0, top_k=30, top_p=0.9, seed=0)
    )
    assert len(out) == len(PROMPTS) and all(len(g) == 3 for g in out)
    for group in out:
        for c in group:
            assert len(c.token_ids) == len(c.logprobs) > 0
            assert c.finish_reason in ("stop", "length")
            assert c.finish_reason == "length" or c.token_ids[-1] == tiny_tokenizer.eos_token_id
            assert (_recompute(tiny_model, c) - torch.tensor(c.logprobs)).abs().max() < 1e-3


def test_seed_reproduces_and_differs():
    from align.models import build_tiny_model, char_tokenizer

    tok = char_tokenizer()
    model = build_tiny_model(tokenizer=tok, hidden_size=64, layers=2, heads=2, intermediate_size=128)
    engine = HFEngine(model, tok)
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    a = [c.token_ids for g in engine.generate(PROMPTS, n=2, sampling=sp) for c in g]
    b = [c.token_ids for g in engine.generate(PROMPTS, n=2, sampling=sp) for c in g]
    c = [
        c.token_ids
        for g in engine.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=8, temperature=1.0, seed=8))
        for c in g
    ]
    assert a == b and a != c


def test_greedy_shared_prefill_equals_one_prompt_at_a_time(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    sp = SamplingParams(max_new_tokens=10, temperature=0.0)
    batched = engine.generate(PROMPTS, n=2, sampling=sp)
    for prompt, group in zip(PROMPTS, batched):
        single = engine.generate([prompt], n=1, sampling=sp)[0][0]
        assert group[0].token_ids == group[1].token_ids == single.token_ids
        assert torch.allclose(torch.tensor(group[0].logprobs), torch.tensor(single.logprobs), atol=1e-4)


def test_stop_strings_and_max_tokens(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    out = engine.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))
    assert all(len(g[0].token_ids) <= 5 for g in out)
    full = engine.generate(["12+34="], n=1, sampling=SamplingParams(max_new_tokens=20, temperature=0.0))[0][0]
    if len(full.text) >= 3:
        stop = full.text[1:3]
        cut = engine.generate(
            ["12+34="], n=1, sampling=SamplingParams(max_new_tokens=20, temperature=0.0, stop=[stop])
        )[0][0]
        assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)


def test_chat_prompts_use_the_template(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    msgs = [{"role": "user", "content": "hi"}]
    c = engine.generate([msgs], n=1, sampling=SamplingParams(max_new_tokens=3, temperature=0.0))[0][0]
    rendered = tiny_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tiny_tokenizer.decode(c.prompt_ids) == rendered


def test_top_logprobs(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    c = engine.generate(PROMPTS[:2], n=2, sampling=SamplingParams(max_new_tokens=4, temperature=0.0, top_logprobs=5))[
        1
    ][1]
    assert len(c.top_logprobs) == len(c.token_ids)
    for tid, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
        assert len(top) == 5 and max(top, key=top.get) == tid and abs(top[tid] - lp) < 1e-6
    assert engine.generate(PROMPTS[:1], n=1, sampling=SamplingParams(max_new_tokens=2))[0][0].top_logprobs is None


def test_sampling_follows_the_model_distribution(tiny_tokenizer):
    """Gumbel-max sampling draws from softmax(logits / T) (with top-k): over 4,000 samples the chi-square statistic
    of the first-token counts against the model's own distribution stays within 5 standard deviations of its
    expectation (k - 1), and tokens outside the top k never appear."""
    from align.models import build_tiny_model

    model = build_tiny_model(
        tokenizer=tiny_tokenizer, hidden_size=64, layers=2, heads=2, intermediate_size=128, seed=5
    ).eval()
    prompt = "12+34="
    ids = torch.tensor([tiny_tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    for temperature, top_k in ((1.0, 0), (0.05, 0), (0.05, 5)):
        z = logits / temperature
        if top_k:
            z = z.masked_fill(z < torch.topk(z, top_k).values[-1], float("-inf"))
        probs = z.softmax(-1).double()
        out = HFEngine(model, tiny_tokenizer, batch_size=4000).generate(
            [prompt], n=4000, sampling=SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, seed=3)
        )
        counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out[0]]), minlength=len(probs)).double()
        assert counts[probs == 0].sum() == 0
        expected = probs * counts.sum()
        keep = expected > 5  # the usual chi-square validity rule; the rest pooled into one cell
        obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
        exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
        obs, exp = obs[exp > 0], exp[exp > 0]
        chi2, dof = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
        assert dof >= 1 and chi2 < dof + 5 * (2 * dof) ** 0.5, (temperature, top_k, chi2, dof)
