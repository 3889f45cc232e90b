"""Policy-gradient objectives on sampled responses (one response per row)."""

from __future__ import annotations

import torch

from align.losses.registry import PairBatch, register_loss


@register_loss(
    "spo",
    needs_reference=False,
    needs_rejected=False,
    per_token=True,
    summary="SPO: clipped policy gradient on the self-play win-rate reward, leave-one-out baseline",
    paper="Swamy et al. 2024, A Minimaximalist Approach to RLHF (arXiv:2401.04056)",
)
def spo(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """SPO, Swamy et al. 2024 (Algorithm 1), with an RLOO/PPO-style update (Ahmadian et al. 2024; Schulman 2017, Eq. 7):
    the reward of sample i of a prompt is its win rate against the other K-1 samples, r_i = mean_{j != i} P(y_i > y_j),
    the advantage is leave-one-out, A_i = r_i - mean_{j != i} r_j (computed by the trainer), and
    L = -(1/|y|) sum_t min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A), rho_t = pi(y_t) / pi_old(y_t),
    eps = loss.clip_eps.
    With one on-policy step rho = 1 and this is REINFORCE with the leave-one-out baseline."""
    mask = b.token_mask.float()
    ratio = torch.exp(b.token_logps - b.old_token_logps) * mask
    adv = b.advantages[:, None]
    eps = cfg.clip_eps
    per_token = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    loss = -(per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    clipped = ((ratio - 1).abs() > eps).float() * mask
    return loss, {
        "spo/advantage": b.advantages.detach(),
        "spo/clip_fraction": (clipped.sum(-1) / mask.sum(-1).clamp(min=1)).detach(),
        "spo/ratio": ((ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).detach(),
    }


@register_loss(
    "loop",
    needs_reference=False,
    needs_rejected=False,
    per_token=True,
    summary="LOOP: per-token clipped PPO on leave-one-out advantages over multi-turn episodes, env tokens masked",
    paper="Chen et al. 2025, RL for Long-Horizon Interactive LLM Agents (arXiv:2502.01600)",
)
def loop(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """LOOP, Chen et al. 2025 ("Reinforcement Learning for Long-Horizon Interactive LLM Agents"), Sec. 3:
    A_k = R_k - mean_{i != k} R_i over the K rollouts of a task (computed by the trainer; no value network, no KL),
    L = -(1/|a(x)|) sum_t min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) over the tokens the model emitted
    (``token_mask``: environment tokens are masked), rho_t = pi(a_t) / pi_old(a_t) with pi_old's log-probs
    recomputed by the learner before the iteration's first update.

    ``loss.importance: trajectory`` is the ablation with one importance weight per episode, the length-normalised
    sequence ratio rho = exp((1/|a|) sum_t log rho_t) (as GSPO, Zheng et al. 2025, Eq. 7), clipped once."""
    mask = b.token_mask.float()
    n = mask.sum(-1).clamp(min=1)
    log_ratio = (b.token_logps - b.old_token_logps) * mask
    adv = b.advantages[:, None]
    eps = cfg.clip_eps
    if getattr(cfg, "importance", "token") == "trajectory":
        ratio = torch.exp(log_ratio.sum(-1) / n)
        per = torch.minimum(ratio * b.advantages, torch.clamp(ratio, 1 - eps, 1 + eps) * b.advantages)
        loss = -per
        clipped = ((ratio - 1).abs() > eps).float()
        return loss, {
            "loop/clip_fraction": clipped.detach(),
            "loop/ratio": ratio.detach(),
            "loop/advantage": b.advantages.detach(),
        }
    ratio = torch.exp(log_ratio) * mask
    per_token = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    loss = -(per_token * mask).sum(-1) / n
    clipped = ((ratio - 1).abs() > eps).float() * mask
    return loss, {
        "loop/clip_fraction": (clipped.sum(-1) / n).detach(),
        "loop/ratio": ((ratio * mask).sum(-1) / n).detach(),
        "loop/advantage": b.advantages.detach(),
    }
