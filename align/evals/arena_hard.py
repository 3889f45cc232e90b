"""Arena-Hard: ``align eval arena-hard --model PATH --judge JUDGE.yaml --output DIR [--baseline ANSWERS|MODEL]
[--limit N]``.

Over the shared Arena-Hard v0.1 questions (``../shared/data/benchmarks/arena_hard/question.jsonl``, 500 prompts),
following lm-sys/arena-hard-auto:

1. Answers through the shared rollout engine (greedy; turns answered in order with the conversation so far).
2. The baseline's answers: ``<bench-dir>/model_answer/<name>.jsonl`` when the folder ships them (arena-hard's
   baseline is ``gpt-4-0314``; the shared copy has only the questions), else ``--baseline``: an answers file
   (arena-hard's ``model_answer`` JSONL), a model folder (its answers are generated here, into
   ``baseline_answers.jsonl``, resumable), or a name under ``<bench-dir>/model_answer/``.
3. Pairwise judging by an LLM judge (``kind: llm``) with an Arena-Hard-style prompt (ours: the judge writes its own
   answer first, compares, and ends with one of five labels ``[[A>>B]]``, ``[[A>B]]``, ``[[A=B]]``, ``[[B>A]]``,
   ``[[B>>A]]``). Two games per question with the positions swapped (game 1: A = baseline, game 2: A = the model).
   A judgement without a label gets one follow-up turn asking for it (arena-hard's two attempts); labels are read
   robustly (spaces, ``A<B`` = ``B>A``, ``B=A`` = tie); several different labels count as no verdict.
4. Score, as arena-hard's ``show_result`` with one model against the baseline: each game is a battle, a "much better"
   verdict counting 3 times (``--weight``), a game without a verdict not at all; the Bradley-Terry fit of two players
   reduces to the weighted win fraction ``win_rate = 100 * (wins + ties / 2) / battles``, and its 95% interval is the
   2.5/97.5 percentiles over ``--bootstrap`` resamples of the battles (seeded: the same judgements give the same
   interval).
5. Files: ``model_answers.jsonl`` (arena-hard's answer format: question_id, answer_id, model_id,
   choices[0].turns[{content, token_len}], tstamp), ``judgments.jsonl`` (question_id, model, baseline, judge,
   games[{user_prompt, judgment, score}]), ``results.json`` and ``report.md`` / ``report.png``.

Resumable like MT-Bench: append-only answers and judgements, rerun skips what is done.
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
    parse_positive_int,
    progress,
    read_data_jsonl,
    read_jsonl,
    write_json_atomic,
)

SYSTEM_PROMPT = (
    "You are an impartial judge comparing the answers two AI assistants gave to the same user prompt. You will see "
    "the prompt, the answer of assistant A and the answer of assistant B, and you must decide which answer is "
    "better.\n\n"
    "First write your own answer to the prompt, before you look at theirs in detail. Then compare each assistant's "
    "answer with yours: point out and correct any mistake or inaccurate statement.\n\n"
    "Next judge whether each answer is helpful (it actually does what the prompt asks; when the prompt is ambiguous, "
    "asking the user for clarification is better than guessing), relevant (every part belongs to the question) and "
    "concise (clear, without padding or needless length). Where the task calls for it, also weigh creativity and "
    "novelty, and note any important information an answer leaves out.\n\n"
    "After your explanation, give your final verdict as exactly one of these labels:\n\n"
    "1. Assistant A is much better: [[A>>B]]\n"
    "2. Assistant A is somewhat better: [[A>B]]\n"
    "3. Both are about equally good: [[A=B]]\n"
    "4. Assistant B is somewhat better: [[B>A]]\n"
    "5. Assistant B is much better: [[B>>A]]\n\n"
    'For example: "My final verdict: [[A=B]]".'
)
"""Our Arena-Hard-style judge system prompt (the five labels and the answer-first procedure of arena-hard-auto)."""

PROMPT_TEMPLATE = (
    "<|User Prompt|>\n{question}\n\n<|The Start of Assistant A's Answer|>\n{answer_a}\n"
    "<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_b}\n"
    "<|The End of Assistant B's Answer|>"
)
FOLLOW_UP = "Please finish your judgement by giving the final verdict as one of the five labels, e.g. [[A=B]]."
DEFAULT_BASELINE = "gpt-4-0314"
ANSWERS_FILE, BASELINE_FILE, JUDGMENTS_FILE, RESULTS_FILE = (
    "model_answers.jsonl",
    "baseline_answers.jsonl",
    "judgments.jsonl",
    "results.json",
)
LABELS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
TAG = "eval arena-hard"

_VERDICT = re.compile(r"\[\[\s*([AB])\s*(>>|<<|>|<|=)\s*([AB])\s*\]\]")


def parse_verdict(judgment: str) -> str | None:
    """One of ``LABELS``, or None when the judgement has no label or several different ones."""
    if not isinstance(judgment, str):
        return None
    found = set()
    for left, op, right in _VERDICT.findall(judgment):
        if left == right:
            continue
        if op == "=":
            found.add("A=B")
            continue
        if op.startswith("<"):  # X<Y == Y>X
            left, right, op = right, left, op.replace("<", ">")
        found.add(f"{left}{op}{right}")
    return found.pop() if len(found) == 1 else None


def battles(judgments: list[dict], weight: int = 3) -> list[float]:
    """The model's battle outcomes against the baseline (1 win, 0.5 tie, 0 loss), ``weight`` copies for a "much
    better" verdict, none for a game without a verdict (arena-hard's ``get_battles_from_row``)."""
    out: list[float] = []
    for j in judgments:
        for g, game in enumerate(j.get("games", [])[:2]):
            v = game.get("score")
            if v not in LABELS:
                continue
            # game 1: A = baseline, B = model; game 2: A = model, B = baseline
            model_is_a = g == 1
            if v == "A=B":
                out.append(0.5)
                continue
            a_wins = v.startswith("A")
            outcome = 1.0 if a_wins == model_is_a else 0.0
            out += [outcome] * (weight if ">>" in v else 1)
    return out


