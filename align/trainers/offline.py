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
import math
import os
import resource
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch

from align import runs
from align.config import Recipe
from align.data import Example, collate, load_examples
from align.errors import UserError
from align.logprobs import sequence_logps
from align.losses import PairBatch, chosen_nll, get_loss
from align.models import is_peft, load_policy, reference_context, save_model


class NonFiniteLoss(RuntimeError):
    pass


def _scheduler(optimizer, t, total_steps: int):
    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
        if t.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batch(examples: list[Example], micro_step: int, per_epoch: int, batch_size: int, world: int, rank: int, seed: int) -> list[Example]:
    """This rank's examples of a global micro-step: a seeded permutation per epoch, cut into world*batch blocks."""
    epoch, pos = divmod(micro_step, per_epoch)
    order = _order(len(examples), seed, epoch)
    start = pos * batch_size * world + rank * batch_size
    return [examples[i] for i in order[start:start + batch_size]]


def pair_logps(model, batch, paired: bool):
    """(chosen sums, chosen lengths, rejected sums, rejected lengths) of a collated [chosen; rejected] batch."""
    logps, lengths = sequence_logps(model, batch)
    if not paired:
        return logps, lengths, None, None
    c, r = logps.chunk(2)
    cl, rl = lengths.chunk(2)
    return c, cl, r, rl


