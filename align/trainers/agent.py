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
pi_old is recomputed for rows[r::world] on rank r and gathered; every rank takes its equal share of each global
minibatch; under
ZeRO-3 the hf engine plays from an unsharded copy of the policy (``align/rollout/zero.py``). The final greedy
evaluation is sharded the same way.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from align import runs
from align.agents.play import load_tasks, make_env, mid_turn_suppressed, play, scores
from align.config import Recipe
from align.data import Example, collate, packs
from align.logprobs import row_token_logps
from align.losses import PairBatch, get_loss
from align.losses.policy import LOG_RATIO_CLAMP, group_advantages
from align.models import load_policy
from align.rollout import SamplingParams
from align.rollout.zero import UnshardedCopy, unpartitioned, zero_stage
from align.trainers import kit


def advantages(rewards: list[float], kind: str) -> list[float]:
    """Leave-one-out (LOOP, RLOO): A_k = R_k - mean_{i != k} R_i; grpo: (R_k - mean R) / (std R + 1e-4)
    (``align.losses.policy.group_advantages``, shared with the online trainer)."""
    return group_advantages("grpo" if kind == "grpo" else "rloo", rewards)


# ------------------------------------------------------------------------------------------------ learner


def _batch(rows: list[dict], pad: int, device) -> dict:
    exs = [Example(i, [], r["token_ids"], None) for i, r in enumerate(rows)]
    batch = collate(exs, pad)
    mask = torch.zeros(len(rows), batch["input_ids"].shape[1] - 1)
    for i, r in enumerate(rows):
        m = torch.tensor(r["mask"][1:], dtype=torch.float)
        mask[i, : len(m)] = m
    batch["mask"] = mask
    return {k: v.to(device) for k, v in batch.items()}


