"""The reward-model trainer: labelled pairs -> a Bradley-Terry or a VPL reward model.

Data flow, top to bottom:
    recipe -> pairs (prompt, chosen, rejected[, user, user_type, controversial, margin]) -> train/eval split
    -> reward model (backbone + head [+ VPL posterior encoder]) -> frozen backbone: every text embedded once
    -> for each step:
         BT:  a batch of pairs -> r_w, r_l -> Bradley-Terry loss (margin, label smoothing)
         VPL: batch_size users -> per user, context pairs C and disjoint query pairs Q (the user's own labels)
              -> q(z | C) -> z = mu + sigma * e -> r(y_w, z), r(y_l, z) on Q -> negative ELBO (KL weight annealed)
       backward, clip, step -> metrics.jsonl, checkpoints
    -> evaluation (accuracy, calibration, per user type, controversial subset; VPL: z = mu of fresh context pairs of
       the same user for every query pair) -> saved model (loads back as a judge) + summary.json.

Data parallel under ``accelerate launch`` (one process is the world = 1 case): every rank holds the whole model on
its device; rank r takes the r-th share of each step's batch_size x world pairs (VPL: users), the gradients are
averaged over the ranks before clipping, rank 0 logs, evaluates and saves. Batches are a pure function of
(seed, step), so a resumed run replays exactly the same steps.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align import runs
from align.config import Recipe
from align.errors import UserError
from align.losses.reward import bradley_terry, vpl_elbo
from align.reward_model import RewardModel, build
from align.trainers import kit


@dataclass
class Pairs:
    prompt: list[str] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    user: list = field(default_factory=list)
    user_type: list = field(default_factory=list)
    controversial: list = field(default_factory=list)
    margin: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt)

    def subset(self, idx: list[int]) -> Pairs:
        return Pairs(
            *[[getattr(self, f)[i] for i in idx] if getattr(self, f) else [] for f in self.__dataclass_fields__]
        )

    def by_user(self) -> dict:
        out: dict = {}
        for i, u in enumerate(self.user):
            out.setdefault(u, []).append(i)
        return out


def _as_text(x) -> str:
    if isinstance(x, str):
        return x
    return "\n".join(f"{m['role']}: {m['content']}" for m in x)


def load_pairs(source: str, recipe: Recipe, seed: int, split: str | None = None) -> Pairs:
    """Pairs with their user columns; every problem is a UserError naming the file and row (``split``: of an hf:
    source, default data.split)."""
    from align.data import normalise, read_rows

    rc = recipe.reward
    rows = read_rows(source, recipe.data, seed=seed, split=split)
    if rc.user_types:
        wanted = set(map(str, rc.user_types))
        rows = [r for r in rows if str(r.get(rc.user_type_key)) in wanted]
        if not rows:
            raise UserError(
                f"{source}: no row has {rc.user_type_key!r} in reward.user_types {sorted(wanted)} (see the column)"
            )
    if recipe.data.limit:
        rows = rows[: recipe.data.limit]
    kept: list[int] = []
    _, triples = normalise(rows, recipe.data, source, sft=False, kept=kept)
    p = Pairs()
    for (prompt, chosen, rejected), i in zip(triples, kept):
        row = rows[i]
        p.prompt.append(_as_text(prompt))
        p.chosen.append(_as_text(chosen))
        p.rejected.append(_as_text(rejected))
        p.user.append(row.get(rc.user_key))
        p.user_type.append(row.get(rc.user_type_key))
        p.controversial.append(row.get(rc.controversial_key))
        if rc.margin_key is not None:
            m = row.get(rc.margin_key)
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
                raise UserError(
                    f"{source}: row {i}: column {rc.margin_key!r} (reward.margin_key) must be a finite number, got "
                    f"{m!r}"
                )
            p.margin.append(float(m))
    if rc.kind == "vpl":
        missing = next((i for i, u in zip(kept, p.user) if u is None), None)
        if missing is not None:
            raise UserError(
                f"{source}: row {missing}: missing column {rc.user_key!r} (reward.user_key; VPL needs a user id per "
                "pair)"
            )
        if all(len(v) < 2 for v in p.by_user().values()):
            raise UserError(f"{source}: every user has a single pair; VPL needs users with several labelled pairs")
    return p


def split_pairs(recipe: Recipe) -> tuple[Pairs, Pairs | None]:
    t, rc = recipe.train, recipe.reward
    train = load_pairs(recipe.data.train, recipe, t.seed)
    if recipe.data.eval:
        return train, load_pairs(recipe.data.eval, recipe, t.seed, recipe.data.eval_split)
    if not rc.eval_fraction:
        return train, None
    rng = random.Random(f"reward-split-{t.seed}")
    if rc.kind == "vpl":  # hold out whole users
        users = sorted(train.by_user(), key=str)
        rng.shuffle(users)
        held = set(users[: max(1, round(rc.eval_fraction * len(users)))])
        ev = [i for i, u in enumerate(train.user) if u in held]
    else:
        ev = sorted(rng.sample(range(len(train)), max(1, round(rc.eval_fraction * len(train)))))
    held_idx = set(ev)
    return train.subset([i for i in range(len(train)) if i not in held_idx]), train.subset(ev)


# ---------------------------------------------------------------------------------------------------- embeddings


class Embeddings:
    """Texts -> embeddings. Frozen backbone: each distinct text is embedded once (``cache`` may be shared between
    runs on the same backbone, e.g. by the benchmark); trainable backbone: embedded in every forward pass."""

    def __init__(self, model: RewardModel, frozen: bool, cache: dict | None = None, progress: bool = True):
        self.model, self.frozen, self.progress = model, frozen, progress
        key = (model.cfg["backbone"], model.cfg["pooling"], model.cfg["max_length"])  # what an embedding depends on
        self.cache = (cache if cache is not None else {}).setdefault(key, {})

    def warm(self, texts: list[str], batch_size: int = 64) -> None:
        if not self.frozen:
            return
        todo = sorted({t for t in texts if t not in self.cache})
        prog = runs.Progress(len(todo), "embed", enabled=self.progress and len(todo) > batch_size)
        with torch.no_grad():
            for s in range(0, len(todo), batch_size):
                chunk = todo[s : s + batch_size]
                for t, e in zip(chunk, self.model.embed(chunk, batch_size)):
                    self.cache[t] = e
                if (s // batch_size) % 10 == 9:
                    prog.update(s + len(chunk))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.frozen:
            return torch.stack([self.cache[t] for t in texts])
        return self.model.embed(texts)


def _texts(p: Pairs, idx: list[int], which: str) -> list[str]:
    resp = p.chosen if which == "w" else p.rejected
    return [p.prompt[i] + resp[i] for i in idx]


# ------------------------------------------------------------------------------------------------- VPL sampling


def vpl_batch(
    users: dict, keys: list, n_users: int, n_ctx: int, n_query: int, g: torch.Generator, prompts: list | None = None
):
    """For ``n_users`` users drawn with replacement: context and disjoint query pair indices, padded with -1. With
    ``prompts`` (each pair's prompt), no context pair shares a prompt with a query pair (as vpl_llm: the context
    must not reveal the answer to a query)."""
    ctx, qry = torch.full((n_users, n_ctx), -1), torch.full((n_users, n_query), -1)
    for row, k in enumerate(torch.randint(len(keys), (n_users,), generator=g).tolist()):
        idx = users[keys[k]]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        if prompts is None:
            c = min(n_ctx, len(perm) - 1)
            q = min(n_query, len(perm) - c)
            ctx[row, :c] = torch.tensor(perm[:c], dtype=torch.long)
            qry[row, :q] = torch.tensor(perm[c : c + q], dtype=torch.long)
            continue
        q_idx = perm[: min(n_query, len(perm) - 1)]
        asked = {prompts[i] for i in q_idx}
        c_idx = [i for i in perm[len(q_idx) :] if prompts[i] not in asked][:n_ctx]
        if not c_idx:  # every other pair repeats a query's prompt: keep one query fewer as context
            q_idx, c_idx = q_idx[:-1], q_idx[-1:]
        ctx[row, : len(c_idx)] = torch.tensor(c_idx, dtype=torch.long)
        qry[row, : len(q_idx)] = torch.tensor(q_idx, dtype=torch.long)
    return ctx, qry


def _gather(emb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return emb[idx.clamp(min=0)]


def eval_contexts(p: Pairs, n_ctx: int, seed: int) -> torch.Tensor:
    """For every pair i: up to n_ctx other pairs of the same user with another prompt (a pair on the same prompt
    would give the answer away), freshly sampled per pair ([n, n_ctx], -1 pad)."""
    g = torch.Generator().manual_seed(seed)
    users = p.by_user()
    out = torch.full((len(p), n_ctx), -1)
    for i, u in enumerate(p.user):
        others = [j for j in users[u] if p.prompt[j] != p.prompt[i]]
        pick = torch.randperm(len(others), generator=g)[:n_ctx].tolist()
        out[i, : len(pick)] = torch.tensor([others[j] for j in pick], dtype=torch.long)
    return out


@torch.no_grad()
def pair_probabilities(
    model: RewardModel, emb: Embeddings, p: Pairs, n_ctx: int = 8, seed: int = 0, batch: int = 256
) -> torch.Tensor:
    """P(chosen > rejected) for every pair under the model; VPL: z = mu of fresh context pairs of the pair's user."""
    model.eval()
    out = []
    ctx_all = eval_contexts(p, n_ctx, seed) if model.cfg["kind"] == "vpl" else None
    for s in range(0, len(p), batch):
        idx = list(range(s, min(s + batch, len(p))))
        ew, el = emb(_texts(p, idx, "w")), emb(_texts(p, idx, "l"))
        z = None
        if ctx_all is not None:
            c = ctx_all[idx]
            flat = sorted({j for j in c.flatten().tolist() if j >= 0})
            pos = {j: k for k, j in enumerate(flat)}
            cw, cl = emb(_texts(p, flat, "w")), emb(_texts(p, flat, "l"))
            ci = torch.tensor([[pos.get(j, 0) for j in r] for r in c.tolist()])
            z, _ = model.posterior(cw[ci], cl[ci], (c >= 0).to(cw.device))
        out.append(torch.sigmoid(model.reward(ew, z) - model.reward(el, z)).float().cpu())
    return torch.cat(out)


