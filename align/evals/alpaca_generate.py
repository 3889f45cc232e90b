"""AlpacaEval 2, generation path: ``align eval alpaca --model PATH --judge JUDGE.yaml --output DIR``.

1. The instructions and the reference outputs: the shared copy of alpaca_eval's ``gpt4_1106_preview`` outputs (offline),
   ``--reference FILE`` (an alpaca_eval ``model_outputs`` file: a JSON list, ``.json.gz``, or JSONL, of
   ``{instruction, output[, generator, dataset]}``), or, online, the hub id ``tatsu-lab/alpaca_eval[:config]`` through
   ``datasets`` (config ``alpaca_eval_gpt4_baseline``, split ``eval``, as alpaca_eval loads it).
2. Generation through the shared rollout engine (``--backend hf|vllm``), one user turn per instruction with the
   tokenizer's chat template when it has one (the bare instruction otherwise), greedy unless ``--temperature``.
3. Judging each answer against the reference with the judge of ``--judge`` (``align/evals/judge_config.py``): an LLM
   behind an OpenAI-compatible endpoint with the weighted AlpacaEval-style prompt (P from the log-probs of the two
   identifier tokens, both orders averaged), an LLM with the 1/2 pairwise prompt, or a (VPL) reward model.
   ``preference = 1 + P(model output beats the reference)`` in [1, 2]; a judgement with no information (neither
   identifier among the top log-probs in either order) is ``null`` and counts in no column, as in alpaca_eval.
4. Files in DIR, in alpaca_eval's formats and column names:

   - ``model_outputs.json``: ``[{dataset, instruction, output, generator}]``;
   - ``annotations.json``: ``[{instruction, output_1 (reference), generator_1, dataset, output_2 (model),
     generator_2, annotator, preference, time_per_example, raw_completion}]``, in the reference's order;
   - ``leaderboard.json``: ``{model: row}`` with the columns of ``align.evals.alpaca.COLUMNS`` (scored by
     ``leaderboard_row``; the length-controlled columns by ``alpaca_lc`` when the reference is the official
     ``gpt4_1106_preview`` set of 805, whose instruction order the LC difficulty is indexed by);
   - ``report.md`` and ``report.png`` (``align/evals/report.py``).

Resumable: both JSON files are rewritten atomically after each batch; a rerun of the same command skips the
instructions already answered (``model_outputs.json``) and the answers already judged by the same annotator
(``annotations.json``), so a killed run continues where it stopped and a larger ``--limit`` only adds rows; LLM
judges get up to ``--parallel`` requests in flight. The
leaderboard row covers this run's instructions (the first ``--limit``). Bad input (model folder, judge config,
reference file, options, a result file of another model in DIR) is one ``error:`` line and exit 2 before anything is
written.
"""

from __future__ import annotations

import gzip
import json
import math
import time
import zlib
from pathlib import Path

from align.errors import UserError
from align.evals.common import (
    Generator,
    Timer,
    check_model,
    check_output_dir,
    default_model_name,
    judge_error,
    map_parallel,
    parse_float,
    parse_positive_int,
    progress,
    read_json_list,
    write_json_atomic,
)

HUB_ID = "tatsu-lab/alpaca_eval"
HUB_CONFIG = "alpaca_eval_gpt4_baseline"
REFERENCE_GENERATOR = "gpt4_1106_preview"
N_INSTRUCTIONS = 805
OUTPUTS_FILE, ANNOTATIONS_FILE = "model_outputs.json", "annotations.json"
TAG = "eval alpaca"


# ----------------------------------------------------------------------------------------------------------- reference


def shared_reference() -> Path | None:
    """The shared copy of the AlpacaEval 2 reference outputs, or None."""
    from align.paths import shared_data_dir

    data = shared_data_dir()
    path = data / "alpaca_eval" / "outputs" / f"{REFERENCE_GENERATOR}.json.gz" if data else None
    return path if path is not None and path.is_file() else None


def _read_local(path: Path) -> list:
    name = path.name
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if name.removesuffix(".gz").endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            return json.load(f)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"--reference {path}: not a readable JSON reference file: {detail}") from None


