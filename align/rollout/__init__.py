"""The shared rollout engine: one small protocol, backends imported lazily by name.

    engine = make_engine(recipe.rollout, model, tokenizer, source=path, placement=placement_of(accelerator))
    samples = engine.generate(prompts, n=4, sampling=SamplingParams(max_new_tokens=32, temperature=1.0, seed=0))
    samples[i][k].token_ids / .text / .logprobs / .finish_reason      # prompt i, sample k
    engine.sleep()                                                    # before the update: free the engine's memory
    engine.update_weights(model)                                      # after it (wakes the weights first)
    engine.wake()                                                     # generate() wakes the rest itself

Backends: ``hf`` (transformers, the live module), ``vllm`` with ``rollout.vllm.mode`` ``colocate`` (an engine in
every training process) or ``server`` (``align vllm-serve`` processes over HTTP). ``source`` is the folder or hub id
the policy was loaded from, so a vLLM engine loads it from there instead of a copy written by every rank.

Prompts are strings (tokenised with the tokenizer's special tokens), message lists (chat template with the
generation prompt) or token-id lists. ``logprobs`` are the model's log-probabilities of the sampled tokens under
the unmodified distribution (temperature 1, no top-k/top-p), i.e. what a trainer recomputes.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union

Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    suppress_token_ids: list[int] = field(default_factory=list)  # never sampled (e.g. pad/bos mid-answer)
    seed: int | None = None
    top_logprobs: int = 0  # also return the k most likely tokens (raw distribution) at every position


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    top_logprobs: list[dict[int, float]] | None = None  # per position: token id -> log-prob (k most likely)


class RolloutEngine(Protocol):
    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingParams | None = None
    ) -> list[list[Completion]]: ...

    def update_weights(self, model) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


@dataclass(frozen=True)
class Placement:
    """Where this process sits: its rank among ``world`` training processes, its rank on the machine, its device."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"


def placement_of(accelerator) -> Placement:
    return Placement(
        accelerator.process_index, accelerator.local_process_index, accelerator.num_processes, str(accelerator.device)
    )


BACKENDS = {
    "hf": "align.rollout.hf:HFEngine",
    "vllm": "align.rollout.vllm:VLLMEngine",
    "vllm-server": "align.rollout.vllm_server:VLLMServerEngine",
}


def make_engine(rollout_cfg, model, tokenizer, *, source: str | None = None, placement: Placement | None = None):
    """The backend named by ``rollout_cfg.backend`` (and ``rollout_cfg.vllm.mode``); its module is imported only
    here. ``source``: the folder or hub id ``model`` was loaded from (vLLM starts from it); ``placement``: this
    process's rank and device (default: one process)."""
    name = rollout_cfg.backend
    settings = getattr(rollout_cfg, "vllm", None)
    if name == "vllm" and settings is not None and settings.mode == "server":
        name = "vllm-server"
    module, _, cls = BACKENDS[name].partition(":")
    engine_cls = getattr(importlib.import_module(module), cls)
    if name == "hf":
        return engine_cls(model, tokenizer, batch_size=rollout_cfg.batch_size)
    return engine_cls(
        model, tokenizer, batch_size=rollout_cfg.batch_size, settings=settings, source=source, placement=placement
    )


def sampling_from(rollout_cfg, **overrides) -> SamplingParams:
    base = dict(
        max_new_tokens=rollout_cfg.max_new_tokens,
        temperature=rollout_cfg.temperature,
        top_p=rollout_cfg.top_p,
        top_k=rollout_cfg.top_k,
    )
    base.update(overrides)
    return SamplingParams(**base)


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if len(prompt) and isinstance(prompt[0], dict):
        out = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return list(prompt)