@torch.no_grad()
def precompute_reference(accelerator, model, examples: list[Example], batch_size: int, pad_id: int, paired: bool) -> torch.Tensor:
    """Reference log-probs of every example under the initial policy, [n, 2] (chosen, rejected), on every rank.
    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(examples)
    per_rank = math.ceil(math.ceil(n / world) / batch_size) * batch_size
    padded = [(i % n) for i in range(per_rank * world)]
    mine = padded[rank * per_rank:(rank + 1) * per_rank]
    model.eval()
    table = torch.zeros(n, 2)
    rows_i, rows_v = [], []
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with reference_context(accelerator.unwrap_model(model)):
            c, _, r, _ = pair_logps(model, batch, paired)
        rows_i.append(torch.tensor(idx))
        rows_v.append(torch.stack([c.float().cpu(), (r if r is not None else torch.zeros_like(c)).float().cpu()], -1))
    idx_all = accelerator.gather(torch.cat(rows_i).to(accelerator.device)).cpu()
    val_all = accelerator.gather(torch.cat(rows_v).to(accelerator.device)).cpu()
    table[idx_all] = val_all
    model.train()
    return table


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False) -> dict:
    """Run an offline recipe (trainer 'preference' or 'sft') into ``output_dir``; returns the summary."""
    from accelerate.utils import set_seed

    t = recipe.train
    spec = get_loss(recipe.loss.name)
    paired = spec.needs_rejected
    output_dir = Path(output_dir)
    runs.prepare_output_dir(output_dir, resume)

    accelerator = make_accelerator(t.grad_accum)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    set_seed(t.seed)

    # ---- model, data (all input checks happen here, before anything is written)
    model, tok = load_policy(recipe.model, recipe.lora, seed=t.seed)
    examples = load_examples(recipe.data.train, tok, recipe.data, seed=t.seed, sft=not paired)
    per_epoch = len(examples) // (t.batch_size * world)
    if per_epoch < t.grad_accum:
        raise UserError(f"{recipe.data.train}: {len(examples)} rows are fewer than one optimizer step needs "
                        f"(batch_size {t.batch_size} x grad_accum {t.grad_accum} x {world} processes)")
    total_micro = (t.max_steps * t.grad_accum) if t.max_steps else (per_epoch // t.grad_accum) * t.grad_accum * t.epochs
    total_steps = total_micro // t.grad_accum

    reference = "none" if not spec.needs_reference else t.reference
    if reference == "auto":
        reference = "model" if is_peft(model) else "precompute"
    ref_model = None
    if reference == "model" and not is_peft(model):
        if ds_plugin is not None and ds_plugin.zero_stage == 3:
            raise UserError("train.reference: 'model' keeps an unsharded reference copy, which ZeRO-3 cannot hold; use train.reference=precompute (or LoRA)")
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    # ---- optimisation
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    scheduler = _scheduler(optimizer, t, total_steps)
    if ds_plugin is not None:
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
        ds_plugin.deepspeed_config["gradient_accumulation_steps"] = t.grad_accum
        ds_plugin.deepspeed_config["train_batch_size"] = t.batch_size * t.grad_accum * world
        # DeepSpeed clips at 1.0 unless told otherwise (and ignores clip_grad_norm_'s max_norm): 0.0 = off
        ds_plugin.deepspeed_config["gradient_clipping"] = t.max_grad_norm or 0.0
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if ref_model is not None:
        ref_model = ref_model.to(accelerator.device)
    pad_id = tok.pad_token_id

    # ---- resume or start
    start_step, ref_table, window = 0, None, []
    ckpt = runs.latest_checkpoint(output_dir) if resume else None
    if ckpt is not None:
        state = runs.read_state(ckpt, recipe)
        accelerator.load_state(str(ckpt))
        start_step = state["step"]
        window = [{k: torch.tensor(v, dtype=torch.float32, device=accelerator.device) for k, v in w.items()}
                  for w in runs.load_window(ckpt, rank)]
        if (ckpt / "ref_logps.pt").exists():
            ref_table = torch.load(ckpt / "ref_logps.pt")
    if reference == "precompute" and ref_table is None:
        ref_table = precompute_reference(accelerator, model, examples, t.batch_size, pad_id, paired)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        runs.write_recipe(output_dir, recipe)
    accelerator.wait_for_everyone()
    log = runs.MetricsLog(output_dir / "metrics.jsonl", start_step) if main else None
    progress = runs.Progress(total_steps, f"{recipe.trainer}:{spec.name}", enabled=main and recipe.logging.progress)

    # ---- the loop
    model.train()
    started, tokens = time.time(), 0
    step = start_step
    for micro in range(start_step * t.grad_accum, total_micro):
        exs = micro_batch(examples, micro, per_epoch, t.batch_size, world, rank, t.seed)
        batch = {k: v.to(accelerator.device) for k, v in collate(exs, pad_id).items()}
        tokens += int(batch["attention_mask"].sum())
        with accelerator.accumulate(model):
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
            bad = accelerator.reduce(torch.tensor(float(not torch.isfinite(loss)), device=accelerator.device), "sum")
            if bad.item() > 0:
                if t.nan_policy == "stop":
                    raise NonFiniteLoss(f"non-finite loss at step {step + 1} (micro-batch {micro}); the last good checkpoint is kept in {output_dir}")
                loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and t.max_grad_norm is not None:  # under DeepSpeed: the norm only (DS clips)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window.append({"loss": loss.detach().float(), **{k: v.float().mean() for k, v in metrics.items()},
                       "logps/chosen": (c / cl.clamp(min=1)).detach().mean()})
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step += 1
        if step % t.logging_steps == 0 or step == total_steps:
            means = {k: accelerator.reduce(torch.stack([w[k] for w in window]).mean().to(accelerator.device), "mean").item() for k in window[0]}
            row = {"step": step, "epoch": round(micro / per_epoch, 4), "lr": scheduler.get_last_lr()[0], **means,
                   "tokens_per_second": tokens * world / max(time.time() - started, 1e-9)}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            window = []
            if main:
                log.log(row)
                progress.update(step, f"loss {row['loss']:.4f}")
        if t.save_steps and step % t.save_steps == 0 and step < total_steps:
            save_checkpoint(accelerator, output_dir, step, recipe, ref_table, extra=lambda d: runs.save_window(d, rank, window))

    # ---- outputs
    accelerator.wait_for_everyone()
    wall = time.time() - started
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    save_model(unwrapped, tok, output_dir, state_dict=state_dict, is_main_process=main)
    summary = {}
    if main:
        final = log.rows[-1] if log.rows else {}
        summary = {"trainer": recipe.trainer, "loss": spec.name, "steps": step, "examples": len(examples),
                   "processes": world, "wall_seconds": round(wall, 3), "tokens_per_second": tokens * world / max(wall, 1e-9),
                   "peak_memory_mb": peak_memory_mb(), "reference": reference, "final": final}
        if recipe.logging.plots:
            runs.write_plots(output_dir, log.rows)
        runs.write_summary(output_dir, summary)
    finish(accelerator)
    return summary


def dist_timeout() -> timedelta | None:
    """``$ALIGN_DIST_TIMEOUT`` (seconds): how long a collective waits for a rank that stopped answering before
    the run fails. Unset: torch's default (30 min for gloo, 10 min for NCCL). A killed rank is noticed at once
    (its sockets close); a frozen one (a hung host, a stopped process) only through this timeout."""
    raw = os.environ.get("ALIGN_DIST_TIMEOUT", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"ALIGN_DIST_TIMEOUT={raw}: must be a positive number of seconds")
    return timedelta(seconds=seconds)


def make_accelerator(grad_accum: int):
    """An Accelerator that gets the CPU cases right (measured with accelerate 1.15 / DeepSpeed 0.19):
    DDP on CPU needs ``cpu=True`` (gloo); DeepSpeed on CPU needs an explicit gloo process group, or every rank
    believes it is rank 0 while DeepSpeed sees the real world size. DeepSpeed's shared-memory comm op (a ~50 s
    JIT build on first use) is skipped on CPU: plain gloo collectives give the same results.
    The process-group timeout comes from ``$ALIGN_DIST_TIMEOUT`` (see ``dist_timeout``)."""
    import warnings

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    on_cpu = not torch.cuda.is_available()
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    pg = {}
    timeout = dist_timeout()
    if timeout is not None:
        pg["timeout"] = timeout
    if on_cpu and use_ds:
        try:
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
        except ImportError:
            pass
        pg["backend"] = "gloo"
    handlers = [InitProcessGroupKwargs(**pg)] if pg else []
    return Accelerator(gradient_accumulation_steps=grad_accum, cpu=on_cpu and not use_ds, kwargs_handlers=handlers)


def finish(accelerator) -> None:
    """End a (possibly distributed) run. The short pause avoids a gloo worker-thread abort at interpreter exit
    seen in ~9% of ZeRO-3 CPU launches."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.end_training()
        time.sleep(0.5)


def save_checkpoint(accelerator, output_dir: Path, step: int, recipe: Recipe, ref_table, extra=None) -> None:
    """checkpoint-<step>/ via a .tmp folder renamed when complete, so a crash never leaves a half checkpoint.
    ``extra(folder)``, called on every process, writes more of that process's state into it."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if extra is not None:
        extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ref_table is not None:
            torch.save(ref_table, tmp / "ref_logps.pt")
        runs.finish_checkpoint(tmp, final, {"step": step, "recipe_fingerprint": runs.recipe_fingerprint(recipe)},
                               recipe.train.keep_checkpoints)
    accelerator.wait_for_everyone()


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA max allocated on GPU, else max resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

