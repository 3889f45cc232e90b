"""Log-probabilities of response tokens: the one forward pass every trainer shares.

The full ``[batch, seq, vocab]`` logits tensor, upcast to fp32, is what stops long sequences and large vocabularies
(4 x 8k tokens x 152k vocabulary: 20 GB forward, twice that backward). ``token_logps_of`` never builds it:

    1. the model runs with ``output_hidden_states=True`` and ``logits_to_keep=1`` (the LM head on one position only);
    2. only the positions whose next token is scored (``mask``, e.g. the response tokens) are kept: prompt tokens
       never reach the LM head;
    3. their hidden states go through the LM head in chunks (``CHUNK`` tokens, fewer for large vocabularies): logits
       (soft-capped and divided by the temperature where the model or the caller says so), logsumexp and gather;
       the backward pass recomputes one chunk's logits at a time. Peak memory is O(chunk x vocab), not
       O(tokens x vocab).

Three forms of step 3: a plain ``nn.Linear`` head (no bias, adapter or hooks; tied or not) goes through
``_FusedHeadLogps``, forward and backward by hand with one reused logits buffer and the weight's gradient accumulated
in place (no per-chunk allocations: fastest, least heap churn); a frozen ZeRO-3 head through ``_FrozenZero3Head``
(one gather in forward, one in backward); any other head (a LoRA adapter on ``lm_head``, a trainable ZeRO-3 head,
hooks) is called as a module under activation checkpointing, so peft and DeepSpeed's parameter gathering work
unchanged. Models whose forward has no ``logits_to_keep`` fall back to the full-logits path
(``full_token_logps``), which is also the reference the tests compare against (values and gradients within 1e-5).

Packed rows (several sequences in one row, ``position_ids`` restarting per sequence and no attention mask):
transformers builds the block-diagonal causal mask from the position ids (SDPA, eager) or uses the varlen kernel
(flash-attention); ``sequence_logps`` adds the per-token log-probs back up per sequence (``seq_id``).
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.checkpoint import checkpoint

from align.data import pack, unwrap_model

CHUNK = 1024
"""Most tokens per LM-head chunk."""
CHUNK_ELEMENTS = 1 << 23
"""Most logits per chunk (8M: 32 MB in fp32): with a 152k vocabulary a chunk is 55 tokens, with 30k 274. The logits of
one chunk (and their gradient in the backward pass) are the largest tensors this module makes."""


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] as gather - logsumexp (no full log-softmax tensor is kept for backward)."""
    logits = logits.float()
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_supported(model) -> bool:
    base = unwrap_model(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters and base.get_output_embeddings() is not None


def _head_logps(head, softcap: float | None, temperature: float, h: torch.Tensor, labels: torch.Tensor):
    logits = head(h).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    return token_logps(logits, labels)


def _zero3(weight) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter (gathered only while its module runs)."""
    return hasattr(weight, "ds_id")


def _plain_linear(head) -> bool:
    """An LM head that is exactly ``x @ weight.T`` (no bias, no adapter or hooks wrapped around it)."""
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not hasattr(head, "_hf_hook")
        and not head._forward_hooks
        and not head._forward_pre_hooks
    )


def _chunk_calls(rows: int, chunk: int, zero3: bool, device) -> int:
    """LM-head calls for ``rows`` positions. Under ZeRO-3 each call of the head module gathers its weight, a collective:
    every rank makes as many calls as the rank with the most positions (the extra ones on no rows), or they hang."""
    n = -(-rows // chunk)
    if zero3 and torch.distributed.is_initialized():
        t = torch.tensor([n], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        n = int(t.item())
    return n


class _FrozenZero3Head(torch.autograd.Function):
    """Chunked LM-head log-probs for a frozen ZeRO-3 head (LoRA's base): the weight is gathered once in the forward
    pass and once in the backward pass (same count on every rank), and each chunk's logits are recomputed in the
    backward pass. Activation checkpointing cannot do this: ZeRO-3 has freed the weight by the time it recomputes."""

    @staticmethod
    def forward(ctx, h, weight, labels, softcap, temperature, chunk):
        import deepspeed

        ctx.weight, ctx.softcap, ctx.temperature, ctx.chunk = weight, softcap, temperature, chunk
        ctx.save_for_backward(h, labels)
        with deepspeed.zero.GatheredParameters([weight]), torch.no_grad():
            head = lambda x: torch.nn.functional.linear(x, weight)  # noqa: E731
            parts = [
                _head_logps(head, softcap, temperature, h[s : s + chunk], labels[s : s + chunk])
                for s in range(0, h.shape[0], chunk)
            ]
        return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        import deepspeed

        h, labels = ctx.saved_tensors
        grads, chunk = [], ctx.chunk
        with deepspeed.zero.GatheredParameters([ctx.weight]), torch.enable_grad():
            w = ctx.weight.detach()
            for s in range(0, h.shape[0], chunk):
                x = h[s : s + chunk].detach().requires_grad_()
                lp = _head_logps(
                    lambda v: torch.nn.functional.linear(v, w), ctx.softcap, ctx.temperature, x, labels[s : s + chunk]
                )
                (g,) = torch.autograd.grad(lp, x, grad_out[s : s + chunk])
                grads.append(g)
        return (torch.cat(grads) if grads else torch.zeros_like(h)), None, None, None, None, None


class _FusedHeadLogps(torch.autograd.Function):
    """Chunked LM-head log-probs of a plain ``nn.Linear`` head (no bias), forward and backward by hand: one logits
    buffer of ``chunk`` rows is reused for every chunk; the backward pass recomputes each chunk's logits into it,
    turns them into their gradient in place (g * (onehot - softmax), through the soft-cap and temperature), and
    accumulates the weight's gradient with one ``addmm_`` into a single [vocab, hidden] tensor. Activation
    checkpointing of the same loop allocates a logits tensor, its gradient and a [vocab, hidden] weight gradient per
    chunk; this makes none of them, so peak memory and heap churn stay at one chunk's logits."""

    @staticmethod
    def _logits(x, weight, softcap, temperature, buf):
        """(fp32 logits of ``x``, soft-capped and tempered, in ``buf``; tanh(raw / softcap) or None)."""
        out = buf[: x.shape[0]]
        if weight.dtype == torch.float32 and x.dtype == torch.float32:
            torch.mm(x, weight.t(), out=out)
        else:
            out.copy_(torch.mm(x, weight.t()))
        t = None
        if softcap:
            t = out.div_(softcap).tanh_()
            out = t * softcap
        if temperature != 1.0:
            out.div_(temperature)
        return out, t

    @staticmethod
    def forward(ctx, h, weight, labels, softcap, temperature, chunk):
        n = h.shape[0]
        values = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            logits, _ = _FusedHeadLogps._logits(h[s : s + chunk], weight, softcap, temperature, buf)
            torch.logsumexp(logits, -1, out=lse[s : s + chunk])
            values[s : s + chunk] = logits.gather(1, labels[s : s + chunk, None]).squeeze(1) - lse[s : s + chunk]
        ctx.softcap, ctx.temperature, ctx.chunk = softcap, temperature, chunk
        ctx.save_for_backward(h, weight, labels, lse)
        return values

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, labels, lse = ctx.saved_tensors
        n, chunk = h.shape[0], ctx.chunk
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32, device=h.device)
        rows = torch.arange(min(chunk, n), device=h.device)
        for s in range(0, n, chunk):
            x, g = h[s : s + chunk], grad_out[s : s + chunk].float()
            logits, t = _FusedHeadLogps._logits(x, weight, ctx.softcap, ctx.temperature, buf)
            grad = logits.sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])  # g * d log softmax(z)[y] / dz
            grad[rows[: x.shape[0]], labels[s : s + chunk]] += g
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            if t is not None:  # z = softcap * tanh(raw / softcap): dz / draw = 1 - tanh^2
                grad.mul_(1 - t * t)
            grad = grad.to(weight.dtype)
            if grad_h is not None:
                grad_h[s : s + chunk] = grad @ weight
            if grad_w is not None:
                grad_w.addmm_(grad.t(), x.to(weight.dtype))
        return grad_h, grad_w, None, None, None, None