def win_rate_with_ci(outcomes: list[float], rounds: int = 100, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """(100 * mean outcome, 95% bootstrap percentile interval over resampled battles)."""
    import numpy as np

    x = np.asarray(outcomes, dtype=float)
    wr = float(x.mean()) * 100
    if rounds <= 0 or len(x) < 2:
        return wr, (wr, wr)
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, len(x), size=(rounds, len(x)))].mean(axis=1) * 100
    return wr, (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))


def verdict_counts(judgments: list[dict]) -> dict:
    names = {"much better": 0, "better": 0, "tie": 0, "worse": 0, "much worse": 0, "no verdict": 0}
    for j in judgments:
        for g, game in enumerate(j.get("games", [])[:2]):
            v = game.get("score")
            if v not in LABELS:
                names["no verdict"] += 1
                continue
            if v == "A=B":
                names["tie"] += 1
                continue
            model_wins = v.startswith("A") == (g == 1)
            names[("much " if ">>" in v else "") + ("better" if model_wins else "worse")] += 1
    return {f"model {k}" if k not in ("tie", "no verdict") else k: v for k, v in names.items()}


# ----------------------------------------------------------------------------------------------------------- data


def default_bench_dir() -> Path | None:
    from align.paths import shared_data_dir

    data = shared_data_dir()
    return data / "benchmarks" / "arena_hard" if data else None


def load_questions(folder: Path) -> list[dict]:
    if not folder.is_dir():
        raise UserError(f"--bench-dir {folder}: Arena-Hard folder not found")
    path = folder / "question.jsonl"
    qs = []
    for i, q in enumerate(read_data_jsonl(path, "Arena-Hard questions")):
        turns = q.get("turns")
        if "question_id" not in q or not isinstance(turns, list) or not turns:
            raise UserError(f"{path}: line {i + 1}: expected question_id and a list of turns")
        texts = [t.get("content") if isinstance(t, dict) else t for t in turns]
        if not all(isinstance(t, str) and t for t in texts):
            raise UserError(f"{path}: line {i + 1}: every turn needs a non-empty 'content'")
        qs.append({"question_id": q["question_id"], "cluster": q.get("cluster"), "turns": texts})
    return qs


