"""Judges: preference oracles P(a > b | x), batched and cached, interchangeable in every online trainer and harness.

    judge.compare(prompts, a, b) -> list[float]      P(a_i beats b_i | prompt_i), one per triple

Kinds (``judge.kind`` in a recipe):
    checker        the built-in tasks' exact checker: 1 / 0 / 0.5 (both right or both wrong)
    story          the BabyLlama story goal (align/stories.py): 1/2 + (score(a) - score(b)) / 2
    reward_model   a scalar-reward model folder (an `align train` reward output, or a HF
                   AutoModelForSequenceClassification with 1 label): Bradley-Terry P = sigmoid(r(x, a) - r(x, b))
    vpl            a VPL reward model and one user's labelled context pairs: z = mu of q(z | context),
                   P = sigmoid(r(x, a, z) - r(x, b, z)); the SPO-style scaled reward E_y'[P(y > y' | z)] in [0, 1]
    llm            an LLM over any OpenAI-compatible endpoint, pairwise prompt, P from the log-probs of the two
                   answer tokens, both orders averaged to remove position bias; timeouts, bounded retries with
                   backoff; the API key is read from the environment and never logged
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import time
from typing import Protocol

from align.errors import UserError


class Judge(Protocol):
    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]: ...


class CachedJudge:
    """Memoises P(a > b | x) and counts judge calls (``calls``: triples actually judged)."""

    def __init__(self, inner):
        self.inner, self.cache, self.calls = inner, {}, 0

    @staticmethod
    def _key(p: str, a: str, b: str) -> str:
        return hashlib.sha256(json.dumps([p, a, b]).encode()).hexdigest()

    def compare(self, prompts, a, b):
        keys = [self._key(*t) for t in zip(prompts, a, b)]
        todo = sorted({i for i, k in enumerate(keys) if k not in self.cache}, key=keys.__getitem__)
        seen = {}
        for i in todo:
            seen.setdefault(keys[i], i)
        firsts = list(seen.values())
        if firsts:
            probs = self.inner.compare([prompts[i] for i in firsts], [a[i] for i in firsts], [b[i] for i in firsts])
            self.calls += len(firsts)
            for i, p in zip(firsts, probs):
                self.cache[keys[i]] = float(p)
        return [self.cache[k] for k in keys]

    def added_since(self, n: int) -> dict:
        """The judgements memoised after the first ``n`` (an online iteration saves its own with its rollouts)."""
        return dict(itertools.islice(self.cache.items(), n, None))

    def remember(self, judged: list[dict] | None, rank: int = 0) -> None:
        """Memoise judgements made before the run was resumed (``judged``: one ``added_since`` per process, as saved
        with an iteration's rollouts; None for rollouts saved without them), so that it judges, counts and pays for
        the triples an uninterrupted run would."""
        if judged:
            self.cache.update(judged[rank])


class CheckerJudge:
    """The built-in tasks' checker as a judge (prompts must be built-in task prompts)."""

    def __init__(self, tasks=None):
        from align import tasks as T

        self.by_prompt = T.checker_for(tasks) if tasks is not None else None

    def _task(self, prompt: str):
        from align import tasks as T

        if self.by_prompt is not None and prompt in self.by_prompt:
            return self.by_prompt[prompt]
        task = T.parse_prompt(prompt)
        if task is None:
            raise UserError(f"judge 'checker': {prompt!r} is not a built-in task prompt")
        return task

    def compare(self, prompts, a, b):
        out = []
        for p, x, y in zip(prompts, a, b):
            t = self._task(p)
            cx, cy = t.check(x), t.check(y)
            out.append(1.0 if cx > cy else 0.0 if cx < cy else 0.5)
        return out


class AlignRewardJudge:
    """A reward model written by ``align train`` (trainer: reward). BT: P(a > b) = sigmoid(r(x, a) - r(x, b)).
    VPL: the same with r(x, y, z) and z = mu of q(z | the user's context pairs) (Poddar et al. 2024, Sec. 4.3)."""

    def __init__(self, path: str, context_pairs: list[tuple[str, str, str]] | None = None, batch_size: int = 64):
        import torch

        from align.models import inference_device
        from align.reward_model import RewardModel

        model = RewardModel.load(path).to(inference_device()).eval()
        if model.backbone.device.type == "cuda" and torch.cuda.is_bf16_supported():
            model.backbone.to(torch.bfloat16)  # the heads stay fp32 (embeddings are pooled in fp32)
        self.model, self.batch_size, self.torch = model, batch_size, torch
        self.z = None
        if self.model.cfg["kind"] == "vpl":
            if not context_pairs:
                raise UserError(f"judge.context: the VPL model {path!r} needs the user's labelled context pairs")
            # no more context than training showed the encoder (its attention pools a set of that size); the first
            # pairs of the file are used (models saved before this bound was recorded take them all)
            context_pairs = context_pairs[: self.model.cfg.get("context_pairs") or len(context_pairs)]
            self.context_used = len(context_pairs)
            with torch.no_grad():
                ew = self.model.embed([p + c for p, c, _ in context_pairs])
                el = self.model.embed([p + r for p, _, r in context_pairs])
                self.z, _ = self.model.posterior(
                    ew[None], el[None], torch.ones(1, len(context_pairs), dtype=torch.bool, device=ew.device)
                )

    def rewards(self, prompts: list[str], responses: list[str]) -> list[float]:
        with self.torch.no_grad():
            e = self.model.embed([p + r for p, r in zip(prompts, responses)], self.batch_size)
            return self.model.reward(e, None if self.z is None else self.z.expand(len(e), -1)).tolist()

    def compare(self, prompts, a, b):
        ra, rb = self.rewards(prompts, a), self.rewards(prompts, b)
        return [1 / (1 + math.exp(-(x - y))) for x, y in zip(ra, rb)]

    def scaled_rewards(self, prompt: str, responses: list[str]) -> list[float]:
        """SPO-style scaled reward of each response, E_{y'}[P(y > y' | z)] over the other responses (in [0, 1])."""
        r = self.rewards([prompt] * len(responses), responses)
        n = len(r)
        return [sum(1 / (1 + math.exp(-(r[i] - r[j]))) for j in range(n) if j != i) / max(n - 1, 1) for i in range(n)]


def read_context(path: str) -> list[tuple[str, str, str]]:
    """A user's labelled pairs (rows with prompt/chosen/rejected, any format `align train` reads) for a VPL judge."""
    from types import SimpleNamespace

    from align.data import normalise, read_rows

    cfg = SimpleNamespace(
        format="auto",
        prompt_key="prompt",
        chosen_key="chosen",
        rejected_key="rejected",
        drop_invalid=False,
        builtin_size=0,
        builtin_families=[],
        builtin_sloppy=0.0,
    )
    _, triples = normalise(read_rows(path, cfg), cfg, path, sft=False)
    return [(p if isinstance(p, str) else str(p), c, r) for p, c, r in triples]


class RewardModelJudge:
    """Bradley-Terry over a scalar reward model: P(a > b) = sigmoid(r(x, a) - r(x, b))."""

    def __init__(self, path: str, batch_size: int = 32):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not os.path.isdir(path):
            raise UserError(f"judge.path: {path!r} is not a reward-model folder")
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        from align.models import for_inference

        self.model = for_inference(AutoModelForSequenceClassification.from_pretrained(path))
        if self.model.config.num_labels != 1:
            raise UserError(f"judge.path: {path!r} has {self.model.config.num_labels} labels; a reward model has 1")
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.batch_size, self.torch = batch_size, torch

    def rewards(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        with self.torch.no_grad():
            for s in range(0, len(prompts), self.batch_size):
                enc = self.tok(
                    [p + r for p, r in zip(prompts[s : s + self.batch_size], responses[s : s + self.batch_size])],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                ).to(self.model.device)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def compare(self, prompts, a, b):
        ra, rb = self.rewards(prompts, a), self.rewards(prompts, b)
        return [1 / (1 + math.exp(-(x - y))) for x, y in zip(ra, rb)]


PAIRWISE_PROMPT = (
    "You are comparing two responses to the same instruction. Pick the better one: helpful, correct, concise.\n\n"
    "## Instruction\n{prompt}\n\n## Response 1\n{first}\n\n## Response 2\n{second}\n\n"
    "Answer with a single character: 1 if Response 1 is better, 2 if Response 2 is better.\nAnswer:"
)


class LLMJudge:
    """Pairwise judge over an OpenAI-compatible endpoint: /v1/completions with the pairwise prompt, or
    /v1/chat/completions with it as the user message (``api``); P from the log-probs of '1' vs '2'.

    Transport: one pooled HTTP client (keep-alive connections, httpx), at most ``max_concurrency`` requests in flight;
    429/408/409/5xx and connection errors are retried up to ``retries`` times, waiting what the server's Retry-After
    says (seconds or an HTTP date) or else ``backoff * 2^attempt``, with +-25 % jitter so retrying clients spread out.
    Each triple's result depends only on the server's answers for it, so concurrent and serial calls give identical
    results whatever order the answers arrive in."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        template: str = PAIRWISE_PROMPT,
        max_concurrency: int = 8,
        api: str = "completions",
    ):
        if not base_url:
            raise UserError("judge.base_url: required for an LLM judge")
        if api not in ("chat", "completions"):
            raise UserError(f"judge.api: {api!r} is not 'chat' or 'completions'")
        self.base_url, self.api = base_url.rstrip("/"), api
        self.url = self.base_url + ("/chat/completions" if api == "chat" else "/completions")
        self.model, self.timeout, self.retries, self.backoff, self.template = model, timeout, retries, backoff, template
        self.max_concurrency = max(1, int(max_concurrency))
        self._key = os.environ.get(api_key_env, "")  # never logged, never saved
        self._client = None
        self._jitter = random.Random()  # timing only: never the global RNG

    def __repr__(self) -> str:  # keep the key out of any log that prints the judge
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r})"

    @property
    def client(self):
        if self._client is None:
            import httpx

            n = self.max_concurrency
            self._client = httpx.Client(
                timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            )
        return self._client

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff * 2**attempt
        if retry_after:
            try:
                delay = float(retry_after)
            except ValueError:
                from email.utils import parsedate_to_datetime

                try:
                    delay = parsedate_to_datetime(retry_after).timestamp() - time.time()
                except (TypeError, ValueError):
                    pass
        return max(0.0, delay) * self._jitter.uniform(0.75, 1.25)

    def _post(self, body: dict) -> dict:
        import httpx

        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = None
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                r = self.client.post(self.url, json=body, headers=headers)
                if r.status_code < 400:
                    return r.json()
                last = f"HTTP {r.status_code}"
                if r.status_code not in (408, 409, 429) and r.status_code < 500:
                    raise RuntimeError(f"LLM judge at {self.url}: {last} (not retried)")
                retry_after = r.headers.get("Retry-After")
            except (httpx.TransportError, ValueError) as e:  # connection, timeout, a body that is not JSON
                last = type(e).__name__
            if attempt < self.retries:
                time.sleep(self._wait(attempt, retry_after))
        raise RuntimeError(f"LLM judge at {self.url}: no valid answer after {self.retries + 1} attempts ({last})")

    def map(self, fn, items: list) -> list:
        """``[fn(x) for x in items]`` with at most ``max_concurrency`` calls in flight, results in order."""
        if self.max_concurrency == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _tops_of(self, reply: dict) -> dict:
        """token -> log-prob at the first generated position, from a completions or a chat reply."""
        try:
            lp = reply["choices"][0]["logprobs"]
            if self.api == "chat":
                return {t["token"]: t["logprob"] for t in lp["content"][0]["top_logprobs"]}
            return lp["top_logprobs"][0] or {}
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"LLM judge at {self.url}: malformed reply (no top log-probs)") from None

    def _first_token_tops(self, text: str) -> dict:
        """token -> log-prob of the first token the model would answer ``text`` with (greedy, one token)."""
        if self.api == "chat":
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": 20,
            }
        else:
            body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0, "logprobs": 20}
        return self._tops_of(self._post(body))

    def _p_first(self, prompt: str, first: str, second: str) -> float:
        tops = self._first_token_tops(self.template.format(prompt=prompt, first=first, second=second))
        p1 = sum(math.exp(v) for k, v in tops.items() if k.strip() == "1")
        p2 = sum(math.exp(v) for k, v in tops.items() if k.strip() == "2")
        return 0.5 if p1 + p2 == 0 else p1 / (p1 + p2)

    def compare(self, prompts, a, b):
        # both orders: P(a > b) = (P(first=a wins) + P(second=a wins in the swapped order)) / 2
        calls = [(p, x, y) for p, x, y in zip(prompts, a, b)] + [(p, y, x) for p, x, y in zip(prompts, a, b)]
        firsts = self.map(lambda t: self._p_first(*t), calls)
        n = len(prompts)
        return [(firsts[i] + (1 - firsts[n + i])) / 2 for i in range(n)]


def make_judge(judge_cfg, tasks=None) -> CachedJudge:
    if judge_cfg.kind == "checker":
        inner = CheckerJudge(tasks)
    elif judge_cfg.kind == "story":
        from align.stories import StoryJudge

        inner = StoryJudge(judge_cfg.goal)
    elif judge_cfg.kind == "reward_model":
        from align.reward_model import CONFIG_FILE

        path = judge_cfg.path or ""
        ours = os.path.isfile(os.path.join(path, CONFIG_FILE))
        inner = AlignRewardJudge(path) if ours else RewardModelJudge(path)
    elif judge_cfg.kind == "vpl":
        if not judge_cfg.path or not os.path.isdir(judge_cfg.path):
            raise UserError(f"judge.path: {judge_cfg.path!r} is not a VPL reward-model folder")
        if not judge_cfg.context:
            raise UserError("judge.context: a VPL judge needs the file of the user's labelled pairs")
        inner = AlignRewardJudge(judge_cfg.path, read_context(judge_cfg.context))
    elif judge_cfg.kind == "function":
        from align.rewards import RewardFunctions

        return RewardFunctions(judge_cfg.functions, judge_cfg.weights, resolve=load_reward_function)
    elif judge_cfg.kind == "llm":
        inner = LLMJudge(
            judge_cfg.base_url or "",
            judge_cfg.model or "",
            judge_cfg.api_key_env,
            max_concurrency=judge_cfg.max_concurrency,
            api=judge_cfg.api,
        )
    else:
        raise UserError(f"judge.kind {judge_cfg.kind!r}: an online trainer needs a judge")
    return CachedJudge(inner)


# ----------------------------------------------------------------------------------------------------------------
# AlpacaEval-style weighted judge (additive): one answer token, P from its log-probs, both orders averaged.

ALPACA_EVAL_SYSTEM = (
    "You are a careful, impartial evaluator of AI assistants. You compare the answers that different language "
    "models gave to the same instruction and pick the one people would prefer; your picks are used to rank the "
    "models on a public leaderboard."
)
"""System message of the weighted AlpacaEval-style judge (our wording, in the style of alpaca_eval's
``weighted_alpaca_eval_gpt4_turbo`` annotator)."""

ALPACA_EVAL_TEMPLATE = (
    "We are ranking language models. Below is one instruction that was given to two models and the answer each "
    "model wrote. Decide which answer a thoughtful person would prefer: the one that follows the instruction more "
    "faithfully and is more helpful, accurate and clearly presented." + '''

## The instruction

{
    "instruction": """{instruction}""",
}

## The answers

The answers are listed in no particular order. Each carries a short model identifier.

{
    {
        "model_identifier": "m",
        "output": """{output_1}"""
    },
    {
        "model_identifier": "M",
        "output": """{output_2}"""
    }
}

## What to do

'''
    "Pick the model whose answer is better and reply with its identifier alone. A program reads your reply as the "
    "name of the winning model, so it must be exactly one of the two identifiers, m or M, and nothing else (no "
    "quotes, spaces, punctuation or explanation)."
    + """

## Identifier of the better model
"""
)
"""User message of the weighted AlpacaEval-style judge. Placeholders ``{instruction}``, ``{output_1}`` (identifier
``m``) and ``{output_2}`` (identifier ``M``) are filled in one pass, so braces in the texts are left alone."""


def fill_template(template: str, **values: str) -> str:
    """Replace ``{name}`` placeholders for the given names in one pass (other braces, and braces inside the values,
    are kept as they are)."""
    import re

    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


SCORE_PROMPT = (
    "Rate the response to the instruction: helpful, correct, concise.\n\n## Instruction\n{prompt}\n\n"
    "## Response\n{response}\n\nAnswer with a single digit from 0 (worst) to 9 (best).\nScore:"
)


class LLMScorer(LLMJudge):
    """Pointwise LLM judge (a reward function: ``judge.functions: ["llm:MODEL@BASE_URL"]``, or ``llm-chat:`` for the
    chat API): the score of a response is the expected digit under the model's first-token log-probs over '0'..'9',
    divided by 9 (in [0, 1]; 0.5 when no digit is among the top log-probs). Same transport as the pairwise judge:
    pooled client, retries, at most ``max_concurrency`` requests in flight, results independent of their order."""

    def __init__(self, base_url: str, model: str, template: str = SCORE_PROMPT, **kw):
        super().__init__(base_url, model, template=template, **kw)

    def _score(self, prompt: str, response: str) -> float:
        tops = self._first_token_tops(self.template.format(prompt=prompt, response=response))
        p = [sum(math.exp(v) for k, v in tops.items() if k.strip() == str(d)) for d in range(10)]
        return 0.5 if sum(p) == 0 else sum(d * x for d, x in enumerate(p)) / sum(p) / 9

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.map(lambda t: self._score(*t), list(zip(prompts, responses)))


class WeightedLLMJudge(LLMJudge):
    """AlpacaEval-style weighted LLM judge over an OpenAI-compatible endpoint (``/chat/completions`` or
    ``/completions``).

    The judge answers with one token naming the better output (``m`` = the first shown, ``M`` = the second, as in
    alpaca_eval's ``weighted_alpaca_eval_gpt4_turbo``). One order gives P(first better) = p(m) / (p(m) + p(M)) from
    the top log-probs of that token (alpaca_eval's ``logprob_parser`` with ``is_binarize: false``); an order where
    neither token is among the top log-probs gives no information (alpaca_eval: NaN). ``compare`` judges both
    orders and averages them, P(a > b) = (P_first(a, b) + 1 - P_first(b, a)) / 2, using the one informative order
    when only one is, and NaN when neither is.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        *,
        api: str = "chat",
        top_logprobs: int = 5,
        temperature: float = 1.0,
        system: str = ALPACA_EVAL_SYSTEM,
        template: str = ALPACA_EVAL_TEMPLATE,
        tokens: tuple[str, str] = ("m", "M"),
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_concurrency: int = 8,
    ):
        super().__init__(
            base_url,
            model,
            api_key_env,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            template=template,
            max_concurrency=max_concurrency,
            api=api,
        )
        self.top_logprobs, self.temperature, self.system, self.tokens = top_logprobs, temperature, system, tokens

    def p_first_or_none(self, instruction: str, first: str, second: str) -> float | None:
        """P(the first output is better) from one call; None when neither identifier is among the top log-probs."""
        user = fill_template(self.template, instruction=instruction, output_1=first, output_2=second)
        if self.api == "chat":
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": user}
            ]
            body = {
                "model": self.model,
                "messages": messages,
                "max_tokens": 1,
                "temperature": self.temperature,
                "logprobs": True,
                "top_logprobs": self.top_logprobs,
            }
        else:
            prompt = (self.system + "\n\n" if self.system else "") + user
            body = {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": 1,
                "temperature": self.temperature,
                "logprobs": self.top_logprobs,
            }
        tops = dict(self._tops_of(self._post(body)))
        t1, t2 = self.tokens
        p1 = sum(math.exp(v) for k, v in tops.items() if isinstance(k, str) and k.strip() == t1)
        p2 = sum(math.exp(v) for k, v in tops.items() if isinstance(k, str) and k.strip() == t2)
        return None if p1 + p2 == 0 else p1 / (p1 + p2)

    def compare_detailed(self, prompts, a, b) -> list[dict]:
        """Per triple: ``p`` = P(a > b) (NaN if neither order was informative), ``p_a_first`` = P(first better) with a
        shown first, ``p_b_first`` = the same with b shown first (None = not informative)."""
        calls = [(p, x, y) for p, x, y in zip(prompts, a, b)] + [(p, y, x) for p, x, y in zip(prompts, a, b)]
        firsts = self.map(lambda t: self.p_first_or_none(*t), calls)
        out = []
        for fx, fy in zip(firsts[: len(prompts)], firsts[len(prompts) :]):
            votes = [v for v in (fx, None if fy is None else 1 - fy) if v is not None]
            out.append({"p": sum(votes) / len(votes) if votes else math.nan, "p_a_first": fx, "p_b_first": fy})
        return out

    def compare(self, prompts, a, b):
        return [d["p"] for d in self.compare_detailed(prompts, a, b)]


class LLMChat(LLMJudge):
    """Free-text chat completions from an OpenAI-compatible ``/chat/completions`` endpoint (the graders of MT-Bench
    and Arena-Hard): same timeouts, bounded retries with backoff and key handling as ``LLMJudge``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        *,
        max_tokens: int = 2048,
        temperature: float = 0.0,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 0.5,
    ):
        super().__init__(base_url, model, api_key_env, timeout=timeout, retries=retries, backoff=backoff)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_tokens, self.temperature = max_tokens, temperature

    def chat(self, messages: list[dict]) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        reply = self._post(body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"LLM judge at {self.url}: malformed reply (no message content)") from None
        return content if isinstance(content, str) else ""


# ------------------------------------------------------------------------------ judges as pointwise reward functions


def load_reward_function(spec: str, load_models: bool = True):
    """A reward function (``judge.functions`` entry): ``reward_model:PATH`` and ``llm:MODEL@URL`` / ``llm-chat:``
    are judges scoring pointwise (below); anything else is the user's callable (``align.rewards.load_function``).
    ``load_models=False`` (a dry run) checks a reward model's folder without loading it."""
    from align.rewards import load_function

    if spec.startswith("reward_model:"):
        path = spec[len("reward_model:") :]
        if not os.path.isdir(path):
            raise UserError(f"judge.functions: {spec!r}: not a reward-model folder")
        return reward_model_function(path) if load_models else _unloaded_reward_model
    if spec.startswith(("llm:", "llm-chat:")):
        return llm_function(spec)
    return load_function(spec)


def _unloaded_reward_model(prompts: list[str], completions: list[str], **_) -> list[float]:
    raise RuntimeError("a reward model named in a dry run is checked, not loaded")


_unloaded_reward_model.__name__ = "reward_model"


def reward_model_function(path: str):
    """A reward model as a reward function (``judge.functions: ["reward_model:PATH"]``): its scalar r(x, y) for each
    completion, pointwise. PATH is a sequence-classification folder (one label) or a Bradley-Terry model written by
    ``align train`` (trainer: reward); the pairwise judge.kind reward_model compares the same scores instead."""
    from align.reward_model import CONFIG_FILE

    judge = AlignRewardJudge(path) if os.path.isfile(os.path.join(path, CONFIG_FILE)) else RewardModelJudge(path)

    def reward_model(prompts: list[str], completions: list[str], **_) -> list[float]:
        return judge.rewards(list(prompts), list(completions))

    return reward_model


def llm_function(spec: str, max_concurrency: int = 8):
    """An LLM judge's pointwise score as a reward function: ``"llm:MODEL@BASE_URL"`` (/v1/completions) or
    ``"llm-chat:MODEL@BASE_URL"`` (/v1/chat/completions), the key from $OPENAI_API_KEY (align.judges.LLMScorer)."""
    kind, _, rest = spec.partition(":")
    model, at, url = rest.partition("@")
    if not model or not at or not url.startswith(("http://", "https://")):
        raise UserError(f"judge.functions: {spec!r}: expected '{kind}:MODEL@http(s)://HOST/v1'")
    scorer = LLMScorer(url, model, api="chat" if kind == "llm-chat" else "completions", max_concurrency=max_concurrency)

    def llm_judge(prompts: list[str], completions: list[str], **_) -> list[float]:
        return scorer.score(list(prompts), list(completions))

    return llm_judge
