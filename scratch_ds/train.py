"""Tiny hand-written accelerate training loop for DS ZeRO-2/3 / multi-CPU / single-process experiments.

Usage:
  DS_ACCELERATOR=cpu accelerate launch --config_file zero3.yaml train.py --steps 5 --ga 2 --out w.pt
  python train.py ...   (single process)
"""
import argparse
import json
import os
import time

T0 = time.time()

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=5, help="number of micro-steps (loop iterations)")
p.add_argument("--ga", type=int, default=1)
p.add_argument("--mbs", type=int, default=2, help="per-rank micro batch size")
p.add_argument("--clip", type=float, default=0.0)
p.add_argument("--lora", action="store_true")
p.add_argument("--ref", action="store_true", help="frozen reference forward with disable_adapter")
p.add_argument("--out", default=None, help="torch.save full state dict (rank0) here")
p.add_argument("--save_model", default=None, help="save_pretrained dir")
p.add_argument("--ckpt_dir", default=None)
p.add_argument("--ckpt_at", type=int, default=-1, help="save_state after this many micro-steps then stop")
p.add_argument("--resume", default=None)
args = p.parse_args()

# ---- CPU-only box fix (accelerate 1.15): see README in final report
from accelerate.utils import InitProcessGroupKwargs
on_cpu = not torch.cuda.is_available()
use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by `accelerate launch`
FIX = os.environ.get("FIX", "1") == "1"  # FIX=0 reproduces the silent "every rank is rank 0" failure
accelerator = Accelerator(
    gradient_accumulation_steps=args.ga,
    cpu=FIX and on_cpu and not use_ds,  # DDP on CPU: MULTI_CPU + gloo (cpu=True would DISABLE DeepSpeed)
    kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if (FIX and on_cpu and use_ds) else [],
)
T_acc = time.time()
rank = accelerator.process_index
print(f"[init] rank={rank} num_processes={accelerator.num_processes} dist_type={accelerator.distributed_type} device={accelerator.device} backend={accelerator.state.backend} ws_env={os.environ.get('WORLD_SIZE')}", flush=True)

# ---- DeepSpeed: no dataloader is prepared, so micro batch size must be set explicitly
if accelerator.state.distributed_type == DistributedType.DEEPSPEED:
    ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_cfg["train_micro_batch_size_per_gpu"] = args.mbs
    accelerator.print("DS config before prepare:", json.dumps(ds_cfg))

torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100)
model = LlamaForCausalLM(cfg)
if args.lora:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, init_lora_weights=False))
optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
try:
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
except Exception:
    accelerator.print("DS config at failure:", json.dumps(getattr(accelerator, "deepspeed_config", None)))
    raise
T_prep = time.time()
accelerator.print(f"[timing] imports+Accelerator {T_acc - T0:.1f}s, prepare {T_prep - T_acc:.1f}s")
if accelerator.state.distributed_type == DistributedType.DEEPSPEED:
    accelerator.print("DS config after prepare:", json.dumps(accelerator.deepspeed_config))
accelerator.print("accelerator.gradient_accumulation_steps =", accelerator.gradient_accumulation_steps,
                  "| distributed_type =", accelerator.distributed_type, "| num_processes =", accelerator.num_processes)


def batch(step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 100, (args.mbs, 16), generator=g)
    return ids


start = 0
if args.resume:
    accelerator.load_state(args.resume)
    with open(os.path.join(args.resume, "meta.json")) as f:
        start = json.load(f)["step"]
    accelerator.print("resumed at micro-step", start)

model.train()
for step in range(start, args.steps):
    ids = batch(step)
    with accelerator.accumulate(model):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        if args.ref:
            with torch.no_grad():
                with accelerator.unwrap_model(model).disable_adapter():
                    ref_loss = model(input_ids=ids, labels=ids).loss
            loss = loss + 0.0 * ref_loss
        accelerator.backward(loss)
        gn = None
        if accelerator.sync_gradients and args.clip > 0:
            gn = accelerator.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    msg = f"rank{rank} step {step} loss {loss.item():.6f} sync={accelerator.sync_gradients} lr={scheduler.get_last_lr()[0]}"
    if args.ref:
        msg += f" ref_loss {ref_loss.item():.6f}"
    if gn is not None:
        msg += f" grad_norm {float(gn):.4f}"
    print(msg, flush=True)
    if args.ckpt_dir and step + 1 == args.ckpt_at:
        accelerator.save_state(args.ckpt_dir)
        if accelerator.is_main_process:
            with open(os.path.join(args.ckpt_dir, "meta.json"), "w") as f:
                json.dump({"step": step + 1}, f)
        accelerator.wait_for_everyone()
        accelerator.print("saved state at micro-step", step + 1, "-> stopping (simulated interruption)")
        break
T_train = time.time()

if args.out or args.save_model:
    sd = accelerator.get_state_dict(model)  # collective under ZeRO-3: call on ALL ranks
    if accelerator.is_main_process:
        print("state dict keys:", len(sd), "first:", next(iter(sd)), flush=True)
        if args.out:
            torch.save({k: v.detach().clone().cpu() for k, v in sd.items()}, args.out)
    if args.save_model:
        accelerator.unwrap_model(model).save_pretrained(args.save_model, state_dict=sd,
                                                        is_main_process=accelerator.is_main_process,
                                                        safe_serialization=True)
accelerator.wait_for_everyone()
accelerator.print(f"[timing] train {T_train - T_prep:.1f}s, save {time.time() - T_train:.1f}s, total {time.time() - T0:.1f}s")
accelerator.end_training()