def _answer_texts(row: dict) -> list[str]:
    return [t["content"] if isinstance(t, dict) else t for t in row["choices"][0]["turns"]]


def load_answers(path: Path, what: str) -> tuple[str, dict]:
    """(model id, {question_id: answer turns}) of an arena-hard answers JSONL file."""
    rows = read_data_jsonl(path, what)
    answers, ids = {}, set()
    for i, r in enumerate(rows):
        try:
            texts = _answer_texts(r)
            qid = r["question_id"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{path}: line {i + 1}: expected question_id and choices[0].turns") from None
        if not all(isinstance(t, str) for t in texts):
            raise UserError(f"{path}: line {i + 1}: answer turns are not text")
        answers[qid] = texts
        ids.add(r.get("model_id") or path.name.removesuffix(".jsonl"))
    if not answers:
        raise UserError(f"{path}: no answers in the {what}")
    return (ids.pop() if len(ids) == 1 else path.name.removesuffix(".jsonl")), answers


def _generate_into(
    gen: Generator, path: Path, questions: list[dict], name: str, max_new_tokens: int, batch_size: int, label: str
) -> dict:
    """Answer the questions not yet in ``path`` (append-only); returns {question_id: row} of the whole file."""
    have = {}
    for r in read_jsonl(path, f"{label} answers"):
        if r.get("model_id") != name:
            raise UserError(
                f"{path}: holds answers of {r.get('model_id')!r}, not {name!r}; pick another --output or --name"
            )
        have[r["question_id"]] = r
    todo = [q for q in questions if q["question_id"] not in have]
    progress(TAG, f"{label}: {len(questions) - len(todo)} already answered, {len(todo)} to answer")
    for s in range(0, len(todo), batch_size):
        chunk = todo[s : s + batch_size]
        turns = gen.answer_turns([q["turns"] for q in chunk], max_new_tokens, [0.0] * len(chunk))
        rows = [
            {
                "question_id": q["question_id"],
                "answer_id": uuid.uuid4().hex[:22],
                "model_id": name,
                "choices": [{"index": 0, "turns": [{"content": a, "token_len": n} for a, n in ans]}],
                "tstamp": time.time(),
            }
            for q, ans in zip(chunk, turns)
        ]
        append_jsonl(path, rows)
        have.update((r["question_id"], r) for r in rows)
        progress(TAG, f"{label}: answered {min(s + batch_size, len(todo))}/{len(todo)}")
    return have


# ----------------------------------------------------------------------------------------------------------- run


def evaluate_arena_hard(
    model: str,
    judge: str,
    output: str,
    *,
    baseline: str | None = None,
    limit: int | None = None,
    backend: str = "hf",
    max_new_tokens: int = 4096,
    name: str | None = None,
    bench_dir: str | None = None,
    batch_size: int = 16,
    parallel: int = 4,
    weight: int = 3,
    bootstrap: int = 100,
    seed: int = 0,
) -> dict:
    from align.evals.judge_config import build_grader, load_judge_config

    timer = Timer()
    check_model(model)
    spec = load_judge_config(judge)
    grader = build_grader(spec, 4096)
    out = check_output_dir(output)
    folder = Path(bench_dir) if bench_dir else default_bench_dir()
    if folder is None:
        raise UserError(
            "--bench-dir: the shared Arena-Hard folder (../shared/data/benchmarks/arena_hard) is not here; pass "
            "--bench-dir"
        )
    questions = load_questions(folder)
    questions = questions[:limit] if limit else questions
    name = name or default_model_name(model)

    # the baseline: shipped answers, an answers file, or a model folder to generate with
    base_model_dir, base_answers = None, None
    shipped = folder / "model_answer" / f"{baseline or DEFAULT_BASELINE}.jsonl"
    if baseline is None and not shipped.is_file():
        raise UserError(
            f"no baseline answers ({shipped} is not there): pass --baseline ANSWERS.jsonl, a model folder "
            "whose answers are generated here, or a name under <bench-dir>/model_answer/"
        )
    if baseline is None or (not Path(baseline).exists() and shipped.is_file()):
        base_name, base_answers = load_answers(shipped, "baseline answers")
    elif Path(baseline).is_file():
        base_name, base_answers = load_answers(Path(baseline), "baseline answers")
    elif Path(baseline).is_dir():
        try:
            check_model(baseline)
        except UserError as e:
            raise UserError(str(e).replace("--model", "--baseline", 1)) from None
        base_model_dir, base_name = baseline, default_model_name(baseline)
        if base_name == name:
            base_name += "-baseline"
    else:
        raise UserError(f"--baseline {baseline}: neither an answers file, a model folder, nor {shipped}")
    if base_answers is not None:
        missing = [q["question_id"] for q in questions if q["question_id"] not in base_answers]
        if missing:
            raise UserError(
                f"baseline answers of {base_name}: no answer to {len(missing)} of the {len(questions)} "
                f"questions (first: {missing[0]})"
            )
    answers_path, judgments_path = out / ANSWERS_FILE, out / JUDGMENTS_FILE
    read_jsonl(answers_path, "model answers")  # an unreadable file fails here, before any work
    judged = {
        j.get("question_id")
        for j in read_jsonl(judgments_path, "judgments")
        if j.get("model") == name and j.get("baseline") == base_name and j.get("judge") == spec.name
    }
    progress(TAG, f"{len(questions)} questions from {folder}; baseline {base_name}; judge {spec.describe()}")

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    gen = None
    if base_model_dir is not None:
        gen_base = Generator(base_model_dir, backend=backend, batch_size=batch_size)
        rows = _generate_into(
            gen_base, out / BASELINE_FILE, questions, base_name, max_new_tokens, batch_size, "baseline"
        )
        base_answers = {qid: _answer_texts(r) for qid, r in rows.items()}
        del gen_base
    have = {r["question_id"]: r for r in read_jsonl(answers_path, "model answers")}
    if any(q["question_id"] not in have for q in questions):
        gen = Generator(model, backend=backend, batch_size=batch_size)
    mine = _generate_into(gen, answers_path, questions, name, max_new_tokens, batch_size, "model") if gen else have
    for r in mine.values():
        if r.get("model_id") != name:
            raise UserError(
                f"{answers_path}: holds answers of {r.get('model_id')!r}, not {name!r}; pick another --output or --name"
            )
    del gen
    gen_seconds = time.perf_counter() - t0

    jobs = [q for q in questions if q["question_id"] not in judged]
    progress(
        TAG, f"judging: {len(questions) - len(jobs)} questions already judged, {len(jobs)} to judge (2 games each)"
    )
    t0 = time.perf_counter()

    def play(job):
        q, game = job
        ours, theirs = _answer_texts(mine[q["question_id"]])[-1], base_answers[q["question_id"]][-1]
        a, b = (theirs, ours) if game == 0 else (ours, theirs)
        from align.judges import fill_template

        question = "\n\n".join(q["turns"]) if len(q["turns"]) > 1 else q["turns"][0]
        user = fill_template(PROMPT_TEMPLATE, question=question, answer_a=a, answer_b=b)
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        text = grader.chat(messages)
        verdict = parse_verdict(text)
        if verdict is None and not _VERDICT.search(
            text
        ):  # no label at all: one follow-up turn (arena-hard: 2 attempts)
            more = grader.chat(
                messages + [{"role": "assistant", "content": text}, {"role": "user", "content": FOLLOW_UP}]
            )
            text = text + "\n" + more
            verdict = parse_verdict(text)
        return {"user_prompt": user, "judgment": text, "score": verdict}

    step = max(1, parallel // 2)
    for s in range(0, len(jobs), step):
        chunk = jobs[s : s + step]
        try:
            games = map_parallel(play, [(q, g) for q in chunk for g in (0, 1)], parallel)
        except RuntimeError as e:
            raise judge_error(e, judgments_path) from None
        rows = [
            {
                "question_id": q["question_id"],
                "model": name,
                "baseline": base_name,
                "judge": spec.name,
                "games": games[2 * i : 2 * i + 2],
                "tstamp": time.time(),
            }
            for i, q in enumerate(chunk)
        ]
        append_jsonl(judgments_path, rows)
        if (s // step) % 10 == 9 or s + step >= len(jobs):
            progress(TAG, f"judged {min(s + step, len(jobs))}/{len(jobs)}")
    judge_seconds = time.perf_counter() - t0

    qids = {q["question_id"] for q in questions}
    rows = {}
    for j in read_jsonl(judgments_path, "judgments"):
        if (
            j.get("question_id") in qids
            and j.get("model") == name
            and j.get("baseline") == base_name
            and j.get("judge") == spec.name
        ):
            rows[j["question_id"]] = j  # the last judgement of a question wins
    outcomes = battles(list(rows.values()), weight)
    if not outcomes:
        raise UserError(f"{judgments_path}: no game got a verdict label from the judge; nothing to score")
    wr, ci = win_rate_with_ci(outcomes, bootstrap, seed)
    tokens = [
        t.get("token_len")
        for r in mine.values()
        if r["question_id"] in qids
        for t in r["choices"][0]["turns"]
        if isinstance(t, dict) and isinstance(t.get("token_len"), int)
    ]
    games = 2 * len(rows)
    results = {
        "model": name,
        "baseline": base_name,
        "judge": spec.name,
        "judge_endpoint": spec.describe(),
        "n_questions": len(questions),
        "win_rate": wr,
        "ci": list(ci),
        "n_games": games,
        "n_battles": len(outcomes),
        "n_unparsed": verdict_counts(list(rows.values()))["no verdict"],
        "verdicts": verdict_counts(list(rows.values())),
        "weight": weight,
        "bootstrap_rounds": bootstrap,
        "avg_tokens": sum(tokens) / len(tokens) if tokens else None,
        "bench_dir": str(folder),
        "generation_seconds": round(gen_seconds, 2),
        "judging_seconds": round(judge_seconds, 2),
        "wall_seconds": round(timer(), 2),
    }
    write_json_atomic(out / RESULTS_FILE, results)
    from align.evals.report import arena_report

    arena_report(out, results)
    progress(TAG, f"done in {timer():.1f}s: win rate {wr:.1f} ({ci[0]:.1f}, {ci[1]:.1f}) against {base_name}")
    return results


def main_eval_arena_hard(args) -> int:
    results = evaluate_arena_hard(
        args.model,
        args.judge,
        args.output,
        baseline=args.baseline,
        limit=parse_positive_int(args.limit, "--limit"),
        backend=args.backend,
        max_new_tokens=parse_positive_int(args.max_new_tokens, "--max-new-tokens") or 4096,
        name=args.name,
        bench_dir=args.bench_dir,
        batch_size=parse_positive_int(args.batch_size, "--batch-size") or 16,
        parallel=parse_positive_int(args.parallel, "--parallel") or 4,
        weight=parse_positive_int(args.weight, "--weight") or 3,
        bootstrap=parse_positive_int(args.bootstrap, "--bootstrap") or 100,
    )
    print(
        json.dumps({k: results[k] for k in ("model", "baseline", "judge", "win_rate", "ci", "n_battles", "n_unparsed")})
    )
    return 0


def add_parser(esub) -> None:
    from align.evals.mtbench import add_common_arguments

    a = esub.add_parser(
        "arena-hard", help="Arena-Hard: pairwise against a baseline's answers, win rate with a bootstrap CI"
    )
    add_common_arguments(a, "model_answers.jsonl, judgments.jsonl, results.json, report.md, report.png", 4096)
    a.add_argument(
        "--baseline",
        metavar="ANSWERS_OR_MODEL",
        help=f"baseline answers JSONL, a model folder (answers generated here), or a name under "
        f"<bench-dir>/model_answer/ (default {DEFAULT_BASELINE}, when shipped)",
    )
    a.add_argument(
        "--weight", metavar="N", help="battles a 'much better' verdict counts for (default 3, as arena-hard)"
    )
    a.add_argument("--bootstrap", metavar="N", help="bootstrap rounds of the 95%% interval (default 100)")
    a.set_defaults(fn=main_eval_arena_hard)