def _load_hub(source: str) -> list:
    """``owner/name[:config]`` through ``datasets`` (split ``eval``); falls back to the file ``<config>.json`` of the
    dataset repository. Needs the network; offline it is a UserError pointing at ``--reference FILE``."""
    repo, _, config = source.partition(":")
    config = config or HUB_CONFIG
    hint = (
        "offline, pass --reference FILE (the shared copy: ../shared/data/alpaca_eval/outputs/gpt4_1106_preview.json.gz)"
    )
    try:
        import datasets

        return [dict(r) for r in datasets.load_dataset(repo, config, split="eval")]
    except Exception as first:  # noqa: BLE001 -- any hub/loader failure: try the raw file, then one clear line
        try:
            from huggingface_hub import hf_hub_download

            return _read_local(Path(hf_hub_download(repo, f"{config}.json", repo_type="dataset")))
        except Exception:  # noqa: BLE001
            detail = (str(first).strip().splitlines() or [type(first).__name__])[0][:200]
            raise UserError(f"--reference {source}: cannot load from the hub ({detail}); {hint}") from None


def load_reference(source: str | Path | None = None) -> tuple[list[dict], str]:
    """(rows ``{instruction, output, generator, dataset}``, where they came from). ``source``: a local file, a hub id,
    or None for the shared copy (the hub id ``tatsu-lab/alpaca_eval`` when the shared folder is absent)."""
    if source is None:
        source = shared_reference() or HUB_ID
    path = Path(source)
    text = str(source)
    if path.exists() or text.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz")) or text.startswith((".", "/", "~")):
        if not path.is_file():
            raise UserError(f"--reference {path}: reference file not found")
        rows, where = _read_local(path), str(path)
    elif text.count("/") == 1:
        rows, where = _load_hub(text), text
    else:
        raise UserError(f"--reference {text}: neither a file nor a hub id (owner/name[:config])")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"--reference {where}: expected a non-empty list of {{instruction, output}} rows")
    out, seen = [], set()
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise UserError(f"--reference {where}: row {i}: expected an object, got {type(r).__name__}")
        instr, output = r.get("instruction"), r.get("output")
        if not isinstance(instr, str) or not instr.strip():
            raise UserError(f"--reference {where}: row {i}: 'instruction' is missing or empty")
        if not isinstance(output, str):
            raise UserError(f"--reference {where}: row {i}: 'output' (the reference answer) is missing or not a string")
        if instr in seen:
            raise UserError(f"--reference {where}: row {i}: duplicate instruction {instr[:60]!r}")
        seen.add(instr)
        out.append(
            {
                "instruction": instr,
                "output": output,
                "generator": str(r.get("generator") or "reference"),
                "dataset": str(r.get("dataset") or ""),
            }
        )
    return out, where


def is_official(refs: list[dict]) -> bool:
    """Whether ``refs`` are AlpacaEval 2's 805 reference outputs in alpaca_eval's order (what the LC instruction
    difficulty is indexed by): the same instructions in the same order as the shared copy when it is here, else 805
    rows of the GPT-4 Turbo reference (``gpt4_1106_preview``, named ``gpt4_turbo`` in the hub's dataset)."""
    if len(refs) != N_INSTRUCTIONS:
        return False
    shared = shared_reference()
    if shared is not None:
        return [r["instruction"] for r in refs] == [r["instruction"] for r in _read_local(shared)]
    return {r["generator"] for r in refs} <= {REFERENCE_GENERATOR, "gpt4_turbo"}


# ----------------------------------------------------------------------------------------------------------- run


def _ordered(by_instruction: dict[str, dict], refs: list[dict]) -> list[dict]:
    return [by_instruction[r["instruction"]] for r in refs if r["instruction"] in by_instruction]


def _key(row: dict) -> tuple:
    return row.get("instruction"), row.get("output_1"), row.get("output_2"), row.get("annotator")


