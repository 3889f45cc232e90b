"""Lean decoding for Llama-shaped models (llama, mistral, qwen2), used by the ``hf`` rollout engine.

transformers' forward is general: per step it builds a 4-D mask, walks module hooks and output dataclasses and
grows the KV cache with ``torch.cat``. For small models on CPU that bookkeeping costs more than the arithmetic.
``LlamaDecoder`` runs the same network as plain tensor code over the model's own parameters:

    prefill   x = embed(prompt ids) -> per layer: RMSNorm -> fused q/k/v -> RoPE -> SDPA (causal + left padding)
              -> o_proj -> residual -> RMSNorm -> down(act(gate) * up) -> residual; K/V written into a cache
              preallocated for the whole chunk ([rows, kv_heads, prompt + new tokens, head_dim] per layer)
    step      the same for one token per row, K/V written in place; attention over the filled prefix as two batched
              matmuls per KV head group (baddbmm with the padding bias, softmax, bmm)

The n samples of a prompt share its prefill (the cache rows are repeated). LoRA adapters (peft) are folded into
per-call weight copies (W + B A scaled), so the adapter state in force when ``generate`` is called (enabled,
disabled for the reference) is the one decoded with. Anything else (other architectures, ZeRO-3 partitioned
parameters, dynamic RoPE, sliding windows shorter than the sequence, DoRA, LoRA on embeddings) returns None from
``llama_decoder`` and the engine falls back to transformers' forward. Tested against that forward in
tests/rollout/test_hf.py (same greedy tokens, log-probs within 1e-4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = {"llama", "mistral", "qwen2"}
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


def _base(model):
    """The ``*ForCausalLM`` module under a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _plain(module) -> bool:
    return not hasattr(module, "base_layer") and not hasattr(module, "lora_A")


def _weight(module):
    """(weight, bias) of a Linear, with active LoRA adapters folded in; None if the layer is something else."""
    if _plain(module):
        return module.weight, module.bias
    base = module.base_layer
    if not isinstance(base, torch.nn.Linear) or getattr(module, "lora_magnitude_vector", None):  # DoRA: not folded
        return None
    w = base.weight
    if not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                w = w + module.get_delta_weight(name).to(w.dtype)
    return w, base.bias


