"""Multi-turn episodes: the rollout engine talks to an environment; the result is one token sequence per episode
with a mask of the tokens the model emitted (trainable) versus those the environment inserted (masked), and the
model's log-probs of its own tokens.

Environment protocol (the agents' environments implement it):
    reset() -> str                         the first user message (task instruction)
    step(text) -> (str | None, bool)       the model's turn in, the next user message and done out

Tokenisation never drifts between turns: the conversation's ids are built by appending, for each environment
turn, exactly the ids the chat template adds for it (the rendered delta), and the model's own sampled ids
verbatim; ``check_no_drift`` re-renders the whole conversation and compares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from align.rollout import SamplingParams


class Environment(Protocol):
    def reset(self) -> str: ...

    def step(self, text: str) -> tuple[str | None, bool]: ...


@dataclass
class Episode:
    messages: list[dict]
    token_ids: list[int]
    model_mask: list[int]  # 1 where the model emitted the token
    logprobs: list[float]  # the model's log-prob per token (0.0 for environment tokens)
    turns: int = 0
    finished: bool = False  # the environment said done (else the turn limit was hit)
    truncated: bool = False  # ended because another model turn would not fit in the context (max_tokens)
    info: dict = field(default_factory=dict)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def _delta_ids(tokenizer, before: list[dict], after: list[dict], generation_prompt: bool) -> list[int]:
    """Token ids the chat template adds when ``after`` (a continuation of ``before``) is rendered."""
    old = _render(tokenizer, before, False) if before else ""
    new = _render(tokenizer, after, generation_prompt)
    if not new.startswith(old):
        raise ValueError("the chat template re-renders earlier turns differently; multi-turn token masks would drift")
    return tokenizer(new[len(old) :], add_special_tokens=False)["input_ids"]


def in_parallel(fn, items: list, workers: int) -> list:
    """``[fn(x) for x in items]``, up to ``workers`` at a time in threads (environment calls wait on sandbox
    processes or HTTP servers, not on this process), results in order."""
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def run_episodes(
    engine,
    tokenizer,
    envs: list[Environment],
    sampling: SamplingParams,
    max_turns: int = 4,
    system: str | None = None,
    env_workers: int = 16,
    max_tokens: int | None = None,
) -> list[Episode]:
    """Play every environment to done (or ``max_turns`` model turns), batching the model's turns across episodes;
    the environments reset and step concurrently (``env_workers`` at a time). With ``max_tokens`` (the context), an
    episode whose next model turn (``sampling.max_new_tokens`` more tokens) would not fit ends there, marked
    ``truncated``: no episode outgrows what the learner can score."""
    episodes = []
    firsts = in_parallel(lambda env: env.reset(), envs, env_workers)
    for first in firsts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": first}]
        ids = _delta_ids(tokenizer, [], msgs, generation_prompt=True)
        episodes.append(Episode(msgs, ids, [0] * len(ids), [0.0] * len(ids)))
    active = list(range(len(envs)))
    for _ in range(max_turns):
        if max_tokens is not None:
            for i in active:
                ep = episodes[i]
                if len(ep.token_ids) + sampling.max_new_tokens > max_tokens:
                    # the tail past the context is the last observation (environment tokens, never trained): cut it
                    ep.truncated = True
                    ep.token_ids, ep.model_mask = ep.token_ids[:max_tokens], ep.model_mask[:max_tokens]
                    ep.logprobs = ep.logprobs[:max_tokens]
            active = [i for i in active if not episodes[i].truncated]
        if not active:
            break
        outs = engine.generate([episodes[i].token_ids for i in active], n=1, sampling=sampling)
        turns = [(envs[i], group[0].text) for i, group in zip(active, outs)]
        steps = in_parallel(lambda turn: turn[0].step(turn[1]), turns, env_workers)
        still = []
        for i, group, (obs, done) in zip(active, outs, steps):
            ep, c = episodes[i], group[0]
            ep.token_ids += c.token_ids
            ep.model_mask += [1] * len(c.token_ids)
            ep.logprobs += c.logprobs
            ep.turns += 1
            before = ep.messages + [{"role": "assistant", "content": c.text}]
            # the model's ids are kept verbatim; the template's end-of-turn tokens it did not emit are added (masked)
            closing = _closing_ids(tokenizer, ep.messages, c.text, c.token_ids)
            ep.token_ids += closing
            ep.model_mask += [0] * len(closing)
            ep.logprobs += [0.0] * len(closing)
            ep.messages = before
            if done or obs is None:
                ep.finished = bool(done)
                continue
            after = before + [{"role": "user", "content": obs}]
            new = _delta_ids(tokenizer, before, after, generation_prompt=True)
            ep.token_ids += new
            ep.model_mask += [0] * len(new)
            ep.logprobs += [0.0] * len(new)
            ep.messages = after
            still.append(i)
        active = still
    return episodes


def _closing_ids(tokenizer, messages: list[dict], text: str, emitted: list[int]) -> list[int]:
    """Ids that complete the assistant turn after what the model emitted: nothing when it ended with its
    end-of-turn token, the end-of-turn token (and any template suffix) when it stopped on length."""
    head = _render(tokenizer, messages, True)
    turn = _render(tokenizer, messages + [{"role": "assistant", "content": text}], False)[len(head) :]
    turn_ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
    if turn_ids[: len(emitted)] == emitted:
        return turn_ids[len(emitted) :]
    if turn.startswith(text):  # the model's ids are not the canonical tokenisation: close the turn after them
        suffix = turn[len(text) :]
        eos = tokenizer.eos_token
        if emitted and emitted[-1] == tokenizer.eos_token_id and eos and suffix.startswith(eos):
            suffix = suffix[len(eos) :]
        return tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    return []


def check_no_drift(tokenizer, episode: Episode) -> bool:
    """Re-tokenising the rendered conversation gives the episode's ids."""
    open_turn = episode.messages[-1]["role"] != "assistant"  # ended on an observation: the generation prompt follows
    return (
        tokenizer(_render(tokenizer, episode.messages, open_turn), add_special_tokens=False)["input_ids"]
        == episode.token_ids
    )