def evaluate_alpaca(
    model: str,
    judge: str,
    output: str,
    *,
    limit: int | None = None,
    backend: str = "hf",
    max_new_tokens: int = 2048,
    name: str | None = None,
    reference: str | None = None,
    temperature: float = 0.0,
    batch_size: int = 16,
    parallel: int = 4,
    instruction_difficulty: str | None = None,
    gamed: str | None = None,
) -> tuple[str, dict]:
    """Generate, judge and score (see the module docstring); returns (model name, leaderboard row)."""
    from align.evals.alpaca import LEADERBOARD_FILE, read_leaderboard, score_rows_and_write
    from align.evals.judge_config import build_pairwise_judge, load_judge_config

    timer = Timer()
    # --- every check before anything is written
    check_model(model)
    spec = load_judge_config(judge)
    out = check_output_dir(output)
    all_refs, ref_source = load_reference(reference)
    refs = all_refs[:limit] if limit else all_refs
    name = name or default_model_name(model)
    outputs_path, ann_path = out / OUTPUTS_FILE, out / ANNOTATIONS_FILE
    done = {}
    if outputs_path.exists():
        for i, r in enumerate(read_json_list(outputs_path, "model outputs")):
            if (
                r.get("generator") != name
                or not isinstance(r.get("instruction"), str)
                or not isinstance(r.get("output"), str)
            ):
                raise UserError(
                    f"{outputs_path}: row {i} is not an output of {name!r} (generator {r.get('generator')!r}); "
                    "pick another --output or --name"
                )
            done[r["instruction"]] = r
    judged = {}
    if ann_path.exists():
        for r in read_json_list(ann_path, "annotations"):
            if r.get("generator_2") == name:
                judged[_key(r)] = r
    if (out / LEADERBOARD_FILE).exists():
        read_leaderboard(out / LEADERBOARD_FILE)  # an unreadable leaderboard fails now, not after the work
    official = is_official(all_refs)
    lc = None
    if official:
        from align.evals.alpaca_lc import load_lc_inputs

        lc = load_lc_inputs(instruction_difficulty, gamed)
    elif instruction_difficulty or gamed:
        raise UserError(
            f"--instruction-difficulty/--gamed: the length-controlled win rate needs the official 805 "
            f"{REFERENCE_GENERATOR} reference outputs, and {ref_source} is not that set"
        )
    progress(TAG, f"{len(refs)} instructions from {ref_source}; judge: {spec.describe()}")
    scorer = build_pairwise_judge(spec)

    # --- generation (skips what model_outputs.json already holds)
    todo = [r for r in refs if r["instruction"] not in done]
    progress(TAG, f"generation: {len(refs) - len(todo)} already answered, {len(todo)} to generate")
    gen_seconds = 0.0
    if todo:
        t0 = time.perf_counter()
        gen = Generator(model, backend=backend, batch_size=batch_size)
        out.mkdir(parents=True, exist_ok=True)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            answers = gen.generate(
                [[{"role": "user", "content": r["instruction"]}] for r in chunk], max_new_tokens, temperature
            )
            for r, (text, _) in zip(chunk, answers):
                done[r["instruction"]] = {
                    "dataset": r["dataset"],
                    "instruction": r["instruction"],
                    "output": text,
                    "generator": name,
                }
            write_json_atomic(outputs_path, _ordered(done, all_refs))
            progress(TAG, f"generated {min(s + batch_size, len(todo))}/{len(todo)}")
        del gen
        gen_seconds = time.perf_counter() - t0

    # --- judging (skips answers this annotator already judged)
    def annotation_key(r):
        return r["instruction"], r["output"], done[r["instruction"]]["output"], spec.name

    jtodo = [r for r in refs if annotation_key(r) not in judged]
    progress(TAG, f"judging: {len(refs) - len(jtodo)} already judged, {len(jtodo)} to judge")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from align.judges import LLMJudge

    remote = isinstance(scorer, LLMJudge)  # HTTP judges: up to `parallel` rows in flight; local models: one batch
    judge_batch = max(8, 2 * parallel) if remote else 16

    def one(i, instr, mine, theirs):
        if hasattr(scorer, "compare_detailed"):
            return scorer.compare_detailed([instr[i]], [mine[i]], [theirs[i]])[0]
        return {"p": float(scorer.compare([instr[i]], [mine[i]], [theirs[i]])[0])}

    for s in range(0, len(jtodo), judge_batch):
        chunk = jtodo[s : s + judge_batch]
        instr = [r["instruction"] for r in chunk]
        mine = [done[r["instruction"]]["output"] for r in chunk]
        theirs = [r["output"] for r in chunk]
        t1 = time.perf_counter()
        try:
            if remote:
                details = map_parallel(
                    lambda i, a=instr, b=mine, c=theirs: one(i, a, b, c), list(range(len(chunk))), parallel
                )
            elif hasattr(scorer, "compare_detailed"):
                details = scorer.compare_detailed(instr, mine, theirs)
            else:
                details = [{"p": float(p)} for p in scorer.compare(instr, mine, theirs)]
        except RuntimeError as e:
            raise judge_error(e, ann_path) from None
        per = (time.perf_counter() - t1) / len(chunk)
        for r, m, d in zip(chunk, mine, details):
            p = d["p"]
            pref = None if p is None or math.isnan(p) else 1.0 + min(1.0, max(0.0, float(p)))
            raw = {"p_model_wins": None if pref is None else pref - 1.0}
            if "p_a_first" in d:  # P(first shown wins) per order: the model's answer shown first, then the reference's
                raw.update(p_first_model_first=d["p_a_first"], p_first_reference_first=d["p_b_first"])
            row = {
                "instruction": r["instruction"],
                "output_1": r["output"],
                "generator_1": r["generator"],
                "dataset": r["dataset"],
                "output_2": m,
                "generator_2": name,
                "annotator": spec.name,
                "preference": pref,
                "time_per_example": per,
                "raw_completion": raw,
            }
            judged[_key(row)] = row
        current = {annotation_key(r): r for r in all_refs if r["instruction"] in done}
        write_json_atomic(ann_path, [judged[k] for k in current if k in judged])
        progress(TAG, f"judged {min(s + judge_batch, len(jtodo))}/{len(jtodo)}")
    judge_seconds = time.perf_counter() - t0

    # --- the leaderboard row over this run's instructions, then the report
    rows = [judged[annotation_key(r)] for r in refs]
    row = score_rows_and_write(rows, out, name, source=str(ann_path), lc=lc)
    if lc is None:
        progress(
            TAG,
            f"length-controlled win rate: not computed ({ref_source} is not the official "
            f"{N_INSTRUCTIONS} {REFERENCE_GENERATOR} outputs the LC difficulty is indexed by)",
        )
    from align.evals.report import alpaca_report

    alpaca_report(
        out,
        name,
        row,
        meta={
            "judge": spec.describe(),
            "annotator": spec.name,
            "reference": ref_source,
            "instructions": len(refs),
            "generation_seconds": round(gen_seconds, 2),
            "judging_seconds": round(judge_seconds, 2),
            "wall_seconds": round(timer(), 2),
            "reference_generator": refs[0]["generator"],
            "lc_inputs": lc.source if lc else None,
        },
    )
    progress(TAG, f"done in {timer():.1f}s: win rate {row['win_rate']:.2f} over {row['n_total']} judged answers")
    return name, row


def main_generate(args) -> int:
    """The ``--model`` path of ``align eval alpaca``; prints ``{name: row}`` as one JSON line on stdout."""
    if not getattr(args, "judge", None):
        raise UserError("--judge FILE is required with --model (a judge config YAML: kind llm | reward_model | vpl)")
    limit = parse_positive_int(args.limit, "--limit")
    max_new = parse_positive_int(args.max_new_tokens, "--max-new-tokens") or 2048
    batch = parse_positive_int(args.batch_size, "--batch-size") or 16
    temperature = parse_float(args.temperature, "--temperature", 0.0, 10.0) or 0.0
    parallel = parse_positive_int(args.parallel, "--parallel") or 4
    name, row = evaluate_alpaca(
        args.model,
        args.judge,
        args.output,
        limit=limit,
        backend=args.backend or "hf",
        max_new_tokens=max_new,
        name=args.name,
        reference=args.reference,
        temperature=temperature,
        batch_size=batch,
        parallel=parallel,
        instruction_difficulty=args.instruction_difficulty,
        gamed=args.gamed,
    )
    print(json.dumps({name: row}))
    return 0
