"""The offline trainer: a fixed dataset of (prompt, chosen[, rejected]) rows and any loss in the registry.

Data flow, top to bottom:
    recipe -> model (+LoRA) and tokenizer -> tokenised examples -> reference log-probs (none, the LoRA base,
    a frozen copy, or precomputed with the initial policy) -> for each optimizer step: one forward pass over
    [chosen; rejected], loss from the registry, backward, clip, step -> metrics.jsonl, checkpoints -> final model.

It runs under plain ``python`` and under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3). The data order is
a pure function of (seed, epoch), so a run resumed from ``checkpoint-N`` replays exactly the same batches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from align import runs
from align.config import Recipe
from align.data import Example, collator, load_examples, real_tokens
from align.errors import UserError
from align.logprobs import pair_logps
from align.losses import PairBatch, chosen_nll, get_loss
from align.models import is_peft, load_policy, reference_context
from align.rollout.zero import zero_stage
from align.trainers import kit


@torch.no_grad()
def precompute_reference(accelerator, model, examples: list[Example], batch_size: int, collate, paired: bool):
    """Reference log-probs of every example under the initial policy, [n, 2] (chosen, rejected), on every rank.
    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(examples)
    per_rank = math.ceil(math.ceil(n / world) / batch_size) * batch_size
    padded = [(i % n) for i in range(per_rank * world)]
    mine = padded[rank * per_rank : (rank + 1) * per_rank]
    model.eval()
    table = torch.zeros(n, 2)
    rows_i, rows_v = [], []
    for s in range(0, len(mine), batch_size):
        idx = mine[s : s + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate([examples[i] for i in idx]).items()}
        with reference_context(accelerator.unwrap_model(model)):
            c, _, r, _ = pair_logps(model, batch, paired)
        rows_i.append(torch.tensor(idx))
        rows_v.append(torch.stack([c.float().cpu(), (r if r is not None else torch.zeros_like(c)).float().cpu()], -1))
    idx_all = accelerator.gather(torch.cat(rows_i).to(accelerator.device)).cpu()
    val_all = accelerator.gather(torch.cat(rows_v).to(accelerator.device)).cpu()
    table[idx_all] = val_all
    model.train()
    return table


