"""Log-probabilities of response tokens: the one forward pass every trainer shares."""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] as gather - logsumexp (no full log-softmax tensor is kept for backward)."""
    logits = logits.float()
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi(token) over response tokens [N], number of response tokens [N]) for a right-padded batch
    with ``input_ids``, ``attention_mask`` and ``completion_mask`` (1 on response tokens)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].to(torch.float32)
    per_token = token_logps(out.logits[:, :-1], labels)
    return (per_token * mask).sum(-1), mask.sum(-1)


def pair_logps(model, batch: dict[str, torch.Tensor], paired: bool):
    """(chosen sums, chosen lengths, rejected sums, rejected lengths) of a collated [chosen; rejected] batch; the
    rejected pair is (None, None) for SFT rows (``paired`` False)."""
    logps, lengths = sequence_logps(model, batch)
    if not paired:
        return logps, lengths, None, None
    c, r = logps.chunk(2)
    cl, rl = lengths.chunk(2)
    return c, cl, r, rl
