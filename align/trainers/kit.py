"""The training kit: what every trainer shares, as plain functions. A trainer file keeps only its own data flow.

    accelerator = make_accelerator(grad_accum)                     # plain, DDP or DeepSpeed (CPU cases handled)
    model, optimizer, scheduler = prepare_optimization(accelerator, model, recipe.train, total_steps, grad_accum)
    start, ckpt = restore(accelerator, output_dir, recipe, resume)  # newest complete checkpoint, or (0, None)
    log, progress = open_run(accelerator, output_dir, recipe, start, total, label)
    for ...:
        order = data_order(n, seed, epoch)                          # a pure function of (seed, epoch)
        for share in rank_minibatches(order, batch_size, world, rank): ...
        loss, grad_norm = checked_step(accelerator, model, optimizer, loss, max_grad_norm, nan_policy, where)
        save_checkpoint(accelerator, output_dir, step, recipe)
    save_final_model(accelerator, model, tokenizer, output_dir)
    write_outputs(output_dir, recipe, log, summary)                 # main: trackers closed, plots, model card, summary
    finish(accelerator)

Sampling work is split across ranks with ``shard_and_gather`` (rank r takes items[r::world], results come back
to every rank in item order) and seeded per rank with ``RANK_SEED_STRIDE``.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch

from align import runs
from align.card import write_card
from align.config import Recipe
from align.errors import RunError, UserError

RANK_SEED_STRIDE = 1_000_003  # rank r samples with seed + r * stride (rank 0: the single-process seed)


class NonFiniteLoss(RunError):
    """A non-finite loss with ``train.nan_policy: stop``; the CLI prints it as one line and exits 1."""


# ------------------------------------------------------------------------------------------- processes


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


def make_accelerator(grad_accum: int = 1):
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


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA max allocated on GPU, else max resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------- optimisation


def make_scheduler(optimizer, total_steps: int, schedule: str, warmup_steps: int):
    """Linear warm-up over ``warmup_steps``, then constant, linear decay to 0 or a cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fused_adamw(params) -> bool:
    """AdamW's fused kernel (one pass per tensor, no whole-model temporaries: the foreach form briefly holds a
    model-sized copy at the step) where torch has it for every parameter (floating point, on CPU or CUDA), as
    transformers' default ``adamw_torch_fused``."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def prepare_optimization(
    accelerator,
    model,
    t,
    total_steps: int,
    grad_accum: int = 1,
    schedule: str | None = None,
    warmup_steps: int | None = None,
):
    """AdamW on the trainable parameters, the learning-rate schedule (``t.schedule`` and ``t.warmup_steps`` unless
    given), DeepSpeed's batch and clipping settings, ``accelerator.prepare``; the scheduler is registered for
    checkpointing. Returns (model, optimizer, scheduler)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused_adamw(params))
    scheduler = make_scheduler(
        optimizer, total_steps, schedule or t.schedule, t.warmup_steps if warmup_steps is None else warmup_steps
    )
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
        ds_plugin.deepspeed_config["gradient_accumulation_steps"] = grad_accum
        ds_plugin.deepspeed_config["train_batch_size"] = t.batch_size * grad_accum * accelerator.num_processes
        # DeepSpeed clips at 1.0 unless told otherwise (and ignores clip_grad_norm_'s max_norm): 0.0 = off
        ds_plugin.deepspeed_config["gradient_clipping"] = t.max_grad_norm or 0.0
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler


def checked_step(accelerator, model, optimizer, loss, max_grad_norm: float | None, nan_policy: str, where: str):
    """Backward and optimizer step on ``loss``, with a non-finite loss on any rank handled the same on every rank:
    ``nan_policy`` 'stop' raises ``NonFiniteLoss`` naming ``where``; 'skip' backpropagates a zero loss instead.
    The gradient is clipped at the optimizer step (under DeepSpeed: the norm is only measured, DeepSpeed clips).
    Under gradient accumulation (``accelerator.accumulate``) the optimizer steps only at the boundary. Returns
    (the loss backpropagated, the gradient norm when it was clipped, else None)."""
    bad = accelerator.reduce(torch.tensor(float(not torch.isfinite(loss)), device=accelerator.device), "sum")
    if bad.item() > 0:
        if nan_policy == "stop":
            raise NonFiniteLoss(f"non-finite loss at {where}")
        loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
    accelerator.backward(loss)
    grad_norm = None
    if accelerator.sync_gradients and max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def grad_metrics(grad_norm, max_grad_norm: float | None) -> dict:
    """A step's gradient norm before clipping (``checked_step``'s) and whether the clip scaled it down (1.0 / 0.0);
    {} when it was not measured."""
    if grad_norm is None:
        return {}
    norm = float(grad_norm)
    return {"grad_norm": norm, "grad_clipped": float(norm > max_grad_norm)}


def step_means(steps: list[dict]) -> dict:
    """The mean of every metric over the steps that logged it (grad_norm only where it was measured)."""
    out = {}
    for key in dict.fromkeys(k for s in steps for k in s):
        vals = [s[key] for s in steps if key in s]
        out[key] = sum(vals) / len(vals)
    return out


