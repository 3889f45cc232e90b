"""Lean decoding for Llama-shaped models (llama, mistral, qwen2), used by the ``hf`` rollout engine.

transformers' forward is general: per step it builds a 4-D mask, walks module hooks and output dataclasses and
grows the KV cache with ``torch.cat``. For small models on CPU that bookkeeping costs more than the arithmetic.
``LlamaDecoder`` runs the same network as plain tensor code over the model's own parameters:

    prefill   x = embed(prompt ids) -> per layer: RMSNorm -> fused q/k/v -> RoPE -> SDPA (causal + left padding)
              -> o_proj -> residual -> RMSNorm -> down(act(gate) * up) -> residual; K/V written into a cache
              preallocated for the whole chunk (prompt + new tokens)
    step      the same for one token per row, K/V written in place; attention over the filled prefix as two batched
              matmuls per KV-head group (scores with the padding bias folded in, softmax, values)

The n samples of a prompt share its prefill (the cache rows are repeated). LoRA adapters (peft) are folded into
per-call weight copies (W + B A scaled), so the adapter state in force when ``generate`` is called (enabled,
disabled for the reference) is the one decoded with. Anything else (other architectures, ZeRO-3 partitioned
parameters, dynamic RoPE, sliding windows shorter than the sequence, DoRA, LoRA on embeddings) returns None from
``llama_decoder`` and the engine falls back to transformers' forward; so does a model whose fused copy would take
more than half the device's free memory (``AFFORD``), and ``HFEngine`` redoes a chunk with transformers' forward when
the lean path fails inside (an out-of-memory error, say). Tested against that forward in
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


def llama_decoder(model) -> LlamaDecoder | None:
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
    free = free_bytes(base.lm_head.weight.device)
    if free is not None and fused_bytes(base) > AFFORD * free:  # the fused copy would crowd out the KV cache (or OOM)
        return None
    try:
        return LlamaDecoder(base)
    except _Unsupported:
        return None


AFFORD = 0.5
"""The lean decoder's fused weight copy may take at most this fraction of the device's free memory."""


def fused_bytes(base) -> int:
    """Bytes of the decoder's rearranged copy: every linear layer of the decoder stack and the LM head."""
    linear = sum(m.weight.numel() for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return (linear + base.lm_head.weight.numel()) * base.lm_head.weight.element_size()


def free_bytes(device) -> int | None:
    """Free memory of ``device``: CUDA's free bytes, or the host's MemAvailable for the CPU (None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


class _Unsupported(Exception):
    pass


class LlamaDecoder:
    """The network's weights rearranged for decoding (made once per ``generate`` call, from the live parameters):
    q/k/v and gate/up fused, stored transposed for ``addmm``; the RMSNorm weights folded into the projection that
    follows and the attention scale into q; within every q and k head the two RoPE halves interleaved, so RoPE is
    one complex multiply (q.k is unchanged: q and k are permuted alike; the cache holds the permuted keys).

    Decoding cache, per layer: keys transposed, ``[rows * kv_heads, head_dim + 2, prompt + new]``, whose row
    ``head_dim`` is the padding bias (0, or a huge negative number on prompt padding) and row ``head_dim + 1`` zero;
    values ``[rows * kv_heads, prompt + new, head_dim]``. The query buffer carries (1, 0) in the two extra columns,
    so one ``bmm`` per layer gives the masked scores of a KV head's g = heads / kv_heads query heads."""

    def __init__(self, base):
        cfg = base.config
        self.rotary = base.model.rotary_emb
        self.embed = base.model.embed_tokens.weight
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.hidden = self.embed.shape[1]
        self.dtype = self.embed.dtype
        hd, nh, nk = self.head_dim, self.heads, self.kv_heads
        perm = torch.stack([torch.arange(hd // 2), torch.arange(hd // 2) + hd // 2], -1).flatten()  # x0, x_h, x1, ...
        qk_rows = torch.cat([h * hd + perm for h in range(nh + nk)])
        qk_rows = torch.cat([qk_rows, torch.arange(nk * hd) + (nh + nk) * hd])
        self.sliding = None
        self.layers = []
        root = self.hidden**0.5
        with torch.no_grad():
            for layer in base.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                if getattr(attn, "q_norm", None) is not None:
                    raise _Unsupported
                if getattr(attn, "sliding_window", None):
                    self.sliding = min(self.sliding or attn.sliding_window, attn.sliding_window)
                parts = [
                    _weight(m)
                    for m in (
                        attn.q_proj,
                        attn.k_proj,
                        attn.v_proj,
                        attn.o_proj,
                        mlp.gate_proj,
                        mlp.up_proj,
                        mlp.down_proj,
                    )
                ]
                if any(p is None for p in parts):
                    raise _Unsupported
                (qw, qb), (kw, kb), (vw, vb), (ow, ob), (gw, gb), (uw, ub), (dw, db) = parts
                w_in, w_post = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
                scale = torch.ones(qw.shape[0] + kw.shape[0] + vw.shape[0], dtype=qw.dtype, device=qw.device)
                scale[: nh * hd] = attn.scaling
                qkv_w = torch.cat([qw, kw, vw])[qk_rows.to(qw.device)] * (w_in * root) * scale[:, None]
                qkv_b = None if qb is None else torch.cat([qb, kb, vb])[qk_rows.to(qb.device)] * scale
                self.layers.append(
                    dict(
                        in_c=self._floor(layer.input_layernorm.variance_epsilon),
                        post_c=self._floor(layer.post_attention_layernorm.variance_epsilon),
                        qkv_w=qkv_w.t().contiguous(),
                        qkv_b=qkv_b,
                        o_w=ow.t().contiguous(),
                        o_b=ob,
                        gu_w=(torch.cat([gw, uw]) * (w_post * root)).t().contiguous(),
                        gu_b=None if gb is None else torch.cat([gb, ub]),
                        d_w=dw.t().contiguous(),
                        d_b=db,
                        act=mlp.act_fn,
                    )
                )
            self.head_w = (base.lm_head.weight * (base.model.norm.weight * root)).t().contiguous()
        self.head_b = getattr(base.lm_head, "bias", None)
        self.norm_c = self._floor(base.model.norm.variance_epsilon)
        self.inter = self.layers[0]["gu_w"].shape[1] // 2

    def fits(self, total_len: int) -> bool:
        return self.sliding is None or self.sliding >= total_len

    def _floor(self, eps: float) -> torch.Tensor:
        return torch.tensor((self.hidden * eps) ** 0.5, dtype=self.dtype, device=self.embed.device)

    @staticmethod
    def _normed_mm(x, w, b, c):
        """RMSNorm(x) @ w (+ b). RMSNorm(x) = x / sqrt(mean(x^2) + eps) = sqrt(H) x / hypot(|x|, sqrt(H eps)): the
        norm's weight and sqrt(H) are folded into w, and the per-row division is applied after the matmul."""
        d = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), c)
        y = torch.mm(x, w)
        return y.div_(d) if b is None else torch.addcdiv(b, y, d)

    def _mlp(self, x, L):
        gu = self._normed_mm(x, L["gu_w"], L["gu_b"], L["post_c"])
        gate, up = gu.split(self.inter, dim=1)
        x = torch.addmm(x, L["act"](gate) * up, L["d_w"])
        return x if L["d_b"] is None else x + L["d_b"]

    def _out(self, x, a, L):
        x = torch.addmm(x, a, L["o_w"])
        return x if L["o_b"] is None else x + L["o_b"]

    def _logits(self, x):
        return self._normed_mm(x, self.head_w, self.head_b, self.norm_c)

    # ---- the two entry points
    def prefill(self, input_ids, attn, pos, n: int, new_tokens: int) -> torch.Tensor:
        """Left-padded prompts [b, width] -> last-position logits [b * n, vocab]; allocates the cache for b * n rows."""
        b, width = input_ids.shape
        rows, total = b * n, width + new_tokens
        hd, nh, nk = self.head_dim, self.heads, self.kv_heads
        device, dt = input_ids.device, self.dtype
        self.kt = [torch.zeros(rows * nk, hd + 2, total, dtype=dt, device=device) for _ in self.layers]
        self.v = [torch.zeros(rows * nk, total, hd, dtype=dt, device=device) for _ in self.layers]
        valid = attn.bool()
        bias = torch.zeros(b, width, dtype=dt, device=device).masked_fill_(~valid, torch.finfo(dt).min / 4)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=device)
        # padded query positions attend to themselves only, so no row is all -inf (their outputs are never used)
        mask = ((causal[None] & valid[:, None, :]) | eye[None])[:, None]
        x = F.embedding(input_ids, self.embed)
        self.rot = self._rotations(x, total)
        rot = self.rot[pos][:, :, None]  # [b, width, 1, head_dim / 2]
        x = x.reshape(b * width, self.hidden)
        for i, L in enumerate(self.layers):  # the prompts once, into the first b rows' worth of cache
            qkv = self._normed_mm(x, L["qkv_w"], L["qkv_b"], L["in_c"])
            qk = torch.view_as_complex(qkv[:, : (nh + nk) * hd].float().reshape(b, width, nh + nk, hd // 2, 2)) * rot
            qk = torch.view_as_real(qk).to(dt).view(b, width, nh + nk, hd)
            kt = self.kt[i].view(rows, nk, hd + 2, total)
            kt[:b, :, :hd, :width] = qk[:, :, nh:].permute(0, 2, 3, 1)
            kt[:b, :, hd, :width] = bias[:, None]
            v = self.v[i].view(rows, nk, total, hd)
            v[:b, :, :width] = qkv[:, (nh + nk) * hd :].view(b, width, nk, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(
                qk[:, :, :nh].transpose(1, 2),
                kt[:b, :, :hd, :width].transpose(-1, -2),
                v[:b, :, :width],
                attn_mask=mask,
                scale=1.0,
                enable_gqa=nh != nk,
            )
            x = self._mlp(self._out(x, a.transpose(1, 2).reshape(b * width, nh * hd), L), L)
            if n > 1:  # each prompt's cache rows repeated for its n samples (sample k of prompt i is row i*n + k)
                kt[:, :, :, :width] = kt[:b, :, :, :width].repeat_interleave(n, 0)
                v[:, :, :width] = v[:b, :, :width].repeat_interleave(n, 0)
        x = x.view(b, width, self.hidden)[:, -1]
        if n > 1:
            x = x.repeat_interleave(n, 0)
        self.q = torch.zeros(rows * nk, nh // nk, hd + 2, dtype=dt, device=device)
        self.q[:, :, hd] = 1
        self.q_rot = (
            torch.view_as_complex(self.q.view(rows, nh, hd // 2 + 1, 2))[:, :, : hd // 2]
            if dt == torch.float32
            else None
        )
        self.q_out = self.q.view(rows, nh, hd + 2)[:, :, :hd]
        # where a step writes its keys and values (views made once; a step selects its position)
        self.k_in = [t.view(rows, nk, hd + 2, total)[:, :, :hd] for t in self.kt]
        self.v_in = [t.view(rows, nk, total, hd) for t in self.v]
        self.qkv_sizes = [nh * hd, nk * hd, nk * hd]
        self.filled = width
        return self._logits(x)

    def _rotations(self, x, length: int):
        """e^{i theta p} for positions p < length, [length, head_dim / 2] complex, from the model's own RoPE module."""
        cos, sin = self.rotary(x, torch.arange(length, device=x.device)[None])
        half = self.head_dim // 2
        return torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float())

    def step(self, tokens, pos) -> torch.Tensor:
        """One token per row ([rows]) at rotary positions ``pos`` [rows, 1] -> logits [rows, vocab]."""
        rows = tokens.shape[0]
        hd, nh, nk = self.head_dim, self.heads, self.kv_heads
        at, end = self.filled, self.filled + 1
        rot = self.rot.index_select(0, pos.view(-1)).unsqueeze(1)  # [rows, 1, head_dim / 2]
        x = F.embedding(tokens, self.embed)
        for i, L in enumerate(self.layers):
            q, k, v = self._normed_mm(x, L["qkv_w"], L["qkv_b"], L["in_c"]).split(self.qkv_sizes, dim=1)
            if self.q_rot is not None:  # fp32: rotate q straight into the query buffer
                torch.mul(torch.view_as_complex(q.view(rows, nh, hd // 2, 2)), rot, out=self.q_rot)
                k = torch.view_as_complex(k.view(rows, nk, hd // 2, 2)) * rot
            else:
                self.q_out.copy_(
                    torch.view_as_real(torch.view_as_complex(q.float().view(rows, nh, hd // 2, 2)) * rot).view(
                        rows, nh, hd
                    )
                )
                k = torch.view_as_complex(k.float().view(rows, nk, hd // 2, 2)) * rot
            self.k_in[i].select(3, at).copy_(torch.view_as_real(k).view(rows, nk, hd))
            self.v_in[i].select(2, at).copy_(v.view(rows, nk, hd))
            scores = torch.bmm(self.q, self.kt[i].narrow(2, 0, end))  # [rows * kv_heads, g, end], padding at -huge
            a = torch.bmm(scores.softmax(-1), self.v[i].narrow(1, 0, end)).view(rows, nh * hd)
            x = self._mlp(self._out(x, a, L), L)
        self.filled = end
        return self._logits(x)
