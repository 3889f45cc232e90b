"""Policy-gradient objectives on sampled responses (one response per row), and the group advantages the online
trainer feeds them (``group_advantages``: a pure function of one prompt's K rewards)."""

from __future__ import annotations

import math

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


def group_advantages(name: str, rewards: list[float], scale: bool = True) -> list[float]:
    """Advantages of the K samples of one prompt from their rewards r_1..r_K (K >= 2):
    spo, rloo   leave-one-out: A_i = r_i - mean_{j != i} r_j (Ahmadian et al. 2024, Eq. 7)
    grpo        group-normalised: A_i = (r_i - mean(r)) / (std(r) + 1e-4), std with Bessel's correction as in
                DeepSeekMath / TRL; ``scale=False`` keeps r_i - mean(r) (Dr. GRPO, Liu et al. 2025)."""
    k = len(rewards)
    total = sum(rewards)
    if name in ("spo", "rloo"):
        return [r - (total - r) / (k - 1) for r in rewards]
    if name == "grpo":
        mean = total / k
        centred = [r - mean for r in rewards]
        if not scale:
            return centred
        std = math.sqrt(sum(c * c for c in centred) / (k - 1))
        return [c / (std + 1e-4) for c in centred]
    raise ValueError(f"no group advantages for loss {name!r}")


def _clipped_pg(b: PairBatch, cfg, prefix: str) -> tuple[torch.Tensor, dict]:
    """The clipped per-token surrogate with an optional k3 KL to the reference, aggregated as ``cfg.loss_type``:
    l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + kl_coef * (exp(q_t) - q_t - 1), q_t = log ref - log pi;
    'grpo': per response (1/|y|) sum_t l_t; 'bnpo': sum_t l_t * B / (tokens of the minibatch), whose batch mean is the
    token mean."""
    mask = b.token_mask.float()
    n = mask.sum(-1).clamp(min=1)
    ratio = torch.exp((b.token_logps - b.old_token_logps) * mask)
    adv = b.advantages[:, None]
    eps = cfg.clip_eps
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    metrics = {}
    if cfg.kl_coef:
        q = (b.ref_token_logps - b.token_logps) * mask
        kl = torch.exp(q) - q - 1
        per_token = per_token + cfg.kl_coef * kl
        metrics[f"{prefix}/kl"] = ((kl * mask).sum(-1) / n).detach()
    summed = (per_token * mask).sum(-1)
    if cfg.loss_type == "bnpo":
        loss = summed * mask.shape[0] / mask.sum().clamp(min=1)
    else:
        loss = summed / n
    clipped = ((ratio - 1).abs() > eps).float() * mask
    metrics.update(
        {
            f"{prefix}/advantage": b.advantages.detach(),
            f"{prefix}/clip_fraction": (clipped.sum(-1) / n).detach(),
            f"{prefix}/ratio": ((ratio * mask).sum(-1) / n).detach(),
        }
    )
    return loss, metrics


@register_loss(
    "grpo",
    needs_reference=False,
    needs_rejected=False,
    per_token=True,
    summary="GRPO: clipped per-token policy gradient, group-normalised advantages, optional KL (k3) to the reference",
    paper="Shao et al. 2024, DeepSeekMath (arXiv:2402.03300)",
)
def grpo(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """GRPO, Shao et al. 2024 (DeepSeekMath), Eq. 3: for the K samples of a prompt with rewards r,
    A_i = (r_i - mean(r)) / std(r) (computed by the trainer, ``group_advantages``), and
    L = (1/|y|) sum_t [-min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta KL_t], rho_t = pi(y_t) / pi_old(y_t),
    KL_t = pi_ref/pi - log(pi_ref/pi) - 1 (k3), beta = loss.kl_coef; loss.loss_type 'bnpo' takes the token mean."""
    return _clipped_pg(b, cfg, "grpo")


@register_loss(
    "rloo",
    needs_reference=False,
    needs_rejected=False,
    per_token=True,
    summary="RLOO: clipped per-token policy gradient with the leave-one-out baseline, optional KL (k3)",
    paper="Ahmadian et al. 2024, Back to Basics: Revisiting REINFORCE Style Optimization (arXiv:2402.14740)",
)
def rloo(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """RLOO, Ahmadian et al. 2024, Eq. 7: A_i = r_i - (1/(K-1)) sum_{j != i} r_j over the K samples of a prompt
    (computed by the trainer), in the same clipped per-token loss as GRPO,
    L = (1/|y|) sum_t [-min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta KL_t]; with one on-policy step rho = 1
    and this is REINFORCE with the leave-one-out baseline."""
    return _clipped_pg(b, cfg, "rloo")
