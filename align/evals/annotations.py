"""AlpacaEval annotation files: reading them, and a row's preference as a win probability. The scorer
(``alpaca.py``) and the length-controlled GLM (``alpaca_lc.py``) both read annotations through here."""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

from align.errors import UserError


def load_annotations(path: str | os.PathLike) -> list[dict]:
    """Read an AlpacaEval annotations file (``.json`` or ``.json.gz``): a JSON list of objects with a ``preference``."""
    path = Path(path)
    if path.name.endswith(".json.gz"):
        opener = gzip.open
    elif path.name.endswith(".json"):
        opener = open
    else:
        raise UserError(f"{path}: expected an AlpacaEval annotations file ending in .json or .json.gz")
    if not path.is_file():
        raise UserError(f"{path}: annotations file not found")
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable JSON annotations file: {detail}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of annotations, got {type(data).__name__}")
    if not data:
        raise UserError(f"{path}: no annotations in the file")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
        if "preference" not in row:
            raise UserError(f"{path}: row {i}: no 'preference' field (is this an AlpacaEval annotations file?)")
    return data


def win_probability(value: Any, where: str) -> float | None:
    """Preference in [1, 2] -> probability that output_2 wins in [0, 1]; None for a missing judgement."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: preference {value!r} is not a number in [1, 2]")
    if math.isnan(value):
        return None
    if value == 0:  # alpaca_eval's legacy encoding of a draw
        return 0.5
    if not 1 <= value <= 2:
        raise UserError(f"{where}: preference {value!r} is outside [1, 2] (1 = reference wins, 2 = model wins)")
    return float(value) - 1.0  # exact for values in [1, 2]
