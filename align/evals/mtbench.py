"""MT-Bench: ``align eval mtbench --model PATH --judge JUDGE.yaml --output DIR [--limit N]``.

Over the shared FastChat data (``../shared/data/benchmarks/mt_bench``: ``question.jsonl`` with 80 two-turn questions
in 8 categories, ``reference_answer_gpt-4.jsonl`` and ``judge_prompts.jsonl``), following FastChat's ``llm_judge``:

1. Answers: both turns through the shared rollout engine, the second turn seeing the question, the model's first
   answer and the follow-up (chat template when the tokenizer has one). Sampling temperature per category as FastChat
   (writing/roleplay 0.7, stem/humanities 0.1, the others greedy) unless ``--temperature`` is given.
2. Single-answer grading by an LLM judge (``kind: llm`` config) with the judge prompts shipped in the data:
   ``single-v1`` for turn 1 and ``single-v1-multi-turn`` for turn 2; for math, reasoning and coding the reference
   answers go in (``single-math-v1``, ``single-math-v1-multi-turn``). The judge's system prompt and user prompt are
   sent to ``/chat/completions`` (temperature 0, ``max_tokens`` 2048 by default).
3. The rating: the last ``[[x]]`` in the judgement, else ``Rating: x``, else the last ``[x]`` (FastChat reads the
   first ``[[x]]``, then ``[x]``); a number outside [1, 10] or no number is ``score: -1`` (FastChat's marker), left
   out of every mean and counted in ``n_unparsed``.
4. Files: ``model_answers.jsonl`` (FastChat's answer format: question_id, answer_id, model_id,
   choices[0].turns, tstamp), ``judgments.jsonl`` (FastChat's single-grading format: question_id, model,
   judge = [judge name, prompt name], user_prompt, judgment, score, turn, tstamp; plus category), ``results.json``
   (mean score overall, per turn, and per category with its turns) and ``report.md`` / ``report.png``.

Resumable: answers and judgements are appended line by line (fsynced; a torn last line is dropped), and a rerun skips
questions already answered and (question, turn) pairs already judged by the same judge.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from align.errors import UserError
from align.evals.common import (
    Generator,
    Timer,
    append_jsonl,
    check_model,
    check_output_dir,
    default_model_name,
    judge_error,
    map_parallel,
    parse_float,
    parse_positive_int,
    progress,
    read_data_jsonl,
    read_jsonl,
    write_json_atomic,
)

NEED_REF_CATS = ("math", "reasoning", "coding")
"""Categories graded against the reference answers (FastChat's ``NEED_REF_CATS``)."""
TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
"""FastChat's sampling temperature per category (others: 0.7)."""
PROMPT_NAMES = {
    (False, 1): "single-v1",
    (True, 1): "single-math-v1",
    (False, 2): "single-v1-multi-turn",
    (True, 2): "single-math-v1-multi-turn",
}
ANSWERS_FILE, JUDGMENTS_FILE, RESULTS_FILE = "model_answers.jsonl", "judgments.jsonl", "results.json"
TAG = "eval mtbench"

_DOUBLE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_RATING = re.compile(r"[Rr]ating\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)(?:\s*/\s*10)?")
_SINGLE = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]")


def parse_rating(judgment: str) -> float | None:
    """The 1-10 rating of a single-answer judgement, or None (see the module docstring)."""
    if not isinstance(judgment, str):
        return None
    for pattern in (_DOUBLE, _RATING, _SINGLE):
        found = pattern.findall(judgment)
        if found:
            value = float(found[-1])
            return value if 1.0 <= value <= 10.0 else None
    return None


# ----------------------------------------------------------------------------------------------------------- data


def default_bench_dir() -> Path | None:
    from align.paths import shared_data_dir

    data = shared_data_dir()
    return data / "benchmarks" / "mt_bench" if data else None


