"""Random-point kill soak of a trainer (issue 8, item 2): offline, online, reward or agent (``--trainer``).

One uninterrupted run of a tiny recipe is the reference. Then the same recipe is run into a fresh folder
``--rounds`` times, each start (after the first) with ``--resume``, and each is SIGKILLed at a random point: a
fraction ``--early`` of the kills land at a random time during start-up (imports, model build, reference log-probs,
embeddings: as long as the reference run took to start its metrics.jsonl), a fraction ``--aim-checkpoint`` a few
milliseconds after a ``checkpoint-N.tmp`` folder appears (mid-checkpoint write), the rest at a random time after the
round's training began (offline: its first new optimizer step; the others: the resumed run rewrote metrics.jsonl) --
mid-step, and for the online and agent trainers mid-rollout or mid-update. A last ``--resume`` runs to the end; its
saved tensors and metrics.jsonl (timing columns aside) must equal the reference's bitwise. After every kill the
newest complete checkpoint must be readable (its state and its tensors load) and no process the killed trainer
started (sandbox workers) may outlive it. Where each kill landed is read from the run folder after the kill: no new
metrics file = start-up; a fresh ``checkpoint-N.tmp`` = mid-checkpoint write; the online and agent trainers:
``rollouts/iter-N.json`` of the next iteration present = mid-update, absent = mid-rollout; after the last step =
final evaluation / model write.
Prints one JSON object.

    .venv/bin/python -m align.bench.kill_soak --rounds 20 --seed 0          # offline (tiny DPO)
    .venv/bin/python -m align.bench.kill_soak --trainer online --rounds 15 --seed 0 --early 0.3
                                                             # SPO from a tiny SFT policy
    (reward: VPL with a LoRA-trained tiny backbone; agent: LOOP on the sandboxed built-in world from a tiny SFT policy)
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
from dataclasses import dataclass, field
from pathlib import Path

from align.paths import REPO_ROOT as ROOT

TIMING = {"tokens_per_second"}  # metrics.jsonl columns that depend on the clock


def _sft_tasks(work: Path) -> list[str]:
    """The online trainer needs a policy that is sometimes right (a fresh model never is: no training rows)."""
    _run(
        [
            "train",
            str(ROOT / "recipes/sft/tiny.yaml"),
            "-o",
            str(work / "policy"),
            "logging.progress=false",
            "logging.plots=false",
        ]
    )
    return [f"model.name_or_path={work / 'policy'}"]


def _sft_agent(work: Path) -> list[str]:
    """The agent trainer likewise: episodes of a task must differ in reward, or every advantage is 0 (a fresh model, or
    a shorter SFT, never changes the world's state). 96 SFT steps on 768 demonstrations: about half the iterations
    train."""
    from align.bench.agent import demonstrations

    (work / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demonstrations(6, 50, 0)))
    _run(
        [
            "train",
            str(ROOT / "recipes/sft/agent-tiny.yaml"),
            "-o",
            str(work / "policy"),
            f"data.train={work / 'demos.jsonl'}",
            "logging.progress=false",
            "logging.plots=false",
        ]
    )
    return [f"model.name_or_path={work / 'policy'}"]


@dataclass
class Trainer:
    recipe: str
    overrides: list[str]
    weights: list[str]  # the saved tensors compared with the reference's
    checkpoint_file: str  # loaded from the newest checkpoint after every kill
    iterative: bool = False  # online, agent: rollouts/iter-N.json, then the update, a checkpoint per iteration
    save_steps: int | None = None  # default of --save-steps (step trainers)
    labels: dict = field(default_factory=dict)  # phase -> the name it is counted under (default: the phase)
    prepare: object = None  # work folder -> extra overrides (a starting policy), run once before the reference


TRAINERS = {
    "offline": Trainer(
        "dpo/tiny.yaml",
        ["logging.plots=false"],
        ["model.safetensors"],
        "model.safetensors",
        save_steps=2,
        labels={
            "startup": "startup (no step of the round logged)",
            "training": "training",
            "final": "training",
            "checkpoint": "during a checkpoint write (a .tmp folder left)",
        },
    ),
    "online": Trainer(
        "spo/tiny.yaml",
        ["online.prompts_per_iteration=64", "online.iterations=12", "logging.plots=false"],
        ["model.safetensors"],
        "model.safetensors",
        iterative=True,
        prepare=_sft_tasks,
    ),
    "reward": Trainer(
        "reward/pets-vpl.yaml",
        [
            "model.name_or_path=tiny:llama",
            "data.limit=400",
            "data.max_length=96",
            "data.max_prompt_length=64",
            "reward.train_backbone=true",
            "lora.enabled=true",
            "lora.r=4",
            "lora.alpha=8",
            "train.max_steps=200",
            "train.batch_size=4",
            "reward.context_pairs=2",
            "reward.query_pairs=2",
            "logging.plots=false",
        ],
        ["heads.safetensors", "backbone/model.safetensors"],
        "state.pt",
        save_steps=4,
    ),
    "agent": Trainer(
        "loop/tiny.yaml",
        [
            "rollout.n=3",
            "rollout.max_new_tokens=96",
            "agent.tasks_per_iteration=8",
            "agent.iterations=8",
            "agent.eval_split=null",
            "train.batch_size=6",
            "logging.plots=false",
        ],
        ["model.safetensors"],
        "model.safetensors",
        iterative=True,
        prepare=_sft_agent,
    ),
}


def _env() -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def _cmd(recipe: str, out: Path, overrides: list[str], resume: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "align",
        "train",
        str(ROOT / "recipes" / recipe),
        "-o",
        str(out),
        "logging.progress=false",
        *overrides,
    ] + (["--resume"] if resume else [])


def _run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "align", *args], cwd=ROOT, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])


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
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _load(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    return torch.load(path, weights_only=False)


def _latest_step(out: Path, tensors: str) -> int:
    """The newest complete checkpoint's step; its state and its tensors must load, or the soak fails here."""
    from align import runs

    ckpt = runs.latest_checkpoint(out)
    if ckpt is None:
        return 0
    json.loads((ckpt / runs.STATE_FILE).read_text())
    _load(ckpt / tensors)
    return int(ckpt.name.split("-")[1])


def _fresh_tmp(out: Path, since: float) -> list[str]:
    """checkpoint-N.tmp folders written since ``since`` (a stale one from an earlier kill may be reused)."""
    found = []
    for p in out.glob("checkpoint-*.tmp"):
        try:
            if max([p.stat().st_mtime] + [f.stat().st_mtime for f in p.iterdir()]) >= since - 0.01:
                found.append(p.name)
        except FileNotFoundError:  # renamed or removed while looking
            pass
    return found


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the trainer was started as its leader: its children inherit it)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def _leftovers(sid: int, members: list[int], wait: float = 10.0) -> tuple[int, int]:
    """After the trainer (session leader ``sid``) was killed: (processes of its session still alive after ``wait`` s,
    sandbox folders of ``members`` left behind). Stragglers are killed so that nothing outlives the soak."""
    deadline, alive = time.time() + wait, _session(sid)
    while alive and time.time() < deadline:
        time.sleep(0.05)
        alive = _session(sid)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    tmp = Path(tempfile.gettempdir())
    dirs = [d for pid in members for d in tmp.glob(f"align-sandbox-{pid}-*")]
    return len(alive), len(dirs)


