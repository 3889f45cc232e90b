"""Random-point kill soak of the offline trainer (issue 8, item 2).

One uninterrupted run of the tiny DPO recipe is the reference. Then the same recipe is run into a fresh folder
``--rounds`` times, each start (after the first) with ``--resume``, and each is SIGKILLed at a random point:
a fraction ``--early`` of the kills land at a random time during start-up (imports, model build, reference
log-probs), the rest at a random time after the round's first new optimizer step (mid-step or mid-checkpoint
write). A last ``--resume`` runs to the end; its weights and metrics.jsonl must equal the reference's bitwise.
After every kill the newest complete checkpoint must still be readable. Prints one JSON object.

    .venv/bin/python bench/kill_soak.py --rounds 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "dpo" / "tiny.yaml"


def _cmd(out: Path, overrides: list[str], resume: bool) -> list[str]:
    return [sys.executable, "-m", "align", "train", str(TINY), "-o", str(out), "logging.progress=false", *overrides] + (["--resume"] if resume else [])


def _env() -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being appended right now
            break
    return rows


def _inode(out: Path) -> int | None:
    try:
        return (out / "metrics.jsonl").stat().st_ino
    except FileNotFoundError:
        return None


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


def _latest_step(out: Path) -> int:
    from align import runs

    ckpt = runs.latest_checkpoint(out)
    if ckpt is None:
        return 0
    json.loads((ckpt / runs.STATE_FILE).read_text())  # readable, or the soak fails here
    return int(ckpt.name.split("-")[1])


def soak(rounds: int, seed: int, epochs: int, save_steps: int, early: float, workdir: Path) -> dict:
    from safetensors.torch import load_file

    overrides = [f"train.epochs={epochs}", f"train.save_steps={save_steps}", "logging.plots=false"]
    ref = workdir / "reference"
    t0 = time.time()
    done = subprocess.run(_cmd(ref, overrides, False), cwd=ROOT, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    ref_wall = time.time() - t0
    summary = json.loads((ref / "summary.json").read_text())
    steps, train_wall = summary["steps"], summary["wall_seconds"]
    startup = ref_wall - train_wall
    window = 2 * train_wall / max(rounds, 1)  # on average the kills spread over the whole run

    rng = random.Random(seed)
    out = workdir / "soak"
    log, t_soak = [], time.time()
    for r in range(rounds):
        resume = out.exists()
        before = _latest_step(out) if resume else 0
        kind = "startup" if rng.random() < early else "training"
        old_inode = _inode(out)
        proc = subprocess.Popen(_cmd(out, overrides, resume), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started = time.time()
        if kind == "startup":
            time.sleep(rng.uniform(0, startup))
        else:  # wait for the round's first new step (in the metrics file the resumed run rewrote), then a random delay
            while proc.poll() is None and not (_inode(out) != old_inode and any(row["step"] > before for row in _rows(out))):
                time.sleep(0.01)
            time.sleep(rng.uniform(0, window))
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        if finished and proc.returncode != 0:
            raise RuntimeError(f"round {r}: the run failed by itself:\n{err[-2000:]}")
        # a .tmp folder this round touched: the kill landed while a checkpoint was being written
        tmp = [p.name for p in out.glob("checkpoint-*.tmp") if p.stat().st_mtime >= started - 0.01] if out.exists() else []
        rows = _rows(out)
        progressed = _inode(out) != old_inode and any(row["step"] > before for row in rows)
        log.append({"round": r, "aimed": kind, "after_s": round(time.time() - started, 2), "killed": not finished,
                    "trained": progressed, "checkpoint_before": before, "checkpoint_after": _latest_step(out) if out.exists() else 0,
                    "last_logged_step": rows[-1]["step"] if progressed else before, "mid_checkpoint_write": bool(tmp) and not finished})
        if finished:
            break
    final = None
    if not (out / "summary.json").exists():
        final = subprocess.run(_cmd(out, overrides, out.exists()), cwd=ROOT, env=_env(), capture_output=True, text=True)
        if final.returncode != 0:
            raise RuntimeError(f"final resume failed:\n{final.stderr[-2000:]}")
    soak_wall = time.time() - t_soak

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    same_metrics = _comparable(_rows(ref)) == _comparable(_rows(out))
    kills = [x for x in log if x["killed"]]
    landed = {
        "startup (no step of the round logged)": sum(1 for x in kills if not x["trained"]),
        "training": sum(1 for x in kills if x["trained"] and not x["mid_checkpoint_write"]),
        "during a checkpoint write (a .tmp folder left)": sum(1 for x in kills if x["mid_checkpoint_write"]),
    }
    redone = sum(max(0, x["last_logged_step"] - x["checkpoint_after"]) for x in kills)
    return {"steps": steps, "save_steps": save_steps, "rounds": len(log), "kills": len(kills), "landed": landed,
            "steps_redone_after_kills": redone, "reference_wall_s": round(ref_wall, 1), "soak_wall_s": round(soak_wall, 1),
            "identical_weights": identical, "identical_metrics": same_metrics, "log": log}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20, help="of the tiny recipe (16 optimizer steps each)")
    ap.add_argument("--save-steps", type=int, default=2)
    ap.add_argument("--early", type=float, default=0.2, help="fraction of kills aimed at start-up")
    ap.add_argument("--keep", help="keep the run folders here instead of a temporary folder")
    ap.add_argument("--quiet", action="store_true", help="leave the per-round log out of the output")
    args = ap.parse_args()
    result_out = os.fdopen(os.dup(1), "w")  # stdout carries the JSON only: library chatter goes to stderr
    os.dup2(2, 1)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        result = soak(args.rounds, args.seed, args.epochs, args.save_steps, args.early, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = soak(args.rounds, args.seed, args.epochs, args.save_steps, args.early, Path(tmp))
    if args.quiet:
        result.pop("log")
    print(json.dumps(result, indent=1), file=result_out, flush=True)
    return 0 if result["identical_weights"] and result["identical_metrics"] else 1


if __name__ == "__main__":
    sys.exit(main())