def full_token_logps(model, input_ids, attention_mask=None, position_ids=None, temperature: float = 1.0):
    """Per-token log-probs [B, T-1] of ``input_ids[:, 1:]`` from the model's full logits (the reference path)."""
    kw = {"position_ids": position_ids} if position_ids is not None else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    return token_logps(logits, input_ids[:, 1:])


def token_logps_of(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """log pi(input_ids[:, t+1] | ...) at every position t where ``mask[:, t]`` (shape [B, T-1]) is set, 0.0
    elsewhere; [B, T-1]. The LM head runs on the masked positions only, ``chunk`` tokens at a time."""
    mask = mask.bool()
    if chunk <= 0 or not chunked_supported(model):
        return full_token_logps(model, input_ids, attention_mask, position_ids, temperature) * mask
    kw = {"position_ids": position_ids} if position_ids is not None else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
        **kw,
    )
    hidden = out.hidden_states[-1][:, :-1]
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    where = mask.nonzero(as_tuple=True)
    h, labels = hidden[where], input_ids[:, 1:][where]
    vocab = head.weight.ds_shape[0] if _zero3(head.weight) else head.weight.shape[0]
    chunk = min(chunk, max(16, CHUNK_ELEMENTS // max(1, vocab)))
    if _zero3(head.weight) and not head.weight.requires_grad and type(head) is torch.nn.Linear:
        values = _FrozenZero3Head.apply(h, head.weight, labels, softcap, temperature, chunk)
    elif not _zero3(head.weight) and _plain_linear(head) and h.shape[0]:
        values = _FusedHeadLogps.apply(h, head.weight, labels, softcap, temperature, chunk)
    else:
        parts = []
        for s in range(0, _chunk_calls(h.shape[0], chunk, _zero3(head.weight), h.device) * chunk, chunk):
            args = (head, softcap, temperature, h[s : s + chunk], labels[s : s + chunk])
            if torch.is_grad_enabled() and h.requires_grad:
                parts.append(checkpoint(_head_logps, *args, use_reentrant=False))
            else:
                parts.append(_head_logps(*args))
        values = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    # the one LM-head call of the forward (logits_to_keep=1) joins the graph with weight 0: under DDP every
    # parameter then has a gradient even when no position is masked in
    values = values + 0.0 * out.logits.float().sum()
    result = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return result.index_put(where, values)


def row_token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    packed: bool = False,
) -> torch.Tensor:
    """``token_logps_of`` for right-padded rows (the per-token objectives' batches: policy-gradient samples, agent
    episodes), [B, T-1]. With ``packed`` the rows' real tokens are first packed into padding-free rows
    (``align.data.pack``: position ids restart per sequence) and each value is put back at its row and position, so
    the result is the same tensor without the padding's compute."""
    mask = mask.bool()
    if not packed:
        return token_logps_of(model, input_ids, attention_mask, mask, temperature=temperature)
    lengths = attention_mask.sum(1).tolist()
    seqs = [input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    scored = [[0] + mask[i, : n - 1].long().tolist() for i, n in enumerate(lengths)]  # per token: is it scored
    rows = {k: v.to(input_ids.device) for k, v in pack(seqs, scored, 0).items()}
    pmask = rows["completion_mask"][:, 1:].bool()
    lp = token_logps_of(
        model, rows["input_ids"], None, pmask, position_ids=rows["position_ids"], temperature=temperature
    )
    r, t = pmask.nonzero(as_tuple=True)
    seq, pos = rows["seq_id"][r, t + 1], rows["position_ids"][r, t + 1] - 1
    out = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device)
    return out.index_put((seq, pos), lp[r, t])


def sequence_logps(model, batch: dict[str, torch.Tensor], chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi(token) over response tokens [N], number of response tokens [N]) of a collated batch: padded
    rows (``input_ids``, ``attention_mask``, ``completion_mask``: N = rows) or packed rows (``position_ids`` and
    ``seq_id`` too, ``attention_mask`` None: N = ``n_seq`` sequences)."""
    mask = batch["completion_mask"][:, 1:].bool()
    lp = token_logps_of(
        model, batch["input_ids"], batch.get("attention_mask"), mask, batch.get("position_ids"), chunk=chunk
    )
    if "seq_id" not in batch:
        return lp.sum(-1), mask.sum(-1).to(torch.float32)
    seq = batch["seq_id"][:, 1:][mask]
    n = int(batch["n_seq"])
    sums = torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, seq, lp[mask])
    lengths = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(
        0, seq, torch.ones_like(seq, dtype=torch.float32)
    )
    return sums, lengths


def pair_logps(model, batch: dict[str, torch.Tensor], paired: bool):
    """(chosen sums, chosen lengths, rejected sums, rejected lengths) of a collated [chosen; rejected] batch (padded
    or packed); the rejected pair is (None, None) for SFT rows (``paired`` False)."""
    logps, lengths = sequence_logps(model, batch)
    if not paired:
        return logps, lengths, None, None
    c, r = logps.chunk(2)
    cl, rl = lengths.chunk(2)
    return c, cl, r, rl