# ------------------------------------------------------------------------------------------- rollout engine


def policy_source(model_cfg) -> str | None:
    """Where the policy's starting weights live, for a vLLM engine to load them itself: a local HF model folder or a
    hub id (None for ``tiny:`` and in-memory models, adapter-only folders and pinned revisions: the engine writes its
    own copy)."""
    name = model_cfg.name_or_path
    if name.startswith(("tiny:", "memory:")) or model_cfg.revision:
        return None
    path = Path(name)
    if path.exists() or name.startswith((".", "/", "~")):
        return name if (path / "config.json").is_file() else None
    return name


def rollout_engine(recipe: Recipe, accelerator, policy, tokenizer, resumed: bool):
    """The recipe's rollout engine over ``policy`` (the module it samples from), placed on this rank; a resumed run
    pushes the restored weights before the first generation (a collective under ZeRO-3: every rank calls it)."""
    from align.rollout import make_engine, placement_of

    engine = make_engine(
        recipe.rollout, policy, tokenizer, source=policy_source(recipe.model), placement=placement_of(accelerator)
    )
    if resumed:
        engine.update_weights(policy)
    return engine


def average_gradients(params: list) -> None:
    """Data parallel without a DDP wrapper (models whose methods other than ``forward`` are trained): every rank's
    gradients replaced by their mean over the ranks, in one all-reduce. A parameter without a gradient counts 0."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


# ------------------------------------------------------------------------------------------- data order


def data_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of ``n`` rows in ``epoch``: a seeded permutation, a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batch(
    examples: list, micro_step: int, per_epoch: int, batch_size: int, world: int, rank: int, seed: int
) -> list:
    """This rank's examples of a global micro-step: a seeded permutation per epoch, cut into world*batch blocks."""
    epoch, pos = divmod(micro_step, per_epoch)
    order = data_order(len(examples), seed, epoch)
    start = pos * batch_size * world + rank * batch_size
    return [examples[i] for i in order[start : start + batch_size]]


