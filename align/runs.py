"""What every trainer writes into its output directory, as plain functions:

recipe.yaml     the resolved recipe
metrics.jsonl   one JSON object per logging step
summary.json    trainer, steps, wall_seconds, final metrics
plots/*.png     one curve per logged metric
checkpoint-N/   resumable state, written atomically (checkpoint-N.tmp, then renamed)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from align.config import Recipe, dump_yaml, to_dict
from align.errors import UserError

STATE_FILE = "trainer_state.json"
# keys that may change between a run and its resumption without changing the result
RESUMABLE_KEYS = {
    ("train", "save_steps"),
    ("train", "keep_checkpoints"),
    ("logging", "progress"),
    ("logging", "plots"),
    ("logging", "report_to"),
    ("logging", "run_name"),
}


def recipe_fingerprint(recipe: Recipe) -> str:
    tree = to_dict(recipe)
    for section, key in RESUMABLE_KEYS:
        tree[section].pop(key, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_output_dir(output_dir: Path, resume: bool) -> None:
    """Refuse to overwrite a finished or started run unless resuming."""
    if output_dir.exists() and not resume:
        if (output_dir / "summary.json").exists() or any(output_dir.glob("checkpoint-*")):
            raise UserError(
                f"{output_dir}: already holds a run; pass --resume to continue it or choose another --output-dir"
            )


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (complete = renamed from .tmp and holding trainer_state.json)."""
    best = None
    for p in output_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return best[1] if best else None


def read_state(ckpt: Path, recipe: Recipe) -> dict:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt / STATE_FILE}: unreadable checkpoint state ({e})") from None
    if state.get("recipe_fingerprint") != recipe_fingerprint(recipe):
        raise UserError(
            f"{ckpt}: checkpoint was written by a different recipe; resume with the recipe in "
            f"{ckpt.parent / 'recipe.yaml'} or start a new --output-dir"
        )
    return state


def finish_checkpoint(tmp: Path, final: Path, state: dict, keep: int) -> None:
    """Main process: mark ``tmp`` complete, move it into place, drop the oldest checkpoints beyond ``keep``."""
    atomic_write(tmp / STATE_FILE, json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    ckpts = sorted(
        (p for p in final.parent.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
        key=lambda p: int(p.name.split("-")[1]),
    )
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_window(folder: Path, rank: int, window: list[dict]) -> None:
    """This process's metrics of the steps since the last logged row, into a checkpoint folder: a run resumed from a
    checkpoint written between two logging steps then logs the same averages as one that never stopped."""
    (folder / f"log_window_{rank}.json").write_text(json.dumps([{k: float(v) for k, v in w.items()} for w in window]))


def load_window(folder: Path, rank: int) -> list[dict]:
    """What ``save_window`` wrote ([] for a checkpoint written without it)."""
    path = folder / f"log_window_{rank}.json"
    return json.loads(path.read_text()) if path.exists() else []


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder, fsynced and renamed: a reader
    or a killed process never sees half a file, and a failed write leaves no temporary file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_recipe(output_dir: Path, recipe: Recipe) -> None:
    atomic_write(output_dir / "recipe.yaml", dump_yaml(recipe))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, in order."""
    return [json.loads(line) for line in path.read_text().splitlines()]


class MetricsLog:
    """metrics.jsonl writer; on resume, keeps only the lines up to the checkpoint's step. ``trackers``
    (``align.tracking.Trackers``) receive every row too."""

    def __init__(self, path: Path, resume_step: int = 0, trackers=None):
        self.path, self.trackers = path, trackers
        self.rows: list[dict] = []
        if resume_step and path.exists():
            self.rows = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.finish()
            self.trackers = None


class Progress:
    """A one-line progress report on stderr (main process only)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled, self.start = total, label, enabled, time.time()

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        el = time.time() - self.start
        eta = el / max(done, 1) * (self.total - done)
        print(f"[{self.label}] {done}/{self.total} {info} ({el:.0f}s, eta {eta:.0f}s)", file=sys.stderr, flush=True)


def write_plots(output_dir: Path, rows: list[dict]) -> list[Path]:
    """plots/<metric>.png for every numeric metric logged more than once."""
    if len(rows) < 2:
        return []
    from align.extras import require

    require("matplotlib", "plots/*.png (logging.plots)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = output_dir / "plots"
    out.mkdir(exist_ok=True)
    keys = [k for k in rows[-1] if k not in ("step", "epoch") and isinstance(rows[-1][k], (int, float))]
    written = []
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if len(pts) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(*zip(*pts))
        ax.set_xlabel("step")
        ax.set_title(k)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / (re.sub(r"[^A-Za-z0-9_.-]", "_", k) + ".png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def write_summary(output_dir: Path, summary: dict) -> None:
    atomic_write(output_dir / "summary.json", json.dumps(summary, indent=1))
