"""The registry itself: ``PairBatch`` (every loss's input), ``LossSpec``, ``register_loss``, ``get_loss``. The loss
modules import from here; ``align.losses`` imports them so that every loss is registered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PairBatch:
    """Inputs of every loss. Log-probs are sums over response tokens, shape [B]."""

    chosen_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_logps: Optional[torch.Tensor] = None
    rejected_lengths: Optional[torch.Tensor] = None
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    anchor_chosen_logps: Optional[torch.Tensor] = None  # pi_t, the iterate that sampled the pair (INPO, SPPO)
    anchor_rejected_logps: Optional[torch.Tensor] = None
    chosen_win_prob: Optional[torch.Tensor] = None  # P(y_w beats pi_t | x) (SPPO soft labels); None = hard label 1
    rejected_win_prob: Optional[torch.Tensor] = None  # P(y_l beats pi_t | x); None = hard label 0
    # policy-gradient losses (one sampled response per row, "chosen" = the sample):
    advantages: Optional[torch.Tensor] = None  # [B]
    token_logps: Optional[torch.Tensor] = None  # [B, T] log pi of each response token (0 where masked)
    old_token_logps: Optional[torch.Tensor] = None  # [B, T] log-probs under the policy that sampled (pi_old)
    token_mask: Optional[torch.Tensor] = None  # [B, T] 1 on the model's own response tokens
    ref_token_logps: Optional[torch.Tensor] = None  # [B, T] log pi_ref of each response token (loss.kl_coef > 0)
    is_weights: Optional[torch.Tensor] = None  # [B, T] truncated importance weights learner/sampler (online.is_cap)
    tokens_per_process: Optional[float] = None  # response tokens of the global minibatch / processes (loss_type dapo)


def chosen_nll(b: PairBatch) -> torch.Tensor:
    """Token-mean negative log-likelihood of the chosen responses over the batch (the ``loss.sft_weight`` term,
    Pang et al. 2024's NLL regulariser)."""
    return -b.chosen_logps.sum() / b.chosen_lengths.sum().clamp(min=1)


LossFn = Callable[[PairBatch, "LossConfig"], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # noqa: F821


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: LossFn
    needs_reference: bool
    needs_rejected: bool = True
    needs_anchor: bool = False
    per_token: bool = False  # needs token_logps / old_token_logps / token_mask / advantages
    summary: str = ""
    paper: str = ""  # the citation (authors, year, title, arXiv id): model cards and `align recipes --losses` show it


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    needs_reference: bool,
    needs_rejected: bool = True,
    needs_anchor: bool = False,
    per_token: bool = False,
    summary: str = "",
    paper: str = "",
):
    """Decorator: add a loss function to the registry under ``name``."""

    def wrap(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = LossSpec(
            name,
            fn,
            needs_reference,
            needs_rejected,
            needs_anchor,
            per_token,
            summary or (fn.__doc__ or "").strip().splitlines()[0],
            paper,
        )
        return fn

    return wrap


def get_loss(name: str) -> LossSpec:
    from align.errors import UserError

    if name not in LOSSES:
        raise UserError(f"loss {name!r} is not registered; choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