def rank_minibatches(order: list[int], batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This rank's share of each global minibatch (batch_size x world consecutive entries of ``order``). Shares are
    equal, so every rank runs the same number of steps (ZeRO's collectives need it) and the gradient averaged over
    the ranks is the mean over the global minibatch. A ragged last minibatch is split evenly and the fewer than
    ``world`` entries left over are skipped this epoch (the next epoch reshuffles); with world = 1 none are."""
    out = []
    for s in range(0, len(order), batch_size * world):
        block = order[s : s + batch_size * world]
        share = len(block) // world
        if share:
            out.append(block[rank * share : (rank + 1) * share])
    return out


def shard_and_gather(items: list, world: int, rank: int, work) -> list:
    """``work(items[rank::world])`` on each rank (a list with one result per item), gathered to every rank in the
    order of ``items``. One process: ``work(items)``."""
    from accelerate.utils import gather_object

    parts = gather_object([work(items[rank::world])])
    return [parts[i % world][i // world] for i in range(len(items))]


@torch.no_grad()
def sharded_forward(fn, rows: list, batch_size: int, world: int, rank: int) -> list:
    """``fn(batch of rows) -> one result per row`` (no grad; e.g. the learner's log-probs of sampled tokens) for every
    row, on every rank in row order: rank r computes rows[r::world] in batches of ``batch_size`` and the results
    are gathered. Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively): a
    rank with fewer rows repeats a dummy batch."""
    from accelerate.utils import gather_object

    if not rows:
        return []
    mine = list(range(rank, len(rows), world))
    batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
    out = {}
    for b in range(batches):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        results = fn([rows[i] for i in idx] or rows[:1])
        out.update(zip(idx, results))
    merged = {}
    for part in gather_object([out]) if world > 1 else [out]:
        merged.update(part)
    return [merged[i] for i in range(len(rows))]


# ------------------------------------------------------------------------------------------- run folder


def from_main(accelerator, fn):
    """``fn()`` evaluated on rank 0 and its (picklable) result given to every rank: decisions that read the output
    folder (what is checkpointed, what is already sampled) are taken once, so ranks on machines that do not share
    a filesystem cannot disagree."""
    value = fn() if accelerator.is_main_process else None
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def pg_temperature(rollout_cfg) -> float:
    """The temperature the policy-gradient losses score sampled tokens at: the rollout's (the distribution the tokens
    were drawn from, as TRL and verl do), 1 for greedy sampling."""
    return rollout_cfg.temperature if rollout_cfg.temperature > 0 else 1.0


def restore(accelerator, output_dir: Path, recipe: Recipe, resume: bool) -> tuple[int, Path | None]:
    """When resuming: the newest complete checkpoint's step (chosen on rank 0), after every rank loaded its state
    (model, optimizer, scheduler, RNGs) from its own ``output_dir/checkpoint-<step>``; else (0, None)."""
    name = from_main(accelerator, lambda: getattr(runs.latest_checkpoint(output_dir) if resume else None, "name", None))
    if name is None:
        return 0, None
    ckpt = output_dir / name
    if not (ckpt / runs.STATE_FILE).is_file():
        raise UserError(f"{ckpt}: rank {accelerator.process_index} has no copy of the checkpoint rank 0 resumes from")
    state = runs.read_state(ckpt, recipe)
    # a quantized base (QLoRA) saves bitsandbytes' quantization state beside its (frozen, unchanged) weights; the
    # model loading them back has that state already: those keys are left out of the strict match
    quantized = getattr(recipe.model, "quantization", "none") != "none"
    accelerator.load_state(str(ckpt), **({"strict": False} if quantized else {}))
    return state["step"], ckpt


def node_local_storage(accelerator, output_dir: Path) -> bool:
    """Whether the machines of this launch write to filesystems of their own (True) or share one (False): rank 0
    leaves a marker in ``output_dir`` and every machine's first process looks for it. Without a shared filesystem
    each machine keeps a whole checkpoint (accelerate's ``save_on_each_node``) so that its ranks can resume."""
    if accelerator.num_processes == 1:
        return False
    import uuid

    token = from_main(accelerator, lambda: uuid.uuid4().hex)
    marker = output_dir / f".align-fs-{token}"
    if accelerator.is_main_process:
        marker.touch()
    accelerator.wait_for_everyone()
    from accelerate.utils import gather_object

    unseen = gather_object([accelerator.is_local_main_process and not marker.exists()])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    return any(unseen)


def open_run(
    accelerator, output_dir: Path, recipe: Recipe, start: int, total: int, label: str, subdirs: tuple[str, ...] = ()
):
    """The output folder (with ``subdirs``) and recipe.yaml, written by the main process once every input check has
    passed; the metrics log (kept up to ``start`` when resuming) and the progress line. Machines without a shared
    filesystem (``node_local_storage``) each keep whole checkpoints from then on. Returns (log, progress); ``log``
    is None on the other processes."""
    main = accelerator.is_main_process
    if accelerator.is_local_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    if main:
        for d in subdirs:
            (output_dir / d).mkdir(exist_ok=True)
        runs.write_recipe(output_dir, recipe)
    accelerator.wait_for_everyone()
    if node_local_storage(accelerator, output_dir):
        accelerator.project_configuration.save_on_each_node = True
    log = None
    if main:
        trackers = None
        if recipe.logging.report_to:
            from align.config import to_dict
            from align.tracking import Trackers, check_trackers, flat_config

            names = check_trackers(recipe.logging.report_to)
            if names:
                name = recipe.logging.run_name or output_dir.resolve().name
                trackers = Trackers(names, output_dir, name, flat_config(to_dict(recipe)), resume_step=start)
        log = runs.MetricsLog(output_dir / "metrics.jsonl", start, trackers)
    return log, runs.Progress(total, label, enabled=main and recipe.logging.progress)


def save_checkpoint(accelerator, output_dir: Path, step: int, recipe: Recipe, ref_table=None, extra=None) -> None:
    """checkpoint-<step>/ via a .tmp folder renamed when complete, so a crash never leaves a half checkpoint.
    ``extra(folder)``, called on every process, writes more of that process's state into it. Without a shared
    filesystem every machine's first process completes its own copy."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    per_node = accelerator.project_configuration.save_on_each_node
    writer = accelerator.is_local_main_process if per_node else accelerator.is_main_process
    if writer and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if extra is not None:
        extra(tmp)
    accelerator.wait_for_everyone()
    state = {"step": step, "recipe_fingerprint": runs.recipe_fingerprint(recipe)}
    if accelerator.is_main_process:
        if ref_table is not None:
            torch.save(ref_table, tmp / "ref_logps.pt")
        runs.finish_checkpoint(tmp, final, state, recipe.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    if writer and not accelerator.is_main_process and tmp.exists():  # this machine's own copy
        if ref_table is not None:
            torch.save(ref_table, tmp / "ref_logps.pt")
        runs.finish_checkpoint(tmp, final, state, recipe.train.keep_checkpoints)
    accelerator.wait_for_everyone()


def save_final_model(accelerator, model, tokenizer, output_dir: Path) -> None:
    """The trained model (or adapter) and tokenizer in HF format; a collective under ZeRO-3 (every rank calls it)."""
    from align.models import save_model

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    save_model(
        accelerator.unwrap_model(model),
        tokenizer,
        output_dir,
        state_dict=state_dict,
        is_main_process=accelerator.is_main_process,
    )


def write_outputs(output_dir: Path, recipe: Recipe, log, summary: dict, rows: list[dict] | None = None) -> None:
    """The end of a run on the main process: the trackers closed, plots/*.png of the logged rows (``rows``, default
    all of ``log``'s; unless ``logging.plots`` is off), the README.md model card and summary.json, written last."""
    log.close()
    if recipe.logging.plots:
        runs.write_plots(output_dir, log.rows if rows is None else rows)
    write_card(output_dir, recipe, summary)
    runs.write_summary(output_dir, summary)