def load_bench(folder: str | Path) -> tuple[list[dict], dict, dict]:
    """(questions, reference turns by question id, judge prompts by name) from an MT-Bench folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--bench-dir {folder}: MT-Bench folder not found")
    questions = read_data_jsonl(folder / "question.jsonl", "MT-Bench questions")
    for i, q in enumerate(questions):
        turns = q.get("turns")
        if (
            "question_id" not in q
            or not isinstance(q.get("category"), str)
            or not isinstance(turns, list)
            or not turns
            or not all(isinstance(t, str) and t for t in turns)
        ):
            raise UserError(
                f"{folder / 'question.jsonl'}: line {i + 1}: expected question_id, category and a list of turns"
            )
    if len({q["question_id"] for q in questions}) != len(questions):
        raise UserError(f"{folder / 'question.jsonl'}: duplicate question_id")
    refs = {}
    ref_path = next(
        (
            p
            for p in (folder / "reference_answer_gpt-4.jsonl", folder / "reference_answer" / "gpt-4.jsonl")
            if p.is_file()
        ),
        None,
    )
    if ref_path is not None:
        for i, r in enumerate(read_data_jsonl(ref_path, "reference answers")):
            try:
                refs[r["question_id"]] = [t if isinstance(t, str) else t["content"] for t in r["choices"][0]["turns"]]
            except (KeyError, IndexError, TypeError):
                raise UserError(f"{ref_path}: line {i + 1}: expected question_id and choices[0].turns") from None
    prompts = {}
    for i, p in enumerate(read_data_jsonl(folder / "judge_prompts.jsonl", "judge prompts")):
        if not all(isinstance(p.get(k), str) for k in ("name", "system_prompt", "prompt_template")):
            raise UserError(
                f"{folder / 'judge_prompts.jsonl'}: line {i + 1}: expected name, system_prompt, prompt_template"
            )
        prompts[p["name"]] = p
    missing = [n for n in PROMPT_NAMES.values() if n not in prompts]
    if missing:
        raise UserError(f"{folder / 'judge_prompts.jsonl'}: no judge prompt named {missing[0]!r}")
    return questions, refs, prompts


def judge_messages(q: dict, answers: list[str], turn: int, refs: dict, prompts: dict) -> tuple[str, list[dict]]:
    """(prompt name, chat messages) grading ``turn`` (1 or 2) of the model's answers to question ``q``."""
    from align.judges import fill_template

    ref = refs.get(q["question_id"]) if q["category"] in NEED_REF_CATS else None
    prompt = prompts[PROMPT_NAMES[(ref is not None, turn)]]
    if turn == 1:
        values = {"question": q["turns"][0], "answer": answers[0]}
        if ref is not None:
            values["ref_answer_1"] = ref[0]
    else:
        values = {
            "question_1": q["turns"][0],
            "question_2": q["turns"][1],
            "answer_1": answers[0],
            "answer_2": answers[1],
        }
        if ref is not None:
            values.update(ref_answer_1=ref[0], ref_answer_2=ref[1] if len(ref) > 1 else "")
    user = fill_template(prompt["prompt_template"], **values)
    return prompt["name"], [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


def aggregate(judgments: list[dict], questions: list[dict], model: str, judge: str) -> dict:
    """Mean scores (FastChat's ``show_result``: judgements with score -1 left out): overall, per turn, per category."""
    cat_of = {q["question_id"]: q["category"] for q in questions}
    rows = [
        j
        for j in judgments
        if j.get("question_id") in cat_of
        and j.get("model") == model
        and isinstance(j.get("judge"), list)
        and j["judge"][:1] == [judge]
    ]
    valid = [j for j in rows if isinstance(j.get("score"), (int, float)) and j["score"] != -1]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    by_cat = {}
    for cat in dict.fromkeys(q["category"] for q in questions):
        mine = [j for j in valid if cat_of[j["question_id"]] == cat]
        by_cat[cat] = {
            "turn_1": mean(j["score"] for j in mine if j["turn"] == 1),
            "turn_2": mean(j["score"] for j in mine if j["turn"] == 2),
            "score": mean(j["score"] for j in mine),
            "n": len(mine),
        }
    return {
        "model": model,
        "judge": judge,
        "n_questions": len(questions),
        "n_judgments": len(rows),
        "n_unparsed": len(rows) - len(valid),
        "score": mean(j["score"] for j in valid),
        "turn_1": mean(j["score"] for j in valid if j["turn"] == 1),
        "turn_2": mean(j["score"] for j in valid if j["turn"] == 2),
        "by_category": by_cat,
        "reference_categories": list(NEED_REF_CATS),
    }


# ----------------------------------------------------------------------------------------------------------- run


def evaluate_mtbench(
    model: str,
    judge: str,
    output: str,
    *,
    limit: int | None = None,
    backend: str = "hf",
    max_new_tokens: int = 1024,
    name: str | None = None,
    bench_dir: str | None = None,
    temperature: float | None = None,
    batch_size: int = 16,
    parallel: int = 4,
) -> dict:
    """Answer, grade and aggregate (see the module docstring); returns ``results.json``'s content."""
    from align.evals.judge_config import build_grader, load_judge_config

    timer = Timer()
    check_model(model)
    spec = load_judge_config(judge)
    grader = build_grader(spec, 2048)
    out = check_output_dir(output)
    folder = bench_dir or default_bench_dir()
    if folder is None:
        raise UserError(
            "--bench-dir: the shared MT-Bench folder (../shared/data/benchmarks/mt_bench) is not here; pass --bench-dir"
        )
    questions, refs, prompts = load_bench(folder)
    questions = questions[:limit] if limit else questions
    name = name or default_model_name(model)
    answers_path, judgments_path = out / ANSWERS_FILE, out / JUDGMENTS_FILE
    answered = {}
    for r in read_jsonl(answers_path, "model answers"):
        if r.get("model_id") != name:
            raise UserError(
                f"{answers_path}: holds answers of {r.get('model_id')!r}, not {name!r}; pick another --output or --name"
            )
        answered[r["question_id"]] = r
    judged = {
        (j.get("question_id"), j.get("turn"))
        for j in read_jsonl(judgments_path, "judgments")
        if j.get("model") == name and isinstance(j.get("judge"), list) and j["judge"][:1] == [spec.name]
    }

    todo = [q for q in questions if q["question_id"] not in answered]
    progress(
        TAG,
        f"{len(questions)} questions from {folder}; {len(questions) - len(todo)} already answered, {len(todo)} to "
        "answer",
    )
    t0 = time.perf_counter()
    if todo:
        gen = Generator(model, backend=backend, batch_size=batch_size)
        out.mkdir(parents=True, exist_ok=True)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            temps = [temperature if temperature is not None else TEMPERATURE.get(q["category"], 0.7) for q in chunk]
            turns = gen.answer_turns([q["turns"] for q in chunk], max_new_tokens, temps)
            rows = [
                {
                    "question_id": q["question_id"],
                    "answer_id": uuid.uuid4().hex[:22],
                    "model_id": name,
                    "choices": [{"index": 0, "turns": [a for a, _ in ans]}],
                    "tstamp": time.time(),
                }
                for q, ans in zip(chunk, turns)
            ]
            append_jsonl(answers_path, rows)
            answered.update((r["question_id"], r) for r in rows)
            progress(TAG, f"answered {min(s + batch_size, len(todo))}/{len(todo)}")
        del gen
    gen_seconds = time.perf_counter() - t0

    jobs = [(q, t) for q in questions for t in range(1, len(q["turns"][:2]) + 1) if (q["question_id"], t) not in judged]
    progress(
        TAG, f"judging with {spec.describe()}: {2 * len(questions) - len(jobs)} already judged, {len(jobs)} to judge"
    )
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def grade(job):
        q, turn = job
        pname, messages = judge_messages(q, answered[q["question_id"]]["choices"][0]["turns"], turn, refs, prompts)
        text = grader.chat(messages)
        score = parse_rating(text)
        return {
            "question_id": q["question_id"],
            "model": name,
            "judge": [spec.name, pname],
            "user_prompt": messages[1]["content"],
            "judgment": text,
            "score": -1 if score is None else score,
            "turn": turn,
            "category": q["category"],
            "tstamp": time.time(),
        }

    step = max(1, parallel)
    for s in range(0, len(jobs), step):
        try:
            rows = map_parallel(grade, jobs[s : s + step], parallel)
        except RuntimeError as e:
            raise judge_error(e, judgments_path) from None
        append_jsonl(judgments_path, rows)
        if (s // step) % 5 == 4 or s + step >= len(jobs):
            progress(TAG, f"judged {min(s + step, len(jobs))}/{len(jobs)}")
    judge_seconds = time.perf_counter() - t0

    results = aggregate(read_jsonl(judgments_path, "judgments"), questions, name, spec.name)
    results.update(
        judge_endpoint=spec.describe(),
        bench_dir=str(folder),
        generation_seconds=round(gen_seconds, 2),
        judging_seconds=round(judge_seconds, 2),
        wall_seconds=round(timer(), 2),
    )
    write_json_atomic(out / RESULTS_FILE, results)
    from align.evals.report import mtbench_report

    mtbench_report(out, results)
    progress(
        TAG,
        f"done in {timer():.1f}s: score {results['score']} ({results['n_unparsed']} unparsed of "
        f"{results['n_judgments']})",
    )
    return results


def main_eval_mtbench(args) -> int:
    results = evaluate_mtbench(
        args.model,
        args.judge,
        args.output,
        limit=parse_positive_int(args.limit, "--limit"),
        backend=args.backend,
        max_new_tokens=parse_positive_int(args.max_new_tokens, "--max-new-tokens") or 1024,
        name=args.name,
        bench_dir=args.bench_dir,
        temperature=parse_float(args.temperature, "--temperature", 0.0, 10.0),
        batch_size=parse_positive_int(args.batch_size, "--batch-size") or 16,
        parallel=parse_positive_int(args.parallel, "--parallel") or 4,
    )
    print(
        json.dumps(
            {k: results[k] for k in ("model", "judge", "score", "turn_1", "turn_2", "n_judgments", "n_unparsed")}
        )
    )
    return 0


def add_common_arguments(a, what: str, default_tokens: int) -> None:
    a.add_argument(
        "--model", required=True, help="policy folder (HF format, or a training run's output folder) or tiny:llama"
    )
    a.add_argument("--judge", required=True, metavar="FILE", help="judge config YAML (kind: llm; see evals/judges/)")
    a.add_argument("--output", required=True, help=f"folder for {what}")
    a.add_argument("--name", help="model name in the outputs (default: the model folder's name)")
    a.add_argument("--limit", metavar="N", help="only the first N questions")
    a.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="rollout backend")
    a.add_argument("--max-new-tokens", metavar="N", help=f"tokens generated per answer (default {default_tokens})")
    a.add_argument("--batch-size", metavar="N", help="questions per generation batch (default 16)")
    a.add_argument("--parallel", metavar="N", help="judge requests in flight (default 4)")
    a.add_argument("--bench-dir", metavar="DIR", help="benchmark folder (default: the shared copy)")


def add_parser(esub) -> None:
    a = esub.add_parser("mtbench", help="MT-Bench: two-turn answers graded 1-10 by an LLM judge (FastChat's prompts)")
    add_common_arguments(a, "model_answers.jsonl, judgments.jsonl, results.json, report.md, report.png", 1024)
    a.add_argument(
        "--temperature", metavar="T", help="sampling temperature for every category (default: FastChat's per category)"
    )
    a.set_defaults(fn=main_eval_mtbench)
