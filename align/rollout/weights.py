"""The trainer's weights in the form vLLM loads them (HF checkpoint names), materialised one piece at a time.

Every sync path reads the policy through here, so under DeepSpeed ZeRO-3 (partitioned parameters) no rank ever holds
more than one parameter, or one LoRA layer (its base weight and adapter), in full at once:

    for name, tensor in hf_weights(model, merged=True): ...   # valid until the next item; a collective under ZeRO-3
    adapter_state(model)                                       # the LoRA tensors on CPU (small), for an adapter folder
    write_hf_folder(model, tokenizer, folder, hf_weights(model))   # safetensors shards of at most shard_bytes

Gathering is a collective: every rank must walk the same generator to the end, in the same order, whether or not it
uses the tensors. ``GATHERED`` records the largest number of elements materialised at once (tests assert it).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

GATHERED = {"peak_numel": 0, "calls": 0}
"""Largest number of parameter elements gathered at once by ``gathered`` since the last ``reset_gather_stats``."""


def reset_gather_stats() -> None:
    GATHERED.update(peak_numel=0, calls=0)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def is_zero3(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered(params: list):
    """Full tensors of DeepSpeed ZeRO-3 partitioned parameters inside (a no-op for ordinary ones)."""
    part = [p for p in params if hasattr(p, "ds_id")]
    if not part:
        yield
        return
    import deepspeed

    GATHERED["peak_numel"] = max(GATHERED["peak_numel"], sum(int(p.ds_numel) for p in part))
    GATHERED["calls"] += 1
    with deepspeed.zero.GatheredParameters(part):
        yield


def hf_name(name: str) -> str | None:
    """A peft parameter name as the base model's HF checkpoint name; None for adapter-only entries."""
    if "lora_" in name or "original_module" in name:
        return None
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace("modules_to_save.default.", "")


def _lora_parts(module) -> list:
    """The adapter parameters of a peft LoRA layer whose delta is in force (active adapters, not merged, enabled)."""
    if not hasattr(module, "lora_A") or getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return []
    parts = []
    for name in module.active_adapters:
        if name in module.lora_A:
            parts += [module.lora_A[name].weight, module.lora_B[name].weight]
    return parts


def hf_weights(model, merged: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the model's full weights, one parameter gathered at a time. A peft model gives its base
    weights, with each LoRA layer's delta added (``merged``: base + B A scaled, computed for that layer only) or not.
    Tied parameters come once (``named_parameters``)."""
    if not is_peft(model):
        for name, p in model.named_parameters():
            with gathered([p]):
                yield name, p.data
        return
    for name, p in model.named_parameters():
        hf = hf_name(name)
        if hf is None:
            continue
        owner = model.get_submodule(name.rsplit(".base_layer.", 1)[0]) if ".base_layer." in name else None
        parts = _lora_parts(owner) if merged and owner is not None and name.endswith(".weight") else []
        with gathered([p, *parts]):
            if parts:
                w = p.data
                for adapter in owner.active_adapters:
                    if adapter in owner.lora_A:
                        w = w + owner.get_delta_weight(adapter).to(w.dtype)
                yield hf, w
            else:
                yield hf, p.data


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The LoRA parameters (peft names) as CPU tensors, each gathered on its own."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            with gathered([p]):
                out[name] = p.data.detach().to("cpu", copy=True)
    return out


def fingerprint(model) -> tuple | None:
    """A cheap identity of a model's base weights (names and per-tensor sums); None under ZeRO-3 (it would need a
    full pass of gathers, and the base of a LoRA run does not change there)."""
    if is_zero3(model):
        return None
    names, sums = [], []
    for name, t in hf_weights(model, merged=False):
        names.append(name)
        sums.append(t.detach().float().sum())
    return tuple(names), tuple(torch.stack(sums).cpu().tolist()) if sums else ()


def write_hf_folder(
    model, tokenizer, folder: Path, named: Iterator, shard_bytes: int = 1 << 30, write: bool = True
) -> None:
    """An HF model folder (config, tokenizer, ``model-*.safetensors`` + index) from ``named`` (name, tensor) pairs,
    holding at most one shard (``shard_bytes``) on the CPU at a time. ``named`` is consumed to the end even when
    ``write`` is False (the other ranks of a ZeRO-3 gather)."""
    from safetensors.torch import save_file

    base = model.get_base_model() if is_peft(model) else model
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    folder = Path(folder)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.safetensors*"):
            old.unlink()
    shard: dict[str, torch.Tensor] = {}
    size, total, index, files = 0, 0, {}, []

    def flush():
        nonlocal shard, size
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            files.append(fname)
            index.update(dict.fromkeys(shard, fname))
        shard, size = {}, 0

    for name, tensor in named:
        if not write or (tied and name == "lm_head.weight"):
            continue
        t = tensor.detach().to("cpu", copy=True).contiguous()
        if size and size + t.numel() * t.element_size() > shard_bytes:
            flush()
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
    if not write:
        return
    flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    base.config.save_pretrained(folder)
    if tokenizer is not None and not (folder / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(folder)
