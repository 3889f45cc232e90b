"""Generation from a policy trained under DeepSpeed ZeRO-3.

ZeRO-3 partitions every parameter across the ranks, so a forward pass of the live module is a collective: every
rank would have to generate in lock-step (same prompts, same number of decode steps). The iterative trainers
instead let each rank sample its own shard of prompts from a plain, unsharded copy of the policy:

    with unpartitioned(accelerator):     # transformers would partition a from_pretrained model at load time
        model, tok = load_policy(...)
    copy = UnshardedCopy(model, accelerator.device)   # before accelerator.prepare: a deepcopy of the whole model
    model = accelerator.prepare(model)   # ... training ...
    engine.update_weights(copy.sync(accelerator.unwrap_model(model)))   # on every rank (gathering is collective)

``sync`` gathers each trainable parameter in turn (``deepspeed.zero.GatheredParameters``, one parameter's full
tensor in memory at a time) and copies it into the copy; frozen parameters (a LoRA base) never change and are
not gathered. A peft model is copied with its adapter, so the copy samples from base + adapter exactly as the
live model does. Under DDP and ZeRO-2 no copy is needed: the unwrapped live module holds full parameters.

``unpartitioned``: while a ZeRO-3 launch's DeepSpeed config is registered with transformers (accelerate does that
when the Accelerator is built), every ``from_pretrained`` builds its model inside ``deepspeed.zero.Init``, i.e.
already partitioned, whatever the accelerate config's ``zero3_init_flag`` says. Models that must stay whole on
every rank (a judge, a policy about to be copied) are loaded inside this context.
"""

from __future__ import annotations

import contextlib
import copy

import torch


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this launch, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


@contextlib.contextmanager
def unpartitioned(accelerator, enabled: bool = True):
    """Inside: ``from_pretrained`` builds ordinary, whole models even under ZeRO-3 (a no-op otherwise)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if not enabled or plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


class UnshardedCopy:
    """A plain copy of ``model`` (taken before DeepSpeed partitions it) kept equal to the live ZeRO-3 module."""

    def __init__(self, model, device=None):
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ValueError(
                "UnshardedCopy needs the policy before DeepSpeed partitions it (load it inside unpartitioned())"
            )
        self.model = copy.deepcopy(model).requires_grad_(False).to(device)  # where the live module will train

    @torch.no_grad()
    def sync(self, live):
        """Copy the live (partitioned) module's trainable parameters into the copy; returns the copy. A collective:
        every rank must call it, in the same order."""
        import deepspeed

        mine = dict(self.model.named_parameters())
        for name, p in live.named_parameters():
            if not p.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([p]):
                mine[name].copy_(p.data)
        return self.model
