"""The judge of an evaluation: a small YAML file, ``--judge FILE``.

    kind: llm                        # llm | reward_model | vpl  (align.config.JudgeConfig.kind)
    base_url: http://127.0.0.1:8000/v1
    model: gpt-4-1106-preview        # the model name at the endpoint
    api_key_env: OPENAI_API_KEY      # the variable holding the key (never the key itself)
    prompt: alpaca_eval              # llm, pairwise harnesses: alpaca_eval (weighted m/M prompt) | pairwise (1/2)
    api: chat                        # llm: chat (/chat/completions) | completions (/completions)
    top_logprobs: 5                  # llm, alpaca_eval prompt: top log-probs asked for (OpenAI allows <= 20 / 5)
    temperature: 1.0                 # llm: alpaca_eval prompt 1.0 (only log-probs are read); graders 0.0
    max_tokens: 2048                 # llm, MT-Bench / Arena-Hard graders: the judgement's length
    timeout: 120                     # llm: seconds per request
    retries: 4                       # llm: retries with backoff (timeouts, 408/409/429, 5xx; Retry-After honoured)
    max_concurrency: 8               # llm: requests in flight at once
    name: gpt4_turbo                 # annotator name in the outputs (default: the file name)

    kind: reward_model               # Bradley-Terry over a scalar reward: P = sigmoid(r(x, a) - r(x, b))
    path: runs/rm                    # an `align train` reward output or a HF sequence classifier with 1 label

    kind: vpl
    path: runs/vpl
    context: users/alice.jsonl       # the user's labelled pairs

The keys of ``align.config.JudgeConfig`` map onto it one to one; the others are the evaluation's. An unknown key, a
wrong type or a missing field is a ``UserError`` naming the file and the key, raised before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from align.config import JudgeConfig
from align.errors import UserError

PAIRWISE_KINDS = ("llm", "reward_model", "vpl")
EXTRA_KEYS = {
    "prompt": str,
    "api": str,
    "top_logprobs": int,
    "temperature": float,
    "max_tokens": int,
    "timeout": float,
    "retries": int,
    "max_concurrency": int,
    "name": str,
}


@dataclass
class JudgeSpec:
    """A judge config file, read and checked: ``judge`` (JudgeConfig) plus the evaluation's settings."""

    judge: JudgeConfig
    source: str
    name: str
    prompt: str = "alpaca_eval"
    api: str = "chat"
    top_logprobs: int = 5
    temperature: float | None = None
    max_tokens: int | None = None
    timeout: float = 120.0
    retries: int = 4
    max_concurrency: int = 8
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        j = self.judge
        if j.kind == "llm":
            return f"llm {j.model} at {j.base_url} ({self.api}, prompt {self.prompt})"
        return f"{j.kind} {j.path}"


