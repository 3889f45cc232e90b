"""A decoding-friendly SDPA for grouped-query attention on CPU.

transformers' ``sdpa`` copies every grouped KV head (``repeat_kv``) on each decoding step when a mask is present;
on CPU that copy of the whole KV cache costs as much as the attention itself. ``sdpa_gqa`` (registered with
transformers' AttentionInterface) lets torch broadcast the KV heads instead (``enable_gqa``): same numbers, less
copying. The rollout engine switches a model to it while generating (``gqa_attention``).
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F

NAME = "sdpa_gqa"


def sdpa_gqa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, sdpa_gqa)
        AttentionMaskInterface.register(NAME, AttentionMaskInterface._global_mapping["sdpa"])


@contextlib.contextmanager
def gqa_attention(model):
    """While inside, a CPU model on transformers' ``sdpa`` uses ``sdpa_gqa``; anything else is left alone."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or next(model.parameters()).is_cuda:
        yield
        return
    _register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
