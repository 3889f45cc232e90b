"""Evaluation harnesses. ``align eval NAME``: each harness module registers its subcommand with ``add_parser``."""

from __future__ import annotations

import importlib

HARNESSES = ["align.evals.alpaca_cli", "align.evals.agent", "align.evals.mtbench", "align.evals.arena_hard"]
"""Modules with ``add_parser(esub)``; add a harness by appending its module here."""


def add_eval_parser(sub) -> None:
    """Register ``align eval <harness>`` on the CLI's top-level subparsers."""
    e = sub.add_parser("eval", help="evaluation harnesses (AlpacaEval, MT-Bench, Arena-Hard, agents)")
    esub = e.add_subparsers(dest="benchmark", required=True)
    for name in HARNESSES:
        importlib.import_module(name).add_parser(esub)
