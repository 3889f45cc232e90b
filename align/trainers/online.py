"""The online trainer: self-play preference optimisation on samples of the current policy.

Data flow of one iteration, top to bottom:
    prompt rows -> the rollout engine samples K = rollout.n responses per prompt from pi_t (token ids + log-probs)
    -> rewards: a pairwise judge compares every pair of a prompt's samples, W[i, j] = P(y_i > y_j), and
       r_i = mean_{j != i} W[i, j]; or reward functions (judge.kind function) score each sample, seeing the row's
       other columns (align/rewards.py)
    -> the objective:
         spo, rloo        every sample, advantage A_i = r_i - mean_{j != i} r_j, clipped policy gradient
         grpo             every sample, A_i = (r_i - mean r) / std r, clipped policy gradient (+ KL with kl_coef)
         inpo, dpo, ipo   the pair (best, worst) by r; reference log-probs from pi_ref (the LoRA base or a frozen
                          copy of the initial policy); INPO's anchor pi_t = the sampling policy's log-probs
                          (recomputed by the learner, online.old_logprobs)
         sppo             the same pair with soft labels P(y > pi_t) ~ r
    -> epochs of minibatch updates -> engine.update_weights(model) -> checkpoint.

With online.generation_batch_size an iteration's prompts are taken in generations: sample, judge, train
epochs_per_iteration passes, sync, sample the next generation from the updated policy (policy-gradient objectives
stay near on-policy); without it the iteration is one generation.

Rollouts and judge results are saved per generation (``rollouts/iter-N.json``, or ``iter-N-gen-M.json``) before
training on them, and a checkpoint is written after each iteration, so a run killed mid-iteration resumes with
the same samples and ends with the same weights.

Under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3; one process is the world = 1 case of the same code):
    - each iteration's prompts are chosen as in one process; rank r samples and judges prompts[r::world] with its
      own seed (rank 0 keeps the single-process seed), the groups are gathered to every rank in prompt order, and
      rank 0 writes the rollouts file (every rank reads it back when resuming);
    - every rank builds the same rows and the same shuffled order; each global minibatch of batch_size x world rows
      is cut into equal per-rank shares (``rank_minibatches``), so every rank runs the same number of steps;
    - under ZeRO-3 the live module's parameters are partitioned: the hf engine samples from an unsharded copy
      refreshed after each iteration (``align/rollout/zero.py``). A non-LoRA reference copy is refused there
      (as the offline trainer refuses ``train.reference=model``): use LoRA (reference = adapter off) or ZeRO-2.
Metrics are averaged over every rank's steps and logged by rank 0.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch

from align import runs
from align.config import Recipe
from align.data import Example, collate, collator, load_prompt_rows, packs
from align.errors import UserError
from align.judges import make_judge
from align.logprobs import pair_logps, row_token_logps
from align.losses import PairBatch, chosen_nll, get_loss
from align.losses.policy import LOG_RATIO_CLAMP, group_advantages
from align.models import is_peft, load_policy, reference_context
from align.rollout import sampling_from
from align.rollout.zero import UnshardedCopy, unpartitioned, zero_stage
from align.trainers import kit


def win_rates(judge, prompt: str, texts: list[str]) -> list[float]:
    """r_i = mean over j != i of P(y_i > y_j), judging each unordered pair once (P(b > a) = 1 - P(a > b))."""
    k = len(texts)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    probs = judge.compare([prompt] * len(pairs), [texts[i] for i, _ in pairs], [texts[j] for _, j in pairs])
    w = [[0.0] * k for _ in range(k)]
    for (i, j), p in zip(pairs, probs):
        w[i][j], w[j][i] = p, 1 - p
    return [sum(w[i]) / (k - 1) for i in range(k)]


def engine_inputs(rows: list[dict], recipe: Recipe) -> list:
    """What the engine samples from for prompt rows: a conversational prompt's messages and, with data.chat_template,
    a plain prompt as one user turn (both through the tokenizer's chat template), else the prompt text."""
    return [
        r["prompt_messages"]
        if "prompt_messages" in r
        else [{"role": "user", "content": r["prompt"]}]
        if recipe.data.chat_template
        else r["prompt"]
        for r in rows
    ]


def rollout_iteration(engine, judge, rows: list[dict], recipe: Recipe, seed: int) -> list[dict]:
    """Sample K per prompt row and judge them: win rates among a prompt's samples from a pairwise judge, or the
    reward functions' scores (which see the rows' other columns). Plain data (saved as JSON for resumption)."""
    prompts = [r["prompt"] for r in rows]
    inputs = engine_inputs(rows, recipe)
    groups = engine.generate(inputs, n=recipe.rollout.n, sampling=sampling_from(recipe.rollout, seed=seed))
    if getattr(judge, "pointwise", False):  # one call for the whole shard: every completion with its row's columns
        flat = [(row, c.text) for row, group in zip(rows, groups) for c in group]
        keys = sorted({k for row in rows for k in row if k != "prompt"})
        scores = judge.score(
            [row["prompt"] for row, _ in flat],
            [text for _, text in flat],
            {k: [row.get(k) for row, _ in flat] for k in keys},
        )
        k = recipe.rollout.n
        rewards = [scores[i * k : (i + 1) * k] for i in range(len(rows))]
        parts = [[{n: v[i * k + j] for n, v in judge.last.items()} for j in range(k)] for i in range(len(rows))]
    else:
        rewards = [win_rates(judge, prompt, [c.text for c in group]) for prompt, group in zip(prompts, groups)]
        parts = [[None] * len(group) for group in groups]
    out = []
    for prompt, group, r, part in zip(prompts, groups, rewards, parts):
        out.append(
            {
                "prompt": prompt,
                "prompt_ids": group[0].prompt_ids,
                "samples": [
                    {
                        "token_ids": c.token_ids or [engine.tokenizer.eos_token_id],
                        "logprobs": c.logprobs or [0.0],
                        "text": c.text,
                        "reward": ri,
                        **({"scores": p} if p is not None else {}),
                    }
                    for c, ri, p in zip(group, r, part)
                ],
            }
        )
    return out


def held_out_rows(recipe: Recipe) -> list[dict]:
    """Prompt rows to evaluate on (at most eval.size): data.eval's, else the test split of a built-in training set."""
    import dataclasses

    d = recipe.data
    if d.eval:
        rows = load_prompt_rows(
            dataclasses.replace(d, train=d.eval, split=d.eval_split, limit=None), seed=recipe.train.seed
        )
    elif d.train.startswith("builtin:stories"):
        from align.stories import story_prompts

        rows = [{"prompt": p} for p in story_prompts(recipe.eval.size, seed=recipe.train.seed, split="test")]
    elif d.train.startswith("builtin:tasks") or d.train == "builtin:tasks":
        from align import tasks as T

        rows = [
            {"prompt": t.prompt, "answer": t.answer, "family": t.family}
            for t in T.make_tasks(
                recipe.eval.size, seed=recipe.train.seed + 1, split="test", families=d.builtin_families
            )
        ]
    else:
        rows = []
    return rows[: recipe.eval.size]


def held_out_prompts(recipe: Recipe) -> list[str]:
    return [r["prompt"] for r in held_out_rows(recipe)]


def eval_scores(
    recipe: Recipe, judge, prompts: list[str], answers: list[str], reference: list | None, rows: list[dict] = ()
) -> list:
    """Per prompt: 1/0 for the checker, the goal score for stories, the reward functions' reward (they see the
    ``rows``' columns), else P(answer > the initial answer)."""
    if getattr(judge, "pointwise", False):
        keys = sorted({k for row in rows for k in row if k != "prompt"})
        return judge.score(prompts, answers, {k: [row.get(k) for row in rows] for k in keys})
    if recipe.judge.kind == "checker":
        from align import tasks as T

        return [float(T.parse_prompt(p).check(a)) for p, a in zip(prompts, answers)]
    if recipe.judge.kind == "story":
        from align.stories import story_score

        return [story_score(a, recipe.judge.goal) for a in answers]
    return judge.compare(prompts, answers, reference)


def saved_rollouts(output_dir: Path, iteration: int) -> list[dict]:
    """What an earlier attempt saved of an iteration's samples and judgements, one dict per generation in order
    (``iter-N.json``, or ``iter-N-gen-M.json`` with online.generation_batch_size); rank 0 reads it (kit.from_main)."""
    folder = output_dir / "rollouts"
    one = folder / f"iter-{iteration}.json"
    if one.exists():
        return [json.loads(one.read_text())]
    gens = sorted(folder.glob(f"iter-{iteration}-gen-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return [json.loads(p.read_text()) for p in gens]


def _token_batch(rows: list[tuple[list[int], list[int], list[float]]], pad: int, device) -> dict:
    """Right-padded [prompt + response] rows with the response mask and the sampling log-probs aligned to labels."""
    batch = collate([Example(i, p, r, None) for i, (p, r, _) in enumerate(rows)], pad)
    old = torch.zeros(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1)
    for i, (p, r, lp) in enumerate(rows):
        old[i, len(p) - 1 : len(p) - 1 + len(r)] = torch.tensor(lp)
    batch["old"] = old
    return {k: v.to(device) for k, v in batch.items()}


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False) -> dict:
    """Run an online recipe into ``output_dir``; returns the summary (rank 0; {} on the other ranks)."""
    from accelerate.utils import gather_object, set_seed

    t, o = recipe.train, recipe.online
    spec = get_loss(recipe.loss.name)
    output_dir = Path(output_dir)
    runs.prepare_output_dir(output_dir, resume)
    accelerator = kit.make_accelerator(1)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    zero3 = zero_stage(accelerator) == 3
    # online SPPO's pi_t is the sampling policy (the anchor): its registry reference (offline pi_t) is not needed
    needs_ref = (spec.needs_reference and spec.name != "sppo") or (spec.per_token and recipe.loss.kl_coef > 0)
    if zero3 and needs_ref and not recipe.lora.enabled:
        raise UserError(
            f"loss.name: {spec.name!r} needs a frozen reference copy of the policy, which ZeRO-3 cannot hold; "
            "use LoRA (lora.enabled=true: the reference is the adapter-free base) or ZeRO-2"
        )
    set_seed(t.seed)

    # ZeRO-3: the hf engine samples from an unsharded copy of the policy (vLLM gathers by itself), so the policy is
    # loaded whole (not partitioned by from_pretrained) and copied before accelerator.prepare partitions it
    plain_engine = zero3 and recipe.rollout.backend == "hf"
    with unpartitioned(accelerator, enabled=plain_engine):
        model, tok = load_policy(recipe.model, recipe.lora, seed=t.seed)
    prompts = load_prompt_rows(recipe.data, seed=t.seed)  # {"prompt", **columns}: reward functions see the columns
    if len(prompts) < o.prompts_per_iteration:
        raise UserError(
            f"{recipe.data.train}: {len(prompts)} prompts < online.prompts_per_iteration {o.prompts_per_iteration}"
        )
    if recipe.rollout.n < 2:
        raise UserError("rollout.n: self-play needs at least 2 samples per prompt")
    with unpartitioned(accelerator):  # every rank judges its own samples with a whole judge model
        judge = make_judge(recipe.judge)
    ref_model = None
    if needs_ref and not is_peft(model):
        ref_model = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
    plain = UnshardedCopy(model, accelerator.device) if plain_engine else None
    # the iterations are the schedule: a constant learning rate
    model, optimizer, _ = kit.prepare_optimization(
        accelerator, model, t, o.iterations, schedule="constant", warmup_steps=0
    )
    start, _ = kit.restore(accelerator, output_dir, recipe, resume)
    log, progress = kit.open_run(
        accelerator, output_dir, recipe, start, o.iterations, f"online:{spec.name}", subdirs=("rollouts",)
    )
    for i in range(1, start + 1):  # resumed: the judge's memo as the earlier iterations left it (read on rank 0)
        for judged in kit.from_main(accelerator, lambda i=i: [d.get("judged") for d in saved_rollouts(output_dir, i)]):
            judge.remember(judged, rank)
    device, pad = accelerator.device, tok.pad_token_id
    pairs = collator(model, recipe.data, pad)  # pair objectives: padding-free rows where the model supports them

    def policy():  # the module the engine samples from (a collective under ZeRO-3: every rank calls it)
        return plain.sync(accelerator.unwrap_model(model)) if plain is not None else accelerator.unwrap_model(model)

    engine = kit.rollout_engine(recipe, accelerator, policy(), tok, resumed=start > 0)
    started = time.time()
    held_out_r = held_out_rows(recipe) if recipe.data.eval or t.eval_steps else []  # evaluation is opt-in
    held_out = [r["prompt"] for r in held_out_r]
    last_eval: dict = {}

    def evaluate(at: int) -> dict:
        """The judge's score of greedy answers to the held-out prompts (each rank answers and judges its share):
        checker accuracy, story goal score, or else the win rate against the initial policy's greedy answers
        (written once to eval_reference.json, read back on resume). Rank 0 logs it and writes the samples."""
        greedy = sampling_from(recipe.rollout, temperature=0.0, max_new_tokens=recipe.eval.max_new_tokens)
        inputs = engine_inputs(held_out_r, recipe)
        answers = kit.shard_and_gather(
            list(range(len(held_out))),
            world,
            rank,
            lambda mine: [g[0].text for g in engine.generate([inputs[i] for i in mine], n=1, sampling=greedy)],
        )
        ref_path = output_dir / "eval_reference.json"
        reference = kit.from_main(accelerator, lambda: json.loads(ref_path.read_text()) if ref_path.exists() else None)
        if reference is None:  # the first evaluation: the policy before any update answered these (see below)
            reference = initial_answers
        scores = kit.shard_and_gather(
            list(range(len(held_out))),
            world,
            rank,
            lambda mine: eval_scores(
                recipe,
                judge,
                [held_out[i] for i in mine],
                [answers[i] for i in mine],
                None if reference is None else [reference[i] for i in mine],
                [held_out_r[i] for i in mine],
            ),
        )
        name = {"checker": "eval/accuracy", "story": "eval/goal_score", "function": "eval/reward"}.get(
            recipe.judge.kind, "eval/win_rate_vs_initial"
        )
        result = {name: sum(scores) / len(scores)}
        if main:
            log.log({"step": at, **result})
            samples = [{"prompt": p, "completion": a} for p, a in list(zip(held_out, answers))[: recipe.eval.samples]]
            (output_dir / "eval_samples").mkdir(exist_ok=True)
            runs.atomic_write(
                output_dir / "eval_samples" / f"iteration-{at}.jsonl", "".join(json.dumps(x) + "\n" for x in samples)
            )
        return result

    initial_answers = None
    if held_out and recipe.judge.kind not in ("checker", "story", "function"):
        ref_path = output_dir / "eval_reference.json"
        initial_answers = kit.from_main(
            accelerator, lambda: json.loads(ref_path.read_text()) if ref_path.exists() else None
        )
        if initial_answers is None:  # answered before the first update (a run resumed later reads them back)
            greedy = sampling_from(recipe.rollout, temperature=0.0, max_new_tokens=recipe.eval.max_new_tokens)
            inputs = engine_inputs(held_out_r, recipe)
            initial_answers = kit.shard_and_gather(
                list(range(len(held_out))),
                world,
                rank,
                lambda mine: [g[0].text for g in engine.generate([inputs[i] for i in mine], n=1, sampling=greedy)],
            )
            if main:
                runs.atomic_write(ref_path, json.dumps(initial_answers))

    for it in range(start, o.iterations):
        # The iteration's prompts, in generations of online.generation_batch_size completions (default: one): each
        # generation is sampled from the current policy, judged, and trained on for epochs_per_iteration passes
        # before the next one is sampled (policy-gradient objectives stay near on-policy).
        chosen = random.Random(t.seed * 1000 + it).sample(prompts, o.prompts_per_iteration)
        per_gen = (o.generation_batch_size // recipe.rollout.n) if o.generation_batch_size else len(chosen)
        parts = [chosen[s_ : s_ + per_gen] for s_ in range(0, len(chosen), per_gen)]
        groups, judge_calls, window, train_rows, first_dev = [], 0, [], 0, 0.0
        for m, part in enumerate(parts):
            # ---- 1. rollouts + judge (reused when resuming mid-iteration)
            name = f"iter-{it + 1}.json" if len(parts) == 1 else f"iter-{it + 1}-gen-{m + 1}.json"
            path = output_dir / "rollouts" / name
            data = kit.from_main(accelerator, lambda p=path: json.loads(p.read_text()) if p.exists() else None)
            if data is not None:
                judge.remember(data.get("judged"), rank)
            else:
                calls_before, known = judge.calls, len(judge.cache)
                seed = t.seed * 1000 + it + rank * kit.RANK_SEED_STRIDE + m * 7919
                part_groups = kit.shard_and_gather(
                    part,
                    world,
                    rank,
                    lambda mine, seed=seed: rollout_iteration(engine, judge, mine, recipe, seed=seed),
                )
                data = {
                    "groups": part_groups,
                    "judge_calls": sum(gather_object([judge.calls - calls_before])),
                    "judged": gather_object([judge.added_since(known)]),
                }  # per rank: what this generation added to its memo
                if main:
                    runs.atomic_write(path, json.dumps(data))
            groups += data["groups"]
            judge_calls += data["judge_calls"]

            # ---- 2. training rows for the objective
            rows = []  # policy-gradient rows, or pair rows
            for g in data["groups"]:
                r = [s["reward"] for s in g["samples"]]
                k = len(r)
                if spec.per_token:
                    for s, adv in zip(g["samples"], group_advantages(spec.name, r, recipe.loss.scale_rewards)):
                        if abs(adv) > o.min_advantage:
                            rows.append(
                                {
                                    "prompt_ids": g["prompt_ids"],
                                    "ids": s["token_ids"],
                                    "logprobs": s["logprobs"],
                                    "adv": adv,
                                }
                            )
                else:
                    best, worst = max(range(k), key=r.__getitem__), min(range(k), key=r.__getitem__)
                    if r[best] > r[worst]:
                        rows.append({"prompt_ids": g["prompt_ids"], "w": g["samples"][best], "l": g["samples"][worst]})
            train_rows += len(rows)
            engine.sleep()  # the engine's memory is freed during the updates
            if o.old_logprobs == "learner" and (spec.per_token or spec.needs_anchor or spec.name == "sppo"):
                model.eval()  # pi_old / pi_t as the learner computes them (not the sampler), before the first update
                temp = kit.pg_temperature(recipe.rollout) if spec.per_token else 1.0  # pi_t of pair objectives: T = 1
                rows = _learner_logprobs(
                    model,
                    rows,
                    spec.per_token,
                    t.batch_size,
                    pad,
                    device,
                    world,
                    rank,
                    temp,
                    packs(model, recipe.data.packing),
                )
            rng = random.Random(t.seed * 7919 + it + m * 104729)

            # ---- 3. updates (this rank's share of each global minibatch)
            steps = []
            model.train()
            for epoch in range(o.epochs_per_iteration):
                order = list(range(len(rows)))
                rng.shuffle(order)
                for n_step, share in enumerate(kit.rank_minibatches(order, t.batch_size, world, rank)):
                    chunk = [rows[i] for i in share]
                    loss, metrics = _step_loss(spec, recipe, model, ref_model, accelerator, chunk, pad, device, pairs)
                    dev = metrics.get(f"{spec.name}/ratio_max_dev")
                    if dev is not None and epoch == 0 and n_step == 0 and dev.numel():
                        # a generation's first update: rho = 1 up to float error when pi_old is the learner's
                        first_dev = max(first_dev, dev.max().item())
                    loss, grad_norm = kit.checked_step(
                        accelerator, model, optimizer, loss, t.max_grad_norm, t.nan_policy, f"iteration {it + 1}"
                    )
                    steps.append(
                        {
                            "loss": loss.item(),
                            **{k_: v.float().mean().item() for k_, v in metrics.items()},
                            **kit.grad_metrics(grad_norm, t.max_grad_norm),
                        }
                    )
            window += [w for part_ in gather_object([steps]) for w in part_]  # every rank's steps
            engine.update_weights(policy())  # (wakes the engine's weights first; generate wakes the rest)

        # ---- 4. log, checkpoint
        rewards = [s["reward"] for g in groups for s in g["samples"]]
        row = {
            "step": it + 1,
            "iteration": it + 1,
            "train_rows": train_rows,
            "judge_calls": judge_calls,
            "generations": len(parts),
            "updates": len(window) // world,  # every rank's steps are in the window, the same number on each
            "reward/mean": sum(rewards) / len(rewards),
            "reward/spread": sum(
                max(s["reward"] for s in g["samples"]) - min(s["reward"] for s in g["samples"]) for g in groups
            )
            / len(groups),
            "response_tokens/mean": sum(len(s["token_ids"]) for g in groups for s in g["samples"]) / len(rewards),
        }
        if recipe.judge.kind == "checker":
            from align import tasks as T

            row["sample_accuracy"] = sum(
                T.parse_prompt(g["prompt"]).check(s["text"]) for g in groups for s in g["samples"]
            ) / len(rewards)
        elif recipe.judge.kind == "story":
            from align.stories import story_score

            row["sample_goal_score"] = sum(
                story_score(s["text"], recipe.judge.goal) for g in groups for s in g["samples"]
            ) / len(rewards)
        for name in groups[0]["samples"][0].get("scores", {}):  # reward functions: each one's mean score
            row[f"reward/{name}"] = sum(s["scores"][name] for g in groups for s in g["samples"]) / len(rewards)
        if window:
            row.update(kit.step_means(window))
        if spec.per_token:  # the largest over the iteration's generations and every rank
            row["ratio_first_step_max_dev"] = max(gather_object([first_dev]))
        if main:
            log.log(row)
        progress.update(it + 1, f"reward spread {row['reward/spread']:.3f} loss {row.get('loss', float('nan')):.4f}")
        if held_out and ((t.eval_steps and (it + 1) % t.eval_steps == 0) or it + 1 == o.iterations):
            last_eval = evaluate(it + 1)
        if it + 1 < o.iterations:
            kit.save_checkpoint(accelerator, output_dir, it + 1, recipe)

    wall = time.time() - started
    kit.save_final_model(accelerator, model, tok, output_dir)
    summary = {}
    if main:
        summary = {
            "trainer": "online",
            "loss": spec.name,
            "steps": o.iterations,
            "processes": world,
            "wall_seconds": round(wall, 3),
            "judge_calls": sum(r.get("judge_calls", 0) for r in log.rows),
            "peak_memory_mb": kit.peak_memory_mb(),
            "final": {**([r for r in log.rows if "iteration" in r] or [{}])[-1], **last_eval},
        }
        kit.write_outputs(output_dir, recipe, log, summary)
    kit.finish(accelerator)
    return summary


def _learner_logprobs(
    model,
    rows: list[dict],
    per_token: bool,
    batch_size: int,
    pad: int,
    device,
    world,
    rank,
    temperature: float = 1.0,
    packed: bool = False,
):
    """The rows with the learner's per-token log-probs of their sampled tokens in place of the sampler's: "logprobs"
    of policy-gradient rows; "logprobs" of the chosen and rejected samples of pair rows (copies: the saved rollouts
    keep the sampler's). An empty completion (stored as [eos]) gets the learner's value of it as well."""
    seqs = (
        [(r["prompt_ids"], r["ids"]) for r in rows]
        if per_token
        else [(r["prompt_ids"], r[side]["token_ids"]) for r in rows for side in ("w", "l")]
    )

    def forward(chunk):
        batch = _token_batch([(p, ids, [0.0] * len(ids)) for p, ids in chunk], pad, device)
        mask = batch["completion_mask"][:, 1:]
        lp = row_token_logps(model, batch["input_ids"], batch["attention_mask"], mask, temperature, packed) * mask
        return [lp[i, len(p) - 1 : len(p) - 1 + len(ids)].tolist() for i, (p, ids) in enumerate(chunk)]

    logps = kit.sharded_forward(forward, seqs, batch_size, world, rank)
    if per_token:  # the sampler's stay beside them (online.is_cap weighs tokens by their ratio)
        return [{**r, "logprobs": lp, "sampler_logprobs": r["logprobs"]} for r, lp in zip(rows, logps)]
    return [
        {**r, "w": {**r["w"], "logprobs": logps[2 * i]}, "l": {**r["l"], "logprobs": logps[2 * i + 1]}}
        for i, r in enumerate(rows)
    ]


def _step_loss(spec, recipe, model, ref_model, accelerator, chunk, pad, device, pairs):
    if spec.per_token:
        batch = _token_batch([(r["prompt_ids"], r["ids"], r["logprobs"]) for r in chunk], pad, device)
        mask = batch["completion_mask"][:, 1:]
        temp = kit.pg_temperature(recipe.rollout)
        packed = packs(model, recipe.data.packing)
        lp = row_token_logps(model, batch["input_ids"], batch["attention_mask"], mask, temp, packed) * mask
        pb = PairBatch(
            chosen_logps=lp.sum(-1),
            chosen_lengths=mask.sum(-1).float(),
            token_logps=lp,
            old_token_logps=batch["old"] * mask,
            token_mask=mask,
            advantages=torch.tensor([r["adv"] for r in chunk], device=device),
        )
        if recipe.online.is_cap is not None:  # TIS: min(pi_learner / pi_sampler, cap) per token, no gradient
            sampler = _token_batch([(r["prompt_ids"], r["ids"], r["sampler_logprobs"]) for r in chunk], pad, device)
            q = ((batch["old"] - sampler["old"]) * mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            pb.is_weights = torch.exp(q).clamp(max=recipe.online.is_cap) * mask
        if recipe.loss.loss_type == "dapo":  # the token count of every process's share of this minibatch
            pb.tokens_per_process = accelerator.reduce(mask.sum().float(), reduction="mean").item()
        if recipe.loss.kl_coef:  # per-token KL to pi_ref (the LoRA base or the frozen copy)
            with torch.no_grad(), reference_context(accelerator.unwrap_model(model)):
                ref = ref_model if ref_model is not None else model
                pb.ref_token_logps = (
                    row_token_logps(ref, batch["input_ids"], batch["attention_mask"], mask, temp, packed) * mask
                )
    else:
        exs = [Example(i, r["prompt_ids"], r["w"]["token_ids"], r["l"]["token_ids"]) for i, r in enumerate(chunk)]
        batch = {k: v.to(device) for k, v in pairs(exs).items()}
        c, cl, rj, rl = pair_logps(model, batch, paired=True)
        pb = PairBatch(chosen_logps=c, chosen_lengths=cl, rejected_logps=rj, rejected_lengths=rl)
        if spec.name != "sppo":  # SPPO online compares with pi_t only: no reference pass
            with torch.no_grad(), reference_context(accelerator.unwrap_model(model)):
                pb.ref_chosen_logps, _, pb.ref_rejected_logps, _ = pair_logps(
                    ref_model if ref_model is not None else model, batch, paired=True
                )
        # pi_t: the policy that sampled this iteration's responses; its log-probs came with the samples
        pb.anchor_chosen_logps = torch.tensor([sum(r["w"]["logprobs"]) for r in chunk], device=device)
        pb.anchor_rejected_logps = torch.tensor([sum(r["l"]["logprobs"]) for r in chunk], device=device)
        pb.chosen_win_prob = torch.tensor([r["w"]["reward"] for r in chunk], device=device)
        pb.rejected_win_prob = torch.tensor([r["l"]["reward"] for r in chunk], device=device)
        if spec.name != "sppo" and not spec.needs_anchor:  # SPPO and INPO use pi_t; the others only pi_ref
            pb.anchor_chosen_logps = pb.anchor_rejected_logps = None
            pb.chosen_win_prob = pb.rejected_win_prob = None
    per_example, metrics = spec.fn(pb, recipe.loss)
    loss = per_example.mean()
    if recipe.loss.sft_weight and not spec.per_token:
        loss = loss + recipe.loss.sft_weight * chosen_nll(pb)
    return loss, metrics