def llama_decoder(model) -> "LlamaDecoder | None":
    """A decoder over ``model``'s current weights, or None when the lean path does not apply."""
    base = _base(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED or not hasattr(base, "model"):
        return None
    if any(hasattr(p, "ds_id") for p in base.parameters()):  # ZeRO-3 partitions: transformers' forward gathers them
        return None
    if getattr(base, "_hf_hook", None) is not None or getattr(config, "pretraining_tp", 1) != 1:
        return None
    rotary = getattr(base.model, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in STATIC_ROPE:
        return None
    if not _plain(base.model.embed_tokens) or not _plain(base.lm_head):
        return None
    try:
        return LlamaDecoder(base)
    except _Unsupported:
        return None


class _Unsupported(Exception):
    pass


class LlamaDecoder:
    """The network's weights rearranged for decoding (made once per ``generate`` call, from the live parameters):
    q/k/v and gate/up fused, stored transposed for ``addmm``; the RMSNorm weights folded into the projection that
    follows; within every q and k head the two RoPE halves interleaved, so RoPE is one complex multiply (q.k is
    unchanged: q and k are permuted alike; the cache holds the permuted keys)."""

    def __init__(self, base):
        cfg = base.config
        self.rotary = base.model.rotary_emb
        self.embed = base.model.embed_tokens.weight
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.hidden = self.embed.shape[1]
        self.dtype = self.embed.dtype
        hd = self.head_dim
        perm = torch.stack([torch.arange(hd // 2), torch.arange(hd // 2) + hd // 2], -1).flatten()  # x0, x_h, x1, ...
        qk_rows = torch.cat([h * hd + perm for h in range(self.heads + self.kv_heads)])
        qk_rows = torch.cat([qk_rows, torch.arange(self.kv_heads * hd) + (self.heads + self.kv_heads) * hd])
        self.sliding = None
        self.layers = []
        with torch.no_grad():
            for layer in base.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                if getattr(attn, "q_norm", None) is not None:
                    raise _Unsupported
                if getattr(attn, "sliding_window", None):
                    self.sliding = min(self.sliding or attn.sliding_window, attn.sliding_window)
                parts = [_weight(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
                if any(p is None for p in parts):
                    raise _Unsupported
                (qw, qb), (kw, kb), (vw, vb), (ow, ob), (gw, gb), (uw, ub), (dw, db) = parts
                w_in, w_post = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
                qkv_w = torch.cat([qw, kw, vw])[qk_rows.to(qw.device)] * w_in
                qkv_b = None if qb is None else torch.cat([qb, kb, vb])[qk_rows.to(qb.device)]
                self.layers.append(dict(
                    in_eps=layer.input_layernorm.variance_epsilon, post_eps=layer.post_attention_layernorm.variance_epsilon,
                    qkv_w=qkv_w.t().contiguous(), qkv_b=qkv_b, o_w=ow.t().contiguous(), o_b=ob,
                    gu_w=(torch.cat([gw, uw]) * w_post).t().contiguous(), gu_b=None if gb is None else torch.cat([gb, ub]),
                    d_w=dw.t().contiguous(), d_b=db, scaling=attn.scaling, act=mlp.act_fn))
            self.head_w = (base.lm_head.weight * base.model.norm.weight).t().contiguous()
        self.head_b = getattr(base.lm_head, "bias", None)
        self.norm_eps = base.model.norm.variance_epsilon
        self.inter = self.layers[0]["gu_w"].shape[1] // 2

    def fits(self, total_len: int) -> bool:
        return self.sliding is None or self.sliding >= total_len

    def _norm(self, x, eps):  # RMSNorm without its weight (folded into the next projection)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden,), None, eps)
        return F.rms_norm(x.float(), (self.hidden,), None, eps).to(x.dtype)

    @staticmethod
    def _mm(x, w, b):
        return torch.mm(x, w) if b is None else torch.addmm(b, x, w)

    def _rotations(self, x, length: int):
        """e^{i theta p} for positions p < length, [length, head_dim / 2] complex, from the model's own RoPE module."""
        cos, sin = self.rotary(x, torch.arange(length, device=x.device)[None])
        half = self.head_dim // 2
        return torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float())

    def _layers(self, x, pos, mask, start: int):
        """x [rows, q, hidden] at cache positions start..start+q-1 (rotary positions ``pos`` [rows, q])."""
        rows, q = x.shape[0], x.shape[1]
        rot = self.rot[pos][:, :, None]  # [rows, q, 1, head_dim / 2]
        hd, nh, nk = self.head_dim, self.heads, self.kv_heads
        end = start + q
        x = x.reshape(rows * q, self.hidden)
        for i, L in enumerate(self.layers):
            qkv = self._mm(self._norm(x, L["in_eps"]), L["qkv_w"], L["qkv_b"])
            qk = qkv[:, : (nh + nk) * hd].reshape(rows, q, nh + nk, hd // 2, 2)
            qk = torch.view_as_real(torch.view_as_complex(qk.float()) * rot).to(x.dtype).view(rows, q, nh + nk, hd)
            self.k[i][:, :, start:end] = qk[:, :, nh:].transpose(1, 2)
            self.v[i][:, :, start:end] = qkv[:, (nh + nk) * hd:].view(rows, q, nk, hd).transpose(1, 2)
            if q == 1:  # decoding: the g = nh / nk query heads of a KV head against its keys, two batched matmuls
                kf, vf = self.k[i].view(rows * nk, -1, hd)[:, :end], self.v[i].view(rows * nk, -1, hd)[:, :end]
                scores = torch.baddbmm(mask, qk[:, 0, :nh].reshape(rows * nk, nh // nk, hd), kf.transpose(1, 2), alpha=L["scaling"])
                a = torch.bmm(scores.softmax(-1), vf).view(rows, nh * hd)
            else:
                a = F.scaled_dot_product_attention(qk[:, :, :nh].transpose(1, 2), self.k[i][:, :, :end], self.v[i][:, :, :end],
                                                   attn_mask=mask, scale=L["scaling"], enable_gqa=nh != nk)
                a = a.transpose(1, 2).reshape(rows * q, nh * hd)
            x = torch.addmm(x, a, L["o_w"])
            if L["o_b"] is not None:
                x = x + L["o_b"]
            gu = self._mm(self._norm(x, L["post_eps"]), L["gu_w"], L["gu_b"])
            x = torch.addmm(x, L["act"](gu[:, : self.inter]) * gu[:, self.inter:], L["d_w"])
            if L["d_b"] is not None:
                x = x + L["d_b"]
        return x.view(rows, q, self.hidden)

    def _logits(self, x):
        return self._mm(self._norm(x, self.norm_eps), self.head_w, self.head_b)

    # ---- the two entry points
    def prefill(self, input_ids, attn, pos, n: int, new_tokens: int) -> torch.Tensor:
        """Left-padded prompts [b, width] -> last-position logits [b * n, vocab]; allocates the cache for b * n rows."""
        b, width = input_ids.shape
        rows, total = b * n, width + new_tokens
        device = input_ids.device
        self.k = [torch.zeros(rows, self.kv_heads, total, self.head_dim, dtype=self.dtype, device=device) for _ in self.layers]
        self.v = [torch.zeros_like(t) for t in self.k]
        valid = attn.bool()
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=device)
        # padded query positions attend to themselves only, so no row is all -inf (their outputs are never used)
        mask = ((causal[None] & valid[:, None, :]) | eye[None])[:, None]
        x = F.embedding(input_ids, self.embed)
        self.rot = self._rotations(x, total)
        full_k, full_v = self.k, self.v
        self.k, self.v = [t[:b] for t in full_k], [t[:b] for t in full_v]  # the prompts once, in the first b rows
        x = self._layers(x, pos, mask, 0)[:, -1]
        if n > 1:  # then each prompt's cache row repeated for its n samples (sample k of prompt i is row i*n + k)
            for i in range(len(self.layers)):
                full_k[i][:, :, :width] = self.k[i][:, :, :width].repeat_interleave(n, 0)
                full_v[i][:, :, :width] = self.v[i][:, :, :width].repeat_interleave(n, 0)
            x, valid = x.repeat_interleave(n, 0), valid.repeat_interleave(n, 0)
        self.k, self.v = full_k, full_v
        # decoding mask as an additive bias per (row, KV head): 0 where a key may be attended, -inf on prompt padding
        self.bias = torch.zeros(rows, self.kv_heads, 1, total, dtype=x.dtype, device=device)
        self.bias[:, :, :, :width].masked_fill_(~valid[:, None, None, :], float("-inf"))
        self.bias = self.bias.view(rows * self.kv_heads, 1, total)
        self.filled = width
        return self._logits(x)

    def step(self, tokens, pos) -> torch.Tensor:
        """One token per row ([rows]) at rotary positions ``pos`` [rows, 1] -> logits [rows, vocab]."""
        x = F.embedding(tokens[:, None], self.embed)
        end = self.filled + 1
        x = self._layers(x, pos, self.bias[:, :, :end], self.filled)
        self.filled = end
        return self._logits(x[:, 0])