@torch.no_grad()
def evaluate(accelerator, model, held_out: list[Example], batch_size: int, collate, batch_loss, token_mean: bool):
    """eval/loss and eval/<metric> (means over the held-out rows; token-weighted loss for SFT). Rank r takes its
    share of the rows; every rank runs the same number of forward passes (ZeRO-3 gathers collectively)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(held_out)
    per_rank = math.ceil(math.ceil(n / world) / batch_size) * batch_size
    padded = [(i % n) for i in range(per_rank * world)]
    mine = padded[rank * per_rank : (rank + 1) * per_rank]
    model.eval()
    keys, rows_i, rows_v = None, [], []
    for s in range(0, len(mine), batch_size):
        idx = mine[s : s + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate([held_out[i] for i in idx]).items()}
        _, per_example, metrics, _, cl = batch_loss(batch)
        keys = keys or sorted(metrics)
        rows_i.append(torch.tensor(idx))
        rows_v.append(torch.stack([per_example.float(), cl.float()] + [metrics[k].float() for k in keys], -1).cpu())
    idx_all = accelerator.gather(torch.cat(rows_i).to(accelerator.device)).cpu()
    val_all = accelerator.gather(torch.cat(rows_v).to(accelerator.device)).cpu()
    table = torch.zeros(n, val_all.shape[1])
    table[idx_all] = val_all  # the repeated rows that pad the last shares land on themselves
    model.train()
    loss = (table[:, 0] * table[:, 1]).sum() / table[:, 1].sum().clamp(min=1) if token_mean else table[:, 0].mean()
    return {"eval/loss": loss.item(), **{f"eval/{k}": table[:, 2 + j].mean().item() for j, k in enumerate(keys)}}


def write_samples(accelerator, model, tok, rows: list[Example], max_new_tokens: int, path: Path) -> None:
    """Greedy completions of ``rows``' prompts (main process, the unwrapped policy; not under ZeRO-3, whose
    partitioned forward is a collective) with their chosen and rejected responses, as JSON lines."""
    if not rows or zero_stage(accelerator) == 3:
        return
    from align.rollout import SamplingParams
    from align.rollout.hf import HFEngine

    out = HFEngine(accelerator.unwrap_model(model), tok).generate(
        [e.prompt_ids for e in rows], n=1, sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for e, group in zip(rows, out):
        lines.append(
            {
                "prompt": tok.decode(e.prompt_ids, skip_special_tokens=True),
                "completion": group[0].text,
                "chosen": tok.decode(e.chosen_ids, skip_special_tokens=True),
                "rejected": None if e.rejected_ids is None else tok.decode(e.rejected_ids, skip_special_tokens=True),
            }
        )
    runs.atomic_write(path, "".join(json.dumps(x) + "\n" for x in lines))


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False) -> dict:
    """Run an offline recipe (trainer 'preference' or 'sft') into ``output_dir``; returns the summary."""
    from accelerate.utils import set_seed

    t = recipe.train
    spec = get_loss(recipe.loss.name)
    paired = spec.needs_rejected
    output_dir = Path(output_dir)
    runs.prepare_output_dir(output_dir, resume)

    accelerator = kit.make_accelerator(t.grad_accum)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    set_seed(t.seed)

    # ---- model, data (all input checks happen here, before anything is written)
    model, tok = load_policy(recipe.model, recipe.lora, seed=t.seed)
    examples = load_examples(recipe.data.train, tok, recipe.data, seed=t.seed, sft=not paired)
    held_out = []  # data.eval rows, numbered after the training rows (one reference table holds both)
    eval_source = recipe.data.eval
    if not eval_source and t.eval_steps and recipe.data.train in ("builtin:tasks", "builtin:tasks:train"):
        eval_source = "builtin:tasks:test"  # the built-in tasks' held-out split
    if eval_source:
        rows = load_examples(eval_source, tok, recipe.data, seed=t.seed, sft=not paired, split=recipe.data.eval_split)[
            : recipe.eval.size
        ]
        held_out = [dataclasses.replace(e, idx=len(examples) + k) for k, e in enumerate(rows)]
    per_epoch = len(examples) // (t.batch_size * world)
    if per_epoch < t.grad_accum:
        raise UserError(
            f"{recipe.data.train}: {len(examples)} rows are fewer than one optimizer step needs "
            f"(batch_size {t.batch_size} x grad_accum {t.grad_accum} x {world} processes)"
        )
    total_micro = (t.max_steps * t.grad_accum) if t.max_steps else (per_epoch // t.grad_accum) * t.grad_accum * t.epochs
    total_steps = total_micro // t.grad_accum

    reference = "none" if not spec.needs_reference else t.reference
    if reference == "auto":
        reference = "model" if is_peft(model) else "precompute"
    ref_model = None
    if reference == "model" and not is_peft(model):
        if zero_stage(accelerator) == 3:
            raise UserError(
                "train.reference: 'model' keeps an unsharded reference copy, which ZeRO-3 cannot hold; use "
                "train.reference=precompute (or LoRA)"
            )
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    # ---- optimisation, resume
    model, optimizer, scheduler = kit.prepare_optimization(accelerator, model, t, total_steps, t.grad_accum)
    if ref_model is not None:
        ref_model = ref_model.to(accelerator.device)
    collate = collator(model, recipe.data, tok.pad_token_id)  # padding-free rows where the model supports them
    start_step, ckpt = kit.restore(accelerator, output_dir, recipe, resume)
    ref_table, window = None, []
    if ckpt is not None:
        window = [
            {k: torch.tensor(v, dtype=torch.float32, device=accelerator.device) for k, v in w.items()}
            for w in runs.load_window(ckpt, rank)
        ]
        if (ckpt / "ref_logps.pt").exists():
            ref_table = torch.load(ckpt / "ref_logps.pt")
    if reference == "precompute" and ref_table is None:
        ref_table = precompute_reference(accelerator, model, examples + held_out, t.batch_size, collate, paired)
    log, progress = kit.open_run(
        accelerator, output_dir, recipe, start_step, total_steps, f"{recipe.trainer}:{spec.name}"
    )

    def batch_loss(batch):
        """(loss, per-example loss, metrics, chosen log-prob sums, chosen lengths) of one collated batch."""
        c, cl, r, rl = pair_logps(model, batch, paired)
        pb = PairBatch(chosen_logps=c, chosen_lengths=cl, rejected_logps=r, rejected_lengths=rl)
        if reference == "precompute":
            ref = ref_table[batch["idx"].cpu()].to(c.device)
            pb.ref_chosen_logps, pb.ref_rejected_logps = ref[:, 0], ref[:, 1]
        elif reference == "model":
            with torch.no_grad(), reference_context(accelerator.unwrap_model(model)):
                rc, _, rr, _ = pair_logps(ref_model if ref_model is not None else model, batch, paired)
            pb.ref_chosen_logps, pb.ref_rejected_logps = rc, rr
        if spec.needs_anchor:  # offline there is no sampling iterate: pi_t = reference
            pb.anchor_chosen_logps, pb.anchor_rejected_logps = pb.ref_chosen_logps, pb.ref_rejected_logps
        per_example, metrics = spec.fn(pb, recipe.loss)
        if spec.name == "sft":  # token mean over the batch
            loss = (per_example * cl).sum() / cl.sum().clamp(min=1)
        else:
            loss = per_example.mean()
        if recipe.loss.sft_weight:
            loss = loss + recipe.loss.sft_weight * chosen_nll(pb)
        return loss, per_example, metrics, c, cl

    last_eval: dict = {}

    def run_eval(at: int) -> None:
        """The loss and its metrics on the held-out rows (every rank takes its share; rank 0 logs them) and, on
        rank 0, greedy completions of the first eval.samples prompts in eval_samples/step-<at>.jsonl."""
        nonlocal last_eval
        last_eval = evaluate(accelerator, model, held_out, t.batch_size, collate, batch_loss, spec.name == "sft")
        if main:
            log.log({"step": at, **last_eval})
            write_samples(
                accelerator,
                model,
                tok,
                held_out[: recipe.eval.samples],
                recipe.eval.max_new_tokens,
                output_dir / "eval_samples" / f"step-{at}.jsonl",
            )

    # ---- the loop
    model.train()
    started, tokens = time.time(), 0
    step = start_step
    for micro in range(start_step * t.grad_accum, total_micro):
        exs = kit.micro_batch(examples, micro, per_epoch, t.batch_size, world, rank, t.seed)
        batch = {k: v.to(accelerator.device) for k, v in collate(exs).items()}
        tokens += real_tokens(batch)
        with accelerator.accumulate(model):
            loss, per_example, metrics, c, cl = batch_loss(batch)
            where = f"step {step + 1} (micro-batch {micro}); the last good checkpoint is kept in {output_dir}"
            loss, grad_norm = kit.checked_step(
                accelerator, model, optimizer, loss, t.max_grad_norm, t.nan_policy, where
            )
        window.append(
            {
                "loss": loss.detach().float(),
                **{k: v.float().mean() for k, v in metrics.items()},
                "logps/chosen": (c / cl.clamp(min=1)).detach().mean(),
            }
        )
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step += 1
        if step % t.logging_steps == 0 or step == total_steps:
            means = {
                k: accelerator.reduce(torch.stack([w[k] for w in window]).mean().to(accelerator.device), "mean").item()
                for k in window[0]
            }
            row = {
                "step": step,
                "epoch": round(micro / per_epoch, 4),
                "lr": scheduler.get_last_lr()[0],
                **means,
                "tokens_per_second": tokens * world / max(time.time() - started, 1e-9),
            }
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            window = []
            if main:
                log.log(row)
                progress.update(step, f"loss {row['loss']:.4f}")
        if held_out and t.eval_steps and step % t.eval_steps == 0:
            run_eval(step)
        if t.save_steps and step % t.save_steps == 0 and step < total_steps:
            kit.save_checkpoint(
                accelerator, output_dir, step, recipe, ref_table, extra=lambda d, w=window: runs.save_window(d, rank, w)
            )

    # ---- outputs
    if held_out and (not t.eval_steps or step % t.eval_steps or not last_eval):
        run_eval(step)
    wall = time.time() - started
    kit.save_final_model(accelerator, model, tok, output_dir)
    summary = {}
    if main:
        train_rows = [r for r in log.rows if "loss" in r]
        final = {**(train_rows[-1] if train_rows else {}), **last_eval}
        summary = {
            "trainer": recipe.trainer,
            "loss": spec.name,
            "steps": step,
            "examples": len(examples),
            "processes": world,
            "wall_seconds": round(wall, 3),
            "tokens_per_second": tokens * world / max(wall, 1e-9),
            "peak_memory_mb": kit.peak_memory_mb(),
            "reference": reference,
            "final": final,
        }
        kit.write_outputs(output_dir, recipe, log, summary)
    kit.finish(accelerator)
    return summary
