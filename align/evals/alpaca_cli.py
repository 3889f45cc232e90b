"""``align eval alpaca``: score an existing annotations file (``--annotations``, ``alpaca.py``) or generate, judge
and score (``--model``, ``alpaca_generate.py``); the two paths are mutually exclusive."""

from __future__ import annotations

import json
import sys

from align.errors import UserError
from align.evals.alpaca import score_file

GENERATION_OPTIONS = (
    "judge",
    "limit",
    "backend",
    "max_new_tokens",
    "reference",
    "temperature",
    "batch_size",
    "parallel",
)
"""Options of the generation path (``--model``); they mean nothing with ``--annotations``."""


def main_eval_alpaca(args) -> int:
    """``align eval alpaca --annotations FILE --output DIR [--name NAME] [--instruction-difficulty FILE]
    [--gamed FILE]``, or the generation path ``align eval alpaca --model PATH --judge JUDGE.yaml --output DIR [...]``
    (``align/evals/alpaca_generate.py``); the two are mutually exclusive.

    Prints ``{name: row}`` as one JSON line on stdout; which LC inputs were used goes to stderr.
    """
    annotations, model = getattr(args, "annotations", None), getattr(args, "model", None)
    if annotations and model:
        raise UserError(
            "--annotations and --model are mutually exclusive: score an existing annotations file, "
            "or generate with --model and judge with --judge"
        )
    if not annotations and not model:
        raise UserError(
            "one of --annotations FILE (score an existing file) or --model PATH --judge FILE (generate and "
            "judge) is required"
        )
    if model:
        from align.evals.alpaca_generate import main_generate

        return main_generate(args)
    given = [o for o in GENERATION_OPTIONS if getattr(args, o, None) is not None]
    if given:
        raise UserError(
            f"--{given[0].replace('_', '-')} applies only with --model (generation); --annotations scores "
            "an existing file"
        )
    difficulty, gamed = getattr(args, "instruction_difficulty", None), getattr(args, "gamed", None)
    model, row = score_file(
        args.annotations, args.output, getattr(args, "name", None), instruction_difficulty=difficulty, gamed=gamed
    )
    if gamed is None:
        note = (
            "instruction difficulty from " + str(difficulty) + ", shipped estimate of df_gamed"
            if difficulty
            else "shipped offline estimate of instruction_difficulty.csv and df_gamed.csv (evals/alpaca_lc)"
        )
        print(f"length-controlled win rate: {note}", file=sys.stderr)
    print(json.dumps({model: row}))
    return 0


def add_parser(esub) -> None:
    """Register ``align eval alpaca`` on the ``align eval`` subparsers."""
    a = esub.add_parser(
        "alpaca", help="AlpacaEval 2: generate + judge (--model) or score an annotations file (--annotations)"
    )
    a.add_argument("--annotations", help="AlpacaEval annotations.json or .json.gz (preference in [1, 2]) to score")
    a.add_argument(
        "--model", help="generate: policy folder (HF format, or a training run's output folder) or tiny:llama"
    )
    a.add_argument(
        "--judge", metavar="FILE", help="--model: judge config YAML (kind: llm | reward_model | vpl; see evals/judges/)"
    )
    a.add_argument(
        "--output",
        required=True,
        help="folder for leaderboard.json ({model: row}; other models in it are kept); with --model also "
        "model_outputs.json, annotations.json, report.md, report.png",
    )
    a.add_argument(
        "--name",
        help="model name in the leaderboard (default: the annotations' generator_2, else the file "
        "name; with --model the model folder's name)",
    )
    a.add_argument("--limit", metavar="N", help="--model: only the first N instructions")
    a.add_argument("--backend", choices=["hf", "vllm"], help="--model: rollout backend (default hf)")
    a.add_argument("--max-new-tokens", metavar="N", help="--model: tokens generated per answer (default 2048)")
    a.add_argument("--temperature", metavar="T", help="--model: sampling temperature (default 0: greedy)")
    a.add_argument("--batch-size", metavar="N", help="--model: instructions per generation batch (default 16)")
    a.add_argument("--parallel", metavar="N", help="--model: LLM-judge requests in flight (default 4)")
    a.add_argument(
        "--reference",
        metavar="FILE_OR_HUB_ID",
        help="--model: reference outputs (alpaca_eval model_outputs .json/.json.gz/.jsonl, or the hub id "
        "tatsu-lab/alpaca_eval[:config] when online; default: the shared gpt4_1106_preview copy)",
    )
    a.add_argument(
        "--instruction-difficulty",
        metavar="FILE",
        help="alpaca_eval's instruction_difficulty.csv from the hub (default: our shipped offline estimate)",
    )
    a.add_argument(
        "--gamed",
        metavar="FILE",
        help="alpaca_eval's df_gamed.csv from the hub: gamed-baseline rows and difficulty (default: shipped estimate)",
    )
    a.set_defaults(fn=main_eval_alpaca)
