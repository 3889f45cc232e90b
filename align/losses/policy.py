"""Policy-gradient objectives on sampled responses (one response per row)."""

from __future__ import annotations

import torch

from align.losses import PairBatch, register_loss


@register_loss("spo", needs_reference=False, needs_rejected=False, per_token=True,
               summary="SPO: clipped policy gradient on the self-play win-rate reward, leave-one-out baseline")
def spo(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """SPO, Swamy et al. 2024 (Algorithm 1), with an RLOO/PPO-style update (Ahmadian et al. 2024; Schulman 2017, Eq. 7):
    the reward of sample i of a prompt is its win rate against the other K-1 samples, r_i = mean_{j != i} P(y_i > y_j),
    the advantage is leave-one-out, A_i = r_i - mean_{j != i} r_j (computed by the trainer), and
    L = -(1/|y|) sum_t min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A), rho_t = pi(y_t) / pi_old(y_t), eps = loss.clip_eps.
    With one on-policy step rho = 1 and this is REINFORCE with the leave-one-out baseline."""
    mask = b.token_mask.float()
    ratio = torch.exp(b.token_logps - b.old_token_logps) * mask
    adv = b.advantages[:, None]
    eps = cfg.clip_eps
    per_token = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    loss = -(per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    clipped = ((ratio - 1).abs() > eps).float() * mask
    return loss, {"spo/advantage": b.advantages.detach(), "spo/clip_fraction": (clipped.sum(-1) / mask.sum(-1).clamp(min=1)).detach(),
                  "spo/ratio": ((ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).detach()}