def evaluate(model: RewardModel, emb: Embeddings, p: Pairs, n_ctx: int, seed: int) -> dict:
    """accuracy, calibration (ECE over 10 confidence bins), mean P, per user type, and on the controversial subset."""
    prob = pair_probabilities(model, emb, p, n_ctx, seed)
    right = (prob > 0.5).float()
    conf = torch.maximum(prob, 1 - prob)
    ece = 0.0
    for b in range(10):
        m = (conf > 0.5 + b * 0.05) & (conf <= 0.5 + (b + 1) * 0.05) if b else (conf <= 0.55)
        if m.any():
            ece += m.float().mean().item() * abs(right[m].mean().item() - conf[m].mean().item())
    out = {"accuracy": right.mean().item(), "ece": ece, "p_chosen": prob.mean().item(), "pairs": len(p)}
    types = sorted({t for t in p.user_type if t is not None}, key=str)
    for ut in types:
        m = torch.tensor([t == ut for t in p.user_type])
        out[f"accuracy/{ut}"] = right[m].mean().item()
    if any(c is not None for c in p.controversial):
        m = torch.tensor([bool(c) for c in p.controversial])
        if m.any():
            out["controversial_accuracy"] = right[m].mean().item()
        if (~m).any():
            out["agreed_accuracy"] = right[~m].mean().item()
    return out


