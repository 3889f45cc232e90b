"""Live experiment tracking (``logging.report_to``): every metrics row a trainer writes to metrics.jsonl also goes, at
the same step, to TensorBoard, trackio, Weights & Biases or MLflow, through accelerate's tracker classes; the resolved
recipe is stored as the run's configuration. Main process only.

    tensorboard   event files in ``<output>/tensorboard/<run name>/`` (a resumed run purges the steps after its
                  checkpoint, so the curves carry no duplicates)
    trackio       a local trackio project (``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``)
    wandb         a W&B run in ``<output>/wandb`` (``WANDB_MODE=offline`` keeps it local)
    mlflow        an MLflow run in ``<output>/mlruns`` (a local file store) unless ``$MLFLOW_TRACKING_URI`` is set

A tracker whose package is missing stops the run before anything is written, with one line naming the package.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}
"""Tracker name -> the package it needs (``pip install align[tracking]`` has tensorboard and trackio)."""


def check_trackers(names: list) -> list[str]:
    """The trackers asked for (``none`` and duplicates dropped); a UserError for an unknown one or a missing
    package."""
    import importlib.util

    from align.errors import UserError

    out = []
    for name in names:
        if name == "none" or name in out:
            continue
        if name not in TRACKERS:
            raise UserError(f"logging.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} or none")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            from align.extras import missing_line

            raise UserError(missing_line(TRACKERS[name], f"logging.report_to: {name}"))
        out.append(name)
    return out


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested recipe as {"section.key": scalar} (lists and None as text: what trackers accept)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class Trackers:
    """The recipe's trackers, started; ``log(row)`` sends a metrics row's numbers at ``row['step']``."""

    def __init__(self, names: list[str], output_dir: Path, run_name: str, config: dict, resume_step: int = 0):
        from accelerate import tracking

        self.trackers = []
        with contextlib.redirect_stdout(sys.stderr):  # trackers print banners; stdout stays the caller's
            for name in names:
                if name == "tensorboard":
                    kw = {"purge_step": resume_step + 1} if resume_step else {}
                    t = tracking.TensorBoardTracker(run_name, output_dir / "tensorboard", **kw)
                elif name == "trackio":
                    t = tracking.TrackioTracker(run_name, name=run_name, resume="allow")
                elif name == "wandb":
                    t = tracking.WandBTracker(run_name, dir=str(output_dir), name=run_name)
                else:
                    import os

                    if not os.environ.get("MLFLOW_TRACKING_URI"):
                        os.environ["MLFLOW_TRACKING_URI"] = (output_dir / "mlruns").resolve().as_uri()
                    t = tracking.MLflowTracker(run_name, logging_dir=str(output_dir / "mlruns"))
                t.start()
                t.store_init_configuration(config)
                self.trackers.append(t)

    def log(self, row: dict) -> None:
        values = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if not values:
            return
        with contextlib.redirect_stdout(sys.stderr):
            for t in self.trackers:
                t.log(values, step=int(row["step"]))

    def finish(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            for t in self.trackers:
                t.finish()
        self.trackers = []