def episode_token_logps(
    model, rows: list[dict], pad: int, device, temperature: float = 1.0, packed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each episode's tokens (labels shifted) and the mask of the model's own tokens, from
    logits / ``temperature`` (the rollout temperature: the distribution the tokens were drawn from); ``packed``:
    the episodes in padding-free rows (``row_token_logps``)."""
    b = _batch(rows, pad, device)
    lp = row_token_logps(model, b["input_ids"], b["attention_mask"], b["mask"], temperature, packed)
    return lp * b["mask"], b["mask"]


def old_logps(
    model,
    rows: list[dict],
    batch_size: int,
    pad: int,
    device,
    world: int,
    rank: int,
    temperature: float = 1.0,
    packed: bool = False,
) -> list:
    """log pi_old of every row's tokens (CPU tensors, in row order) on every rank (``kit.sharded_forward``)."""

    def forward(chunk: list[dict]) -> list:
        lp, _ = episode_token_logps(model, chunk, pad, device, temperature, packed)
        return [l_[: len(r["token_ids"]) - 1].cpu() for r, l_ in zip(chunk, lp)]

    return kit.sharded_forward(forward, rows, batch_size, world, rank)


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False, env_for=None) -> dict:
    """Run an agent recipe (trainer 'agent') into ``output_dir``; returns the summary. ``env_for(task)`` overrides the
    environment factory (tests)."""
    from accelerate.utils import gather_object, set_seed

    t, a = recipe.train, recipe.agent
    spec = get_loss(recipe.loss.name)
    output_dir = Path(output_dir)
    if a.world == "builtin" and a.sandbox_min_level != "python" and env_for is None:
        from align.agents.sandbox import check_level

        check_level(a.sandbox_min_level)  # before anything is written
    runs.prepare_output_dir(output_dir, resume)
    accelerator = kit.make_accelerator(1)
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
    model, optimizer, _ = kit.prepare_optimization(
        accelerator, model, t, a.iterations, schedule="constant", warmup_steps=0
    )
    start, _ = kit.restore(accelerator, output_dir, recipe, resume)
    log, progress = kit.open_run(
        accelerator, output_dir, recipe, start, a.iterations, f"agent:{spec.name}", subdirs=("rollouts",)
    )
    device, pad = accelerator.device, tok.pad_token_id
    temp = kit.pg_temperature(recipe.rollout)
    packed = packs(model, a.packing)  # episodes in padding-free rows where the model's attention allows it
    # the learner's context: an episode whose next turn would not fit ends there (counted as 'truncated')
    context = getattr(accelerator.unwrap_model(model).config, "max_position_embeddings", None)
    if recipe.rollout.backend == "vllm" and recipe.rollout.vllm.max_model_len:
        context = min(context or recipe.rollout.vllm.max_model_len, recipe.rollout.vllm.max_model_len)

    def policy():  # the module the engine samples from (a collective under ZeRO-3: every rank calls it)
        return plain.sync(accelerator.unwrap_model(model)) if plain is not None else accelerator.unwrap_model(model)

    def play_sharded(task_list, k, sampling):  # this rank's tasks, episodes gathered in task order (k per task)
        def mine(ts):
            rows = play(engine, tok, ts, k, sampling, a.max_turns, env_for, max_tokens=context)
            return [rows[i * k : (i + 1) * k] for i in range(len(ts))]

        return [e for per_task in kit.shard_and_gather(task_list, world, rank, mine) for e in per_task]

    engine = kit.rollout_engine(recipe, accelerator, policy(), tok, resumed=start > 0)

    def evaluate(at: int) -> list[dict]:
        """Greedy episodes of every agent.eval_split task (sharded over the ranks); rank 0 logs eval/tgc, eval/sgc
        and eval/reward at ``at`` and writes the first eval.samples episodes' turns."""
        accelerator.unwrap_model(model).eval()
        greedy = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=0.0, suppress_token_ids=suppress)
        ev = play_sharded(eval_tasks, 1, greedy)
        accelerator.unwrap_model(model).train()
        if main:
            sc = scores(ev)
            log.log({"step": at, "eval/tgc": sc["tgc"], "eval/sgc": sc["sgc"], "eval/reward": sc["reward"]})
            samples = [
                {"task": e["task"], "turns": e["text"], "reward": e["reward"]} for e in ev[: recipe.eval.samples]
            ]
            (output_dir / "eval_samples").mkdir(exist_ok=True)
            runs.atomic_write(
                output_dir / "eval_samples" / f"iteration-{at}.jsonl", "".join(json.dumps(x) + "\n" for x in samples)
            )
        return ev

    r = recipe.rollout
    suppress = mid_turn_suppressed(tok)
    started = time.time()

    for it in range(start, a.iterations):
        # ---- 1. rollouts (reused when resuming mid-iteration)
        path = output_dir / "rollouts" / f"iter-{it + 1}.json"
        episodes = kit.from_main(  # rank 0 decides: machines need not share a filesystem
            accelerator, lambda p=path: json.loads(p.read_text())["episodes"] if p.exists() else None
        )
        if episodes is None:
            rng = random.Random(t.seed * 1000 + it)
            batch_tasks = rng.sample(tasks, min(a.tasks_per_iteration, len(tasks)))
            sampling = SamplingParams(
                max_new_tokens=r.max_new_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                top_k=r.top_k,
                seed=t.seed * 1000 + it + rank * kit.RANK_SEED_STRIDE,
                suppress_token_ids=suppress,
            )
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

        # ---- 3. pi_old recomputed by the learner, then PPO epochs over minibatches shuffled across tasks; the
        # engine's memory is freed meanwhile
        engine.sleep()
        model.eval()
        for row, old in zip(rows, old_logps(model, rows, t.batch_size, pad, device, world, rank, temp, packed)):
            row["old"] = old
        rng = random.Random(t.seed * 7919 + it)
        window = []
        model.train()
        updates, kl_stopped = 0, False
        for _ in range(a.epochs_per_iteration):
            order = list(range(len(rows)))
            rng.shuffle(order)
            for share in kit.rank_minibatches(order, t.batch_size, world, rank):
                chunk = [rows[i] for i in share]
                lp, mask = episode_token_logps(model, chunk, pad, device, temp, packed)
                old = torch.zeros_like(lp)
                for i, row in enumerate(chunk):
                    old[i, : len(row["old"])] = row["old"].to(device)
                if a.max_kl is not None:  # ml-loop's guard: the policy has drifted too far from pi_old
                    q = ((old - lp.detach()) * mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # log(pi_old / pi)
                    kl = ((torch.exp(-q) - 1 + q) * mask).sum() / mask.sum().clamp(min=1)  # k3 of KL(pi_old || pi)
                    if accelerator.reduce(kl, reduction="mean").item() > a.max_kl:
                        kl_stopped = True
                        break
                pb = PairBatch(
                    chosen_logps=lp.sum(-1),
                    chosen_lengths=mask.sum(-1),
                    token_logps=lp,
                    old_token_logps=old,
                    token_mask=mask,
                    advantages=torch.tensor([row["adv"] for row in chunk], device=device),
                )
                per, metrics = spec.fn(pb, recipe.loss)
                loss = per.mean()
                loss, grad_norm = kit.checked_step(
                    accelerator, model, optimizer, loss, t.max_grad_norm, t.nan_policy, f"iteration {it + 1}"
                )
                window.append(
                    {
                        "loss": loss.item(),
                        **{k: v.float().mean().item() for k, v in metrics.items()},
                        **kit.grad_metrics(grad_norm, t.max_grad_norm),
                    }
                )
                updates += 1
            if kl_stopped:
                break
        window = [w for part in gather_object([window]) for w in part]  # every rank's steps
        engine.update_weights(policy())  # (wakes the engine's weights first; generate wakes the rest)

        # ---- 4. log, checkpoint
        sc = scores(episodes)
        row = {
            "step": it + 1,
            "iteration": it + 1,
            "episodes": len(episodes),
            "train_episodes": len(rows),
            "reward/mean": sc["reward"],
            "success/mean": sum(e["success"] for e in episodes) / max(len(episodes), 1),
            "turns/mean": sum(e["turns"] for e in episodes) / max(len(episodes), 1),
            "model_tokens/mean": sum(sum(e["mask"]) for e in episodes) / max(len(episodes), 1),
            "truncated": sum(bool(e.get("truncated")) for e in episodes),
            "updates": updates,
        }
        if a.max_kl is not None:
            row["kl_stopped"] = int(kl_stopped)
        if window:
            row.update(kit.step_means(window))
        if main:
            log.log(row)
        progress.update(it + 1, f"reward {row['reward/mean']:.3f} kept {len(rows)}/{len(episodes)}")
        if eval_tasks and t.eval_steps and (it + 1) % t.eval_steps == 0 and it + 1 < a.iterations:
            evaluate(it + 1)
        if it + 1 < a.iterations:
            kit.save_checkpoint(accelerator, output_dir, it + 1, recipe)

    wall = time.time() - started
    kit.save_final_model(accelerator, model, tok, output_dir)
    ev = evaluate(a.iterations) if eval_tasks else None
    summary = {}
    if main:
        summary = {
            "trainer": "agent",
            "loss": spec.name,
            "advantage": a.advantage,
            "steps": a.iterations,
            "processes": world,
            "wall_seconds": round(wall, 3),
            "peak_memory_mb": kit.peak_memory_mb(),
            "final": ([r for r in log.rows if "iteration" in r] or [{}])[-1],
        }
        if ev is not None:
            summary["eval"] = {"split": a.eval_split, **scores(ev)}
        kit.write_outputs(output_dir, recipe, log, summary)
    kit.finish(accelerator)
    return summary