# ------------------------------------------------------------------------------------------------------ training


def _save_checkpoint(
    accelerator, output_dir: Path, step: int, recipe: Recipe, model, optimizer, scheduler, window: list[dict]
) -> None:
    """checkpoint-<step>/: the trainable parameters, optimizer and scheduler (the same on every rank: written once),
    and every rank's unlogged metrics; via checkpoint-<step>.tmp, renamed when complete."""
    tmp, final = output_dir / f"checkpoint-{step}.tmp", output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(
            {"trainable": trainable, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            tmp / "state.pt",
        )
    accelerator.wait_for_everyone()
    runs.save_window(tmp, accelerator.process_index, window)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        runs.finish_checkpoint(
            tmp,
            final,
            {"step": step, "recipe_fingerprint": runs.recipe_fingerprint(recipe)},
            recipe.train.keep_checkpoints,
        )
    accelerator.wait_for_everyone()


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False, cache: dict | None = None) -> dict:
    """Run a reward recipe (trainer 'reward') into ``output_dir``; returns the summary (rank 0; {} on the others).
    ``cache`` shares frozen embeddings between runs on the same backbone."""
    from align.rollout.zero import unpartitioned

    t, rc = recipe.train, recipe.reward
    output_dir = Path(output_dir)
    runs.prepare_output_dir(output_dir, resume)
    accelerator = kit.make_accelerator(1)
    world, rank, main, device = (
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.is_main_process,
        accelerator.device,
    )

    # ---- data and model (every input check before anything is written)
    train_p, eval_p = split_pairs(recipe)
    vpl = rc.kind == "vpl"
    users = train_p.by_user() if vpl else {}
    keys = sorted((u for u, v in users.items() if len(v) >= 2), key=str)
    per_step = t.batch_size * world * (rc.query_pairs if vpl else 1)
    per_epoch = max(1, math.ceil(len(train_p) / per_step))
    total = t.max_steps or per_epoch * t.epochs
    torch.manual_seed(t.seed)
    with unpartitioned(accelerator):  # every rank holds the whole (small) reward model: data parallel
        model = build(recipe.model, rc, recipe.data.max_length, t.seed)
    if recipe.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model.backbone = get_peft_model(
            model.backbone,
            PeftLoraConfig(
                r=recipe.lora.r,
                lora_alpha=recipe.lora.alpha,
                lora_dropout=recipe.lora.dropout,
                target_modules=recipe.lora.target_modules,
                task_type="FEATURE_EXTRACTION",
            ),
        )
    elif not rc.train_backbone:
        model.backbone.requires_grad_(False)
    model.to(device)
    emb = Embeddings(model, frozen=not rc.train_backbone, cache=cache, progress=recipe.logging.progress and main)
    all_pairs = [train_p] + ([eval_p] if eval_p is not None else [])
    emb.warm([x for p in all_pairs for w in "wl" for x in _texts(p, list(range(len(p))), w)])

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = kit.make_scheduler(optimizer, total, t.schedule, t.warmup_steps)
    start, window = 0, []
    ckpt = runs.latest_checkpoint(output_dir) if resume else None
    if ckpt is not None:
        state = runs.read_state(ckpt, recipe)
        saved = torch.load(ckpt / "state.pt", map_location=device)
        model.load_state_dict(saved["trainable"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start, window = state["step"], runs.load_window(ckpt, rank)
    log, progress = kit.open_run(accelerator, output_dir, recipe, start, total, f"reward:{rc.kind}")

    # ---- the loop (rank r takes the r-th share of each step's batch_size x world pairs or users)
    started = time.time()
    margins = torch.tensor(train_p.margin) if train_p.margin else None
    for step in range(start, total):
        # dropout in a trainable backbone, VPL's z noise: a function of (seed, step, rank), the same on resume
        torch.manual_seed(t.seed * 1_000_003 + step + rank * kit.RANK_SEED_STRIDE)
        model.train()
        if vpl:
            g = torch.Generator().manual_seed(t.seed * 7919 + step)
            ctx, qry = vpl_batch(users, keys, t.batch_size * world, rc.context_pairs, rc.query_pairs, g, train_p.prompt)
            ctx, qry = (
                ctx[rank * t.batch_size : (rank + 1) * t.batch_size],
                qry[rank * t.batch_size : (rank + 1) * t.batch_size],
            )
            flat = sorted({j for j in torch.cat([ctx.flatten(), qry.flatten()]).tolist() if j >= 0})
            pos = torch.zeros(len(train_p), dtype=torch.long)
            pos[flat] = torch.arange(len(flat))
            ew, el = emb(_texts(train_p, flat, "w")), emb(_texts(train_p, flat, "l"))
            cmask = (ctx >= 0).to(device)
            mu, logvar = model.posterior(
                _gather(ew, pos[ctx.clamp(min=0)].to(device)), _gather(el, pos[ctx.clamp(min=0)].to(device)), cmask
            )
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            qi = pos[qry.clamp(min=0)].to(device)
            beta = rc.kl_beta * (min(1.0, (step + 1) / rc.kl_anneal_steps) if rc.kl_anneal_steps else 1.0)
            per, metrics = vpl_elbo(
                model.reward(ew[qi], z), model.reward(el[qi], z), mu, logvar, beta, mask=(qry >= 0).to(device)
            )
            metrics["kl_beta"] = torch.tensor(beta)
        else:
            epoch, k = divmod(step, per_epoch)
            order = kit.data_order(len(train_p), t.seed, epoch)
            block = order[k * t.batch_size * world : (k + 1) * t.batch_size * world] or order[: t.batch_size * world]
            idx = block[rank * t.batch_size : (rank + 1) * t.batch_size] or block[: t.batch_size]
            rw, rl = model.reward(emb(_texts(train_p, idx, "w"))), model.reward(emb(_texts(train_p, idx, "l")))
            m = margins[idx].to(device) if margins is not None else None
            per, metrics = bradley_terry(rw, rl, m, rc.label_smoothing)
        loss = per.mean()
        bad = float(not torch.isfinite(loss))
        if world > 1:
            bad = accelerator.reduce(torch.tensor(bad, device=device), "sum").item()
        if bad:
            if t.nan_policy == "stop":
                raise kit.NonFiniteLoss(
                    f"non-finite loss at step {step + 1}; the last good checkpoint is kept in {output_dir}"
                )
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            continue
        loss.backward()
        if world > 1:
            kit.average_gradients(trainable)
        grad_norm = None
        if t.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window.append({"loss": loss.item(), **{k: v.float().mean().item() for k, v in metrics.items()}})
        done = step + 1
        if done % t.logging_steps == 0 or done == total:
            means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            if world > 1:
                means = {k: accelerator.reduce(torch.tensor(v, device=device), "mean").item() for k, v in means.items()}
            row = {"step": done, "epoch": round(done / per_epoch, 4), "lr": scheduler.get_last_lr()[0], **means}
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            window = []
            if main:
                log.log(row)
                progress.update(done, f"loss {row['loss']:.4f} acc {row['accuracy']:.3f}")
        if t.save_steps and done % t.save_steps == 0 and done < total:
            _save_checkpoint(accelerator, output_dir, done, recipe, model, optimizer, scheduler, window)

    # ---- evaluation and outputs (rank 0; the model is the same on every rank)
    wall = time.time() - started
    summary = {}
    if main:
        final = dict(log.rows[-1]) if log.rows else {}
        if eval_p is not None:
            ev = evaluate(model, emb, eval_p, rc.context_pairs, rc.eval_seed)
            final.update({f"eval/{k}": v for k, v in ev.items()})
            log.log({"step": total, **{f"eval/{k}": v for k, v in ev.items()}})
        model.eval()
        model.to("cpu").save(output_dir)
        summary = {
            "trainer": "reward",
            "kind": rc.kind,
            "steps": total,
            "pairs": len(train_p),
            "users": len(keys) if vpl else None,
            "eval_pairs": len(eval_p) if eval_p is not None else 0,
            "backbone": "trained" if rc.train_backbone else "frozen",
            "processes": world,
            "wall_seconds": round(wall, 3),
            "final": final,
        }
        kit.write_outputs(output_dir, recipe, log, summary, rows=[r for r in log.rows if "loss" in r])
    kit.finish(accelerator)
    return summary
