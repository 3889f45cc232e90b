"""Multi-turn episodes: masks mark exactly the model's tokens, log-probs are the model's, no tokenisation drift."""

import torch

from align.logprobs import token_logps
from align.rollout import SamplingParams
from align.rollout.episodes import check_no_drift, run_episodes
from align.rollout.hf import HFEngine
from tests.conftest import SPECIALS, Echo


def test_masks_logprobs_and_no_drift(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    envs = [Echo("12+34="), Echo("rev abc="), Echo("x")]
    eps = run_episodes(
        engine,
        tiny_tokenizer,
        envs,
        SamplingParams(max_new_tokens=6, temperature=1.0, seed=0, suppress_token_ids=SPECIALS),
        max_turns=5,
    )
    for ep, env in zip(eps, envs):
        assert ep.finished and ep.turns == 3 and len(env.seen) == 3
        assert len(ep.token_ids) == len(ep.model_mask) == len(ep.logprobs)
        assert check_no_drift(tiny_tokenizer, ep)
        assert not {t for t, m in zip(ep.token_ids, ep.model_mask) if m} & set(SPECIALS)  # suppressed ids never sampled
        # environment text never sits under the model mask
        model_text = tiny_tokenizer.decode(
            [t for t, m in zip(ep.token_ids, ep.model_mask) if m], skip_special_tokens=True
        )
        assert "obs" not in model_text.replace("".join(env.seen), "")
        assert "".join(env.seen) == model_text
        # the engine's log-probs are the model's, for the model's tokens only
        ids = torch.tensor([ep.token_ids])
        with torch.no_grad():
            lp = token_logps(tiny_model(ids).logits[0, :-1], ids[0, 1:])
        mask = torch.tensor(ep.model_mask[1:], dtype=torch.bool)
        assert (lp[mask] - torch.tensor(ep.logprobs[1:])[mask]).abs().max() < 1e-3
        assert all(lp_ == 0.0 for lp_, m in zip(ep.logprobs, ep.model_mask) if not m)


def test_turn_limit_stops_unfinished_episodes(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    eps = run_episodes(
        engine,
        tiny_tokenizer,
        [Echo("a")],
        SamplingParams(max_new_tokens=3, temperature=0.0, suppress_token_ids=SPECIALS),
        max_turns=2,
    )
    assert eps[0].turns == 2 and not eps[0].finished and check_no_drift(tiny_tokenizer, eps[0])


class SlowEcho(Echo):
    """An Echo whose steps wait (like a sandbox running code) and record how many steps ran at once."""

    live = peak = 0
    lock = None

    def step(self, text):
        import time

        with SlowEcho.lock:
            SlowEcho.live += 1
            SlowEcho.peak = max(SlowEcho.peak, SlowEcho.live)
        time.sleep(0.05)
        with SlowEcho.lock:
            SlowEcho.live -= 1
        return super().step(text)


def test_environments_step_concurrently_with_the_same_episodes(tiny_model, tiny_tokenizer):
    import threading

    SlowEcho.lock = threading.Lock()
    engine = HFEngine(tiny_model, tiny_tokenizer)
    sp = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3, suppress_token_ids=SPECIALS)
    runs = {}
    for workers in (1, 8):
        SlowEcho.peak = 0
        envs = [SlowEcho(f"{k}+{k}=") for k in range(8)]
        runs[workers] = (
            run_episodes(engine, tiny_tokenizer, envs, sp, max_turns=5, env_workers=workers),
            SlowEcho.peak,
        )
    (serial, one_at_a_time), (concurrent, overlapped) = runs[1], runs[8]
    assert one_at_a_time == 1 and overlapped > 1
    assert [(e.token_ids, e.model_mask, e.logprobs) for e in serial] == [
        (e.token_ids, e.model_mask, e.logprobs) for e in concurrent
    ]