def _phase(t: Trainer, out: Path, progressed: bool, tmp: list[str], last: int, total: int) -> str:
    """Where a kill landed, read from the run folder after the kill (nothing changes there any more)."""
    if not progressed:
        return "startup"
    if tmp:
        return "checkpoint"
    if last >= total:
        return "final"
    if not t.iterative:
        return "training"
    return "update" if (out / "rollouts" / f"iter-{last + 1}.json").exists() else "rollout"


def soak(
    trainer: str, rounds: int, seed: int, overrides: list[str], early: float, aim_checkpoint: float, workdir: Path
) -> dict:
    t = TRAINERS[trainer]
    t0 = time.time()
    if t.prepare is not None:
        overrides = t.prepare(workdir) + overrides
    prepare_wall = time.time() - t0
    overrides = t.overrides + overrides
    ref = workdir / "reference"
    t0 = time.time()
    done = subprocess.Popen(
        _cmd(t.recipe, ref, overrides, False),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    while done.poll() is None and not (ref / "metrics.jsonl").exists():  # written once the training loop starts
        time.sleep(0.01)
    startup = time.time() - t0
    _, err = done.communicate()
    if done.returncode != 0:
        raise RuntimeError(err[-2000:])
    ref_wall = time.time() - t0
    summary = json.loads((ref / "summary.json").read_text())
    steps, train_wall = summary["steps"], summary["wall_seconds"]
    window = 2 * train_wall / max(rounds, 1)  # on average the kills spread over the whole run

    rng = random.Random(seed)
    out = workdir / "soak"
    log, t_soak, leaked = [], time.time(), {"processes": 0, "sandbox_folders": 0}
    for r in range(rounds):
        resume = out.exists()
        before = _latest_step(out, t.checkpoint_file) if resume else 0
        x = rng.random()
        kind = "startup" if x < early else "checkpoint" if x < early + aim_checkpoint else "training"
        old_inode = _inode(out)
        proc = subprocess.Popen(
            _cmd(t.recipe, out, overrides, resume),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started = time.time()

        def began(old_inode=old_inode, before=before) -> bool:  # the round's training began: offline, its first
            # new step; else the rewritten metrics file
            return _inode(out) != old_inode and (
                trainer != "offline" or any(row["step"] > before for row in _rows(out))
            )

        if kind == "startup":
            time.sleep(rng.uniform(0, startup))
        elif kind == "training":
            while proc.poll() is None and not began():
                time.sleep(0.01)
            time.sleep(rng.uniform(0, window))
        else:  # a checkpoint write begins: kill a few milliseconds into it
            while proc.poll() is None and not _fresh_tmp(out, started):
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.02))
        members = _session(proc.pid)  # the trainer and what it started (sandbox zygote and workers)
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        if finished and proc.returncode != 0:
            raise RuntimeError(f"round {r}: the run failed by itself:\n{err[-2000:]}")
        procs, dirs = _leftovers(proc.pid, members)
        leaked["processes"] += procs
        leaked["sandbox_folders"] += dirs
        # a .tmp folder this round touched: the kill landed while a checkpoint was being written
        tmp = _fresh_tmp(out, started) if out.exists() else []
        progressed = began()
        rows = _rows(out)
        last = rows[-1]["step"] if progressed and rows else before
        log.append(
            {
                "round": r,
                "aimed": kind,
                "after_s": round(time.time() - started, 2),
                "killed": not finished,
                "trained": progressed,
                "checkpoint_before": before,
                "checkpoint_after": _latest_step(out, t.checkpoint_file) if out.exists() else 0,
                "last_logged_step": last,
                "mid_checkpoint_write": bool(tmp) and not finished,
                "phase": _phase(t, out, progressed, tmp, last, steps),
            }
        )
        if finished:
            break
    if not (out / "summary.json").exists():
        final = subprocess.run(
            _cmd(t.recipe, out, overrides, out.exists()), cwd=ROOT, env=_env(), capture_output=True, text=True
        )
        if final.returncode != 0:
            raise RuntimeError(f"final resume failed:\n{final.stderr[-2000:]}")
    soak_wall = time.time() - t_soak

    differing = []
    for name in t.weights:
        a, b = _load(ref / name), _load(out / name)
        differing += [
            f"{name}:{k}" for k in a.keys() | b.keys() if k not in a or k not in b or not bool((a[k] == b[k]).all())
        ]
    kills = [x for x in log if x["killed"]]
    phases = (
        ["startup", "rollout", "update", "checkpoint", "final"]
        if t.iterative
        else ["startup", "training", "checkpoint", "final"]
    )
    landed = {t.labels.get(p, p): 0 for p in phases}
    for x in kills:
        landed[t.labels.get(x["phase"], x["phase"])] += 1
    redone = sum(max(0, x["last_logged_step"] - x["checkpoint_after"]) for x in kills)
    saves = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.save_steps=")]
    result = {
        "trainer": trainer,
        "steps": steps,
        "save_steps": saves[-1] if saves else 1,
        "rounds": len(log),
        "kills": len(kills),
        "landed": landed,
        "steps_redone_after_kills": redone,
        "prepare_wall_s": round(prepare_wall, 1),
        "reference_wall_s": round(ref_wall, 1),
        "soak_wall_s": round(soak_wall, 1),
        "identical_weights": not differing,
        "identical_metrics": _comparable(_rows(ref)) == _comparable(_rows(out)),
        "left_behind": leaked,
        "log": log,
    }
    if differing:
        result["differing_tensors"] = sorted(differing)[:20]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trainer", choices=sorted(TRAINERS), default="offline")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--epochs", type=int, default=20, help="offline: epochs of the tiny recipe (16 optimizer steps each)"
    )
    ap.add_argument(
        "--save-steps",
        type=int,
        help="offline and reward: a checkpoint every N steps (default 2 and 4; the "
        "online and agent trainers write one after every iteration)",
    )
    ap.add_argument("--early", type=float, default=0.2, help="fraction of kills aimed at start-up")
    ap.add_argument(
        "--aim-checkpoint",
        type=float,
        help="fraction of kills aimed at a checkpoint write (default: offline 0, else 0.2)",
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a further recipe override (repeatable)"
    )
    ap.add_argument("--keep", help="keep the run folders here instead of a temporary folder")
    ap.add_argument("--quiet", action="store_true", help="leave the per-round log out of the output")
    args = ap.parse_args()
    t = TRAINERS[args.trainer]
    overrides = ([f"train.epochs={args.epochs}"] if args.trainer == "offline" else []) + list(args.set)
    if t.save_steps is not None:
        overrides.append(f"train.save_steps={args.save_steps or t.save_steps}")
    aim = args.aim_checkpoint if args.aim_checkpoint is not None else (0.0 if args.trainer == "offline" else 0.2)
    result_out = os.fdopen(os.dup(1), "w")  # stdout carries the JSON only: library chatter goes to stderr
    os.dup2(2, 1)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        result = soak(args.trainer, args.rounds, args.seed, overrides, args.early, aim, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = soak(args.trainer, args.rounds, args.seed, overrides, args.early, aim, Path(tmp))
    if args.quiet:
        result.pop("log")
    print(json.dumps(result, indent=1), file=result_out, flush=True)
    ok = result["identical_weights"] and result["identical_metrics"] and not any(result["left_behind"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
