"""Benchmarks: ``align bench NAME [key=value ...] --json`` prints exactly one JSON object on stdout.

Each benchmark runs its baseline in the same command and reports ratios; results go in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

from align.errors import UserError

BENCHMARKS = {"dpo": "align.bench.dpo", "rollout": "align.bench.rollout", "online": "align.bench.online"}


def run_bench(name: str, extra: list[str]) -> dict:
    if name not in BENCHMARKS:
        raise UserError(f"bench: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    with contextlib.redirect_stdout(sys.stderr):  # progress and library chatter never reach stdout
        return importlib.import_module(BENCHMARKS[name]).run(extra)