def load_judge_config(path: str | os.PathLike) -> JudgeSpec:
    """Read and validate a judge YAML file (see the module docstring)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--judge {p}: judge config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{p}: not a readable YAML judge config: {detail}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of judge keys (kind, base_url, model, path, ...)")
    known = {f.name: f for f in fields(JudgeConfig) if f.name not in EXTRA_KEYS}  # api, max_concurrency: below
    cfg_kwargs, extra = {}, {}
    for key, value in data.items():
        if key in known:
            if value is None:
                continue
            if not isinstance(value, str):
                raise UserError(f"{p}: key '{key}': expected a string, got {type(value).__name__}")
            cfg_kwargs[key] = value
        elif key in EXTRA_KEYS:
            want = EXTRA_KEYS[key]
            ok = (
                isinstance(value, str)
                if want is str
                else (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and (want is float or float(value).is_integer())
                )
            )
            if not ok:
                raise UserError(
                    f"{p}: key '{key}': expected {'a string' if want is str else 'a number'}, got {value!r}"
                )
            extra[key] = want(value)
        else:
            raise UserError(f"{p}: unknown key '{key}' (known: {', '.join(sorted([*known, *EXTRA_KEYS]))})")
    kind = cfg_kwargs.get("kind")
    if kind is None:
        raise UserError(f"{p}: key 'kind' is required ({' | '.join(PAIRWISE_KINDS)})")
    if kind not in PAIRWISE_KINDS:
        raise UserError(f"{p}: key 'kind': {kind!r} is not one of {', '.join(PAIRWISE_KINDS)}")
    judge = JudgeConfig(**cfg_kwargs)
    if kind == "llm":
        for key in ("base_url", "model"):
            if not getattr(judge, key):
                raise UserError(f"{p}: key '{key}' is required for an llm judge")
        if not judge.base_url.startswith(("http://", "https://")):
            raise UserError(f"{p}: key 'base_url': {judge.base_url!r} is not an http(s) URL")
    else:
        if not judge.path:
            raise UserError(f"{p}: key 'path' is required for a {kind} judge (the reward-model folder)")
        if not Path(judge.path).is_dir():
            raise UserError(f"{p}: key 'path': {judge.path!r} is not a folder")
        if kind == "vpl" and (not judge.context or not Path(judge.context).is_file()):
            raise UserError(f"{p}: key 'context': a vpl judge needs the file of the user's labelled pairs")
    spec = JudgeSpec(
        judge=judge, source=str(p), name=extra.pop("name", None) or p.name.removesuffix(".yaml").removesuffix(".yml")
    )
    for key, value in extra.items():
        setattr(spec, key, value)
    if spec.prompt not in ("alpaca_eval", "pairwise"):
        raise UserError(f"{p}: key 'prompt': {spec.prompt!r} is not 'alpaca_eval' or 'pairwise'")
    if spec.api not in ("chat", "completions"):
        raise UserError(f"{p}: key 'api': {spec.api!r} is not 'chat' or 'completions'")
    if not 1 <= spec.top_logprobs <= 20:
        raise UserError(f"{p}: key 'top_logprobs': {spec.top_logprobs} is not in [1, 20]")
    for key in ("max_tokens", "retries", "max_concurrency"):
        v = getattr(spec, key)
        if v is not None and v < (0 if key == "retries" else 1):
            raise UserError(f"{p}: key '{key}': {v} is out of range")
    if spec.timeout <= 0:
        raise UserError(f"{p}: key 'timeout': must be positive")
    return spec


def build_pairwise_judge(spec: JudgeSpec):
    """A judge with ``compare(prompts, a, b) -> P(a > b)`` (and ``compare_detailed`` for the weighted LLM judge)."""
    j = spec.judge
    if j.kind == "llm":
        from align.judges import LLMJudge, WeightedLLMJudge

        if spec.prompt == "alpaca_eval":
            temperature = 1.0 if spec.temperature is None else spec.temperature
            return WeightedLLMJudge(
                j.base_url,
                j.model,
                j.api_key_env,
                api=spec.api,
                top_logprobs=spec.top_logprobs,
                temperature=temperature,
                timeout=spec.timeout,
                retries=spec.retries,
                max_concurrency=spec.max_concurrency,
            )
        return LLMJudge(
            j.base_url,
            j.model,
            j.api_key_env,
            timeout=spec.timeout,
            retries=spec.retries,
            max_concurrency=spec.max_concurrency,
        )
    from align.judges import make_judge

    return make_judge(j).inner


def build_grader(spec: JudgeSpec, default_max_tokens: int):
    """A chat client for free-text judgements (MT-Bench ratings, Arena-Hard verdicts); the judge must be an LLM."""
    j = spec.judge
    if j.kind != "llm":
        raise UserError(
            f"{spec.source}: key 'kind': this benchmark needs an llm judge (free-text judgements), got {j.kind!r}"
        )
    from align.judges import LLMChat

    return LLMChat(
        j.base_url,
        j.model,
        j.api_key_env,
        max_tokens=spec.max_tokens or default_max_tokens,
        temperature=0.0 if spec.temperature is None else spec.temperature,
        timeout=spec.timeout,
        retries=spec.retries,
    )
