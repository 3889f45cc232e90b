"""Pieces the generation harnesses share (AlpacaEval, MT-Bench, Arena-Hard): argument checks that fail before anything
is written, atomic and append-only result files that a killed run resumes from, the policy behind the rollout engine,
chat prompts, progress lines on stderr."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from align.errors import UserError
from align.runs import atomic_write


def progress(tag: str, message: str) -> None:
    print(f"[{tag}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------- checks


def parse_positive_int(value, option: str) -> int | None:
    """``--limit`` / ``--max-new-tokens`` given as text: None stays None; anything but a positive integer is a
    UserError."""
    if value is None:
        return None
    try:
        n = int(str(value))
    except ValueError:
        raise UserError(f"{option} {value!r}: not an integer") from None
    if n < 1:
        raise UserError(f"{option} {value!r}: must be at least 1")
    return n


def parse_float(value, option: str, lo: float | None = None, hi: float | None = None) -> float | None:
    if value is None:
        return None
    try:
        x = float(str(value))
    except ValueError:
        raise UserError(f"{option} {value!r}: not a number") from None
    if x != x or (lo is not None and x < lo) or (hi is not None and x > hi):
        raise UserError(f"{option} {value!r}: must be in [{lo}, {hi}]")
    return x


def check_output_dir(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: exists and is not a folder")
    return out


def check_model(model: str) -> None:
    """Fail early for a --model that is neither a model folder (a training run's output folder is one) nor
    ``tiny:*``."""
    from align.models import check_model_path

    if not model.startswith("tiny:"):
        p = Path(model)
        if not p.is_dir():
            raise UserError(f"--model {model!r}: not a model folder (not found)")
    try:
        check_model_path(model)
    except UserError as e:
        raise UserError(str(e).replace("model.name_or_path", "--model", 1)) from None


def default_model_name(model: str) -> str:
    return model.replace(":", "-") if model.startswith("tiny:") else Path(model).resolve().name


# ----------------------------------------------------------------------------------------------------------- files


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` through a temporary file and a rename: a reader (or a killed run) never sees half a
    file."""
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def read_json_list(path: Path, what: str) -> list[dict]:
    """A JSON list of objects written earlier by this harness (resume); an unreadable one is a UserError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(
            f"{path}: existing {what} is not readable JSON ({(str(e).splitlines() or ['?'])[0]}); "
            "remove it or pick another --output"
        ) from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: existing {what} is not a JSON list of objects; remove it or pick another --output")
    return data


def read_data_jsonl(path: Path, what: str) -> list[dict]:
    """The rows of a JSONL data file (questions, references, prompts); a missing or malformed file is a UserError."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    rows = []
    try:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    raise UserError(f"{path}: line {i + 1}: not JSON") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}: line {i + 1}: expected an object")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the {what} ({e})") from None
    return rows


def read_jsonl(path: Path, what: str) -> list[dict]:
    """Rows of an append-only JSONL file; a torn last line (a run killed mid-write) is dropped and rewritten."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: existing {what} is not readable ({e}); remove it or pick another --output") from None
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # the torn tail of a killed run: drop it
                _rewrite_jsonl(path, rows)
                break
            raise UserError(
                f"{path}: line {i + 1} of the existing {what} is not JSON; remove it or pick another --output"
            ) from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {i + 1} of the existing {what} is not an object")
        rows.append(row)
    return rows


def _rewrite_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append whole lines and fsync: a kill leaves at most a torn last line, which ``read_jsonl`` drops."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not text:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------- generation


class Generator:
    """The evaluated policy behind the shared rollout engine: conversations (lists of chat messages) -> answers."""

    def __init__(self, model: str, backend: str = "hf", batch_size: int = 16, seed: int = 0):
        from align.config import ModelConfig, RolloutConfig
        from align.models import load_policy
        from align.rollout import make_engine

        self.model_path, self.seed = model, seed
        from align.models import for_inference

        policy, tok = load_policy(ModelConfig(name_or_path=model, dtype="auto", attn_implementation=None), seed=seed)
        self.tok = tok
        self.engine = make_engine(RolloutConfig(backend=backend, batch_size=batch_size), for_inference(policy), tok)
        self.chat = bool(getattr(tok, "chat_template", None))
        specials = (tok.pad_token_id, tok.bos_token_id, tok.unk_token_id)
        self.suppress = sorted({i for i in specials if i is not None and i != tok.eos_token_id})

    def prompt(self, messages: list[dict]):
        """The chat template when the tokenizer has one; otherwise the bare text of a single user turn, or a plain
        ``User:`` / ``Assistant:`` transcript for several turns."""
        if self.chat:
            return messages
        if len(messages) == 1:
            return messages[0]["content"]
        parts = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
        return "\n\n".join(parts) + "\n\nAssistant:"

    def generate(
        self, conversations: list[list[dict]], max_new_tokens: int, temperature: float = 0.0
    ) -> list[tuple[str, int]]:
        """(answer text, generated tokens) per conversation, greedy when ``temperature`` is 0."""
        from align.rollout import SamplingParams

        if not conversations:
            return []
        sp = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=self.seed, suppress_token_ids=self.suppress
        )
        out = self.engine.generate([self.prompt(c) for c in conversations], n=1, sampling=sp)
        return [(g[0].text.strip(), len(g[0].token_ids)) for g in out]

    def answer_turns(
        self, questions: list[list[str]], max_new_tokens: int, temperatures: list[float]
    ) -> list[list[tuple[str, int]]]:
        """Multi-turn answers: turn k of every question is generated (batched, grouped by temperature) with the
        conversation so far, so the second turn sees the model's own first answer. Returns (text, tokens) per turn."""
        answers: list[list[tuple[str, int]]] = [[] for _ in questions]
        for t in range(max((len(q) for q in questions), default=0)):
            live = [i for i, q in enumerate(questions) if len(q) > t]
            for temp in sorted({temperatures[i] for i in live}):
                group = [i for i in live if temperatures[i] == temp]
                convs = []
                for i in group:
                    msgs = []
                    for k in range(t):
                        msgs += [
                            {"role": "user", "content": questions[i][k]},
                            {"role": "assistant", "content": answers[i][k][0]},
                        ]
                    convs.append(msgs + [{"role": "user", "content": questions[i][t]}])
                for i, a in zip(group, self.generate(convs, max_new_tokens, temp)):
                    answers[i].append(a)
        return answers


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def judge_error(e: Exception, where: Path) -> UserError:
    """A judge that failed after its retries: one clear line; what is already in ``where`` is kept for the resume."""
    return UserError(
        f"{(str(e).splitlines() or [type(e).__name__])[0]}; finished rows are kept in {where}: rerun the "
        "same command to resume"
    )


def map_parallel(fn, items: list, parallel: int = 1) -> list:
    """``[fn(x) for x in items]`` with up to ``parallel`` calls in flight (judge requests), results in input order."""
    if parallel <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(parallel, len(items))) as pool:
        return list(pool.map(fn, items))
