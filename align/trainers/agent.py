"""The agent trainer: LOOP (leave-one-out PPO) for multi-turn, code-executing agents, and its ablations.

Data flow, top to bottom (Chen et al. 2025, Algorithm 1):
    recipe -> policy (+LoRA: one model copy, no reference, no value network) -> rollout engine
    -> for each iteration:
         1. sample agent.tasks_per_iteration training tasks; K = rollout.n episodes each through the engine
            (align/rollout/episodes.py: model turns = Python code, environment turns = execution output, masked)
         2. R_k = fraction of the task's state checks passed; A_k = R_k - mean_{i != k} R_i  (grpo: (R_k - mean) / std)
            episodes with |A_k| < agent.min_advantage are dropped
         3. the learner recomputes log pi_old for every kept episode (no grad), then agent.epochs_per_iteration
            epochs of minibatches shuffled across tasks: the `loop` loss (per-token clipped PPO, env tokens masked)
         4. update_weights -> engine; rollouts/iter-N.json and a checkpoint
    -> final model + summary; greedy evaluation on agent.eval_split (TGC, SGC)

Ablations by recipe: RLOO = agent.epochs_per_iteration 1 (one on-policy step, rho = 1); GRPO = agent.advantage grpo;
trajectory-level importance weights = loss.importance trajectory. Resumable per iteration.

Under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3) the online trainer's scheme: rank r plays tasks[r::world]
with its own seed, the episodes are gathered to every rank in task order and rank 0 writes ``rollouts/iter-N.json``;
every rank recomputes pi_old for all kept episodes and takes its equal share of each global minibatch; under
ZeRO-3 the hf engine plays from an unsharded copy of the policy (``align/rollout/zero.py``). The final greedy
evaluation is sharded the same way.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from align import runs
from align.config import Recipe
from align.data import Example, collate
from align.errors import UserError
from align.logprobs import token_logps
from align.losses import PairBatch, get_loss
from align.models import load_policy, save_model
from align.rollout import SamplingParams, make_engine
from align.rollout.episodes import run_episodes
from align.trainers.offline import finish, make_accelerator, peak_memory_mb, save_checkpoint
from align.rollout.zero import UnshardedCopy, unpartitioned, zero_stage
from align.trainers.online import RANK_SEED_STRIDE, rank_minibatches, shard_and_gather, start_iterations, update

EPISODE_CHUNK = 64  # environments (sandbox processes) alive at once


# ------------------------------------------------------------------------------------------- tasks and envs


def load_tasks(recipe: Recipe, split: str) -> list:
    a = recipe.agent
    if a.world == "builtin":
        from align.agents.world import tasks_for

        tasks = tasks_for(split, seed=a.world_seed)
        if not tasks:
            raise UserError(f"agent.split: the built-in world has no {split!r} split (train, dev, test)")
        return tasks
    from align.agents.appworld import appworld_tasks

    return appworld_tasks(split, a.appworld_url)


def make_env(recipe: Recipe, task):
    a = recipe.agent
    if a.world == "builtin":
        from align.agents.env import WorldEnv

        env = WorldEnv(task, turn_timeout=a.turn_timeout)
        if not a.show_docs:
            env.show_docs = False
        return env
    from align.agents.appworld import AppWorldEnv

    return AppWorldEnv(task, a.appworld_url)


def play(engine, tokenizer, tasks: list, k: int, sampling: SamplingParams, max_turns: int, env_for) -> list[dict]:
    """K episodes per task; returns plain rows (task id, scenario, token ids, masks, log-probs, reward, success)."""
    jobs = [(t, j) for t in tasks for j in range(k)]
    rows = []
    for s in range(0, len(jobs), EPISODE_CHUNK):
        chunk = jobs[s:s + EPISODE_CHUNK]
        envs = [env_for(t) for t, _ in chunk]
        try:
            sp = SamplingParams(**{**sampling.__dict__, "seed": None if sampling.seed is None else sampling.seed + s})
            episodes = run_episodes(engine, tokenizer, envs, sp, max_turns=max_turns)
            for (task, _), env, ep in zip(chunk, envs, episodes):
                res = env.evaluate()
                rows.append({"task": task.id, "scenario": task.scenario, "difficulty": getattr(task, "difficulty", None),
                             "token_ids": ep.token_ids, "mask": ep.model_mask, "logprobs": ep.logprobs,
                             "reward": float(res["reward"]), "success": bool(res["success"]), "turns": ep.turns,
                             "finished": ep.finished, "text": [m["content"] for m in ep.messages if m["role"] == "assistant"]})
        finally:
            for env in envs:
                env.close()
    return rows


def mid_turn_suppressed(tok) -> list[int]:
    """Token ids a small policy must not sample inside a turn: pad, bos and unk (eos ends the turn)."""
    return sorted({i for i in (tok.pad_token_id, tok.bos_token_id, tok.unk_token_id) if i is not None and i != tok.eos_token_id})


def advantages(rewards: list[float], kind: str) -> list[float]:
    """Leave-one-out (LOOP, RLOO): A_k = R_k - mean_{i != k} R_i; grpo: (R_k - mean R) / (std R + 1e-4)."""
    k = len(rewards)
    if kind == "grpo":
        mean = sum(rewards) / k
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(k - 1, 1))
        return [(r - mean) / (std + 1e-4) for r in rewards]
    total = sum(rewards)
    return [r - (total - r) / (k - 1) for r in rewards]


def scores(rows: list[dict]) -> dict:
    """TGC: % of tasks whose checks all passed; SGC: % of scenarios whose tasks all passed (AppWorld's metrics)."""
    by_task: dict = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    task_ok = {t: all(x["success"] for x in v) for t, v in by_task.items()}
    scen: dict = {}
    for t, v in by_task.items():
        scen.setdefault(v[0]["scenario"], []).append(task_ok[t])
    diff: dict = {}
    for t, v in by_task.items():
        diff.setdefault(str(v[0].get("difficulty")), []).append(task_ok[t])
    return {"tgc": 100.0 * sum(task_ok.values()) / max(len(task_ok), 1),
            "sgc": 100.0 * sum(all(v) for v in scen.values()) / max(len(scen), 1),
            "reward": sum(r["reward"] for r in rows) / max(len(rows), 1), "tasks": len(task_ok), "scenarios": len(scen),
            "tgc_by_difficulty": {d: 100.0 * sum(v) / len(v) for d, v in sorted(diff.items())}}


# ------------------------------------------------------------------------------------------------ learner


def _batch(rows: list[dict], pad: int, device) -> dict:
    exs = [Example(i, [], r["token_ids"], None) for i, r in enumerate(rows)]
    batch = collate(exs, pad)
    mask = torch.zeros(len(rows), batch["input_ids"].shape[1] - 1)
    for i, r in enumerate(rows):
        m = torch.tensor(r["mask"][1:], dtype=torch.float)
        mask[i, :len(m)] = m
    batch["mask"] = mask
    return {k: v.to(device) for k, v in batch.items()}


def episode_token_logps(model, rows: list[dict], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each episode's tokens (labels shifted) and the mask of the model's own tokens."""
    b = _batch(rows, pad, device)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    return token_logps(out.logits[:, :-1], b["input_ids"][:, 1:]) * b["mask"], b["mask"]


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False, env_for=None) -> dict:
    """Run an agent recipe (trainer 'agent') into ``output_dir``; returns the summary. ``env_for(task)`` overrides the
    environment factory (tests)."""
    from accelerate.utils import gather_object, set_seed

    t, a = recipe.train, recipe.agent
    spec = get_loss(recipe.loss.name)
    output_dir = Path(output_dir)
    runs.prepare_output_dir(output_dir, resume)
    accelerator = make_accelerator(1)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    set_seed(t.seed)
    env_for = env_for or (lambda task: make_env(recipe, task))

    plain_engine = zero_stage(accelerator) == 3 and recipe.rollout.backend == "hf"  # see the online trainer
    with unpartitioned(accelerator, enabled=plain_engine):
        model, tok = load_policy(recipe.model, recipe.lora, seed=t.seed)
    tasks = load_tasks(recipe, a.split)
    eval_tasks = load_tasks(recipe, a.eval_split) if a.eval_split else []
    plain = UnshardedCopy(model, accelerator.device) if plain_engine else None
    # paper: a constant learning rate
    model, optimizer, start, log, progress = start_iterations(recipe, model, accelerator, output_dir, resume,
                                                              a.iterations, f"agent:{spec.name}")
    device, pad = accelerator.device, tok.pad_token_id

    def policy():  # the module the engine samples from (a collective under ZeRO-3: every rank calls it)
        return plain.sync(accelerator.unwrap_model(model)) if plain is not None else accelerator.unwrap_model(model)

    def play_sharded(task_list, k, sampling):  # this rank's tasks, episodes gathered in task order (k per task)
        def mine(ts):
            rows = play(engine, tok, ts, k, sampling, a.max_turns, env_for)
            return [rows[i * k:(i + 1) * k] for i in range(len(ts))]
        return [e for per_task in shard_and_gather(task_list, world, rank, mine) for e in per_task]

    engine = make_engine(recipe.rollout, policy(), tok)
    r = recipe.rollout
    suppress = mid_turn_suppressed(tok)
    started = time.time()

    for it in range(start, a.iterations):
        # ---- 1. rollouts (reused when resuming mid-iteration)
        path = output_dir / "rollouts" / f"iter-{it + 1}.json"
        if path.exists():
            episodes = json.loads(path.read_text())["episodes"]
        else:
            rng = random.Random(t.seed * 1000 + it)
            batch_tasks = rng.sample(tasks, min(a.tasks_per_iteration, len(tasks)))
            sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                      seed=t.seed * 1000 + it + rank * RANK_SEED_STRIDE, suppress_token_ids=suppress)
            model.eval()
            episodes = play_sharded(batch_tasks, r.n, sampling)
            if main:
                runs.atomic_write(path, json.dumps({"episodes": episodes}))

        # ---- 2. advantages per task; drop the uninformative
        by_task: dict = {}
        for e in episodes:
            by_task.setdefault(e["task"], []).append(e)
        rows = []
        for group in by_task.values():
            for e, adv in zip(group, advantages([e["reward"] for e in group], a.advantage)):
                if abs(adv) >= a.min_advantage and sum(e["mask"]) > 0:
                    rows.append({**e, "adv": adv})

        # ---- 3. pi_old recomputed by the learner, then PPO epochs over minibatches shuffled across tasks
        model.eval()
        with torch.no_grad():
            for s in range(0, len(rows), t.batch_size):
                chunk = rows[s:s + t.batch_size]
                lp, mask = episode_token_logps(model, chunk, pad, device)
                for row, l_ in zip(chunk, lp):
                    row["old"] = l_[: len(row["token_ids"]) - 1].cpu()
        rng = random.Random(t.seed * 7919 + it)
        window = []
        model.train()
        for _ in range(a.epochs_per_iteration):
            order = list(range(len(rows)))
            rng.shuffle(order)
            for share in rank_minibatches(order, t.batch_size, world, rank):
                chunk = [rows[i] for i in share]
                lp, mask = episode_token_logps(model, chunk, pad, device)
                old = torch.zeros_like(lp)
                for i, row in enumerate(chunk):
                    old[i, :len(row["old"])] = row["old"].to(device)
                pb = PairBatch(chosen_logps=lp.sum(-1), chosen_lengths=mask.sum(-1), token_logps=lp, old_token_logps=old,
                               token_mask=mask, advantages=torch.tensor([row["adv"] for row in chunk], device=device))
                per, metrics = spec.fn(pb, recipe.loss)
                loss = per.mean()
                update(accelerator, model, optimizer, loss, t.max_grad_norm, f"iteration {it + 1}")
                window.append({"loss": loss.item(), **{k: v.float().mean().item() for k, v in metrics.items()}})
        window = [w for part in gather_object([window]) for w in part]  # every rank's steps
        engine.update_weights(policy())

        # ---- 4. log, checkpoint
        sc = scores(episodes)
        row = {"step": it + 1, "iteration": it + 1, "episodes": len(episodes), "train_episodes": len(rows),
               "reward/mean": sc["reward"], "success/mean": sum(e["success"] for e in episodes) / max(len(episodes), 1),
               "turns/mean": sum(e["turns"] for e in episodes) / max(len(episodes), 1),
               "model_tokens/mean": sum(sum(e["mask"]) for e in episodes) / max(len(episodes), 1)}
        if window:
            row.update({k: sum(w[k] for w in window) / len(window) for k in window[0]})
        if main:
            log.log(row)
        progress.update(it + 1, f"reward {row['reward/mean']:.3f} kept {len(rows)}/{len(episodes)}")
        if it + 1 < a.iterations:
            save_checkpoint(accelerator, output_dir, it + 1, recipe, None)

    accelerator.wait_for_everyone()
    wall = time.time() - started
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3
    save_model(unwrapped, tok, output_dir, state_dict=state_dict, is_main_process=main)
    ev = None
    if eval_tasks:
        unwrapped.eval()
        greedy = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=0.0, suppress_token_ids=suppress)
        ev = play_sharded(eval_tasks, 1, greedy)
    summary = {}
    if main:
        summary = {"trainer": "agent", "loss": spec.name, "advantage": a.advantage, "steps": a.iterations, "processes": world,
                   "wall_seconds": round(wall, 3), "peak_memory_mb": peak_memory_mb(), "final": log.rows[-1] if log.rows else {}}
        if ev is not None:
            summary["eval"] = {"split": a.eval_split, **scores(ev)}
        if recipe.logging.plots:
            runs.write_plots(output_dir, log.rows)
        runs.write_summary(output_dir, summary)
    finish(accelerator)
    return summary
