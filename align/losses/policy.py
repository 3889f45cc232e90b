"""Policy-gradient objectives on sampled responses (one response per row), and the group advantages the online
trainer feeds them (``group_advantages``: a pure function of one prompt's K rewards)."""

from __future__ import annotations

import math

import torch

from align.losses.registry import PairBatch, register_loss

LOG_RATIO_CLAMP = 20.0
"""log pi - log pi_old is clamped to +-20 before ``exp`` (as verl): one outlier token cannot overflow the ratio."""


def _token_ratio(b: PairBatch) -> torch.Tensor:
    """rho_t = pi(y_t) / pi_old(y_t) per token (1 on masked positions), from the clamped log-ratio."""
    return torch.exp(
        ((b.token_logps - b.old_token_logps) * b.token_mask.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    )


def _max_dev(ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max_t |rho_t - 1| over each row's tokens (0 for a row without any): 0 when pi_old is the learner's own."""
    return ((ratio - 1).abs() * mask).amax(-1).detach()


def _bounds(cfg) -> tuple[float, float]:
    """The clip range [1 - eps_low, 1 + eps]: eps_low = loss.clip_eps_low, or loss.clip_eps when unset."""
    eps = cfg.clip_eps
    low = getattr(cfg, "clip_eps_low", None)
    return 1 - (eps if low is None else low), 1 + eps


def _weighted(per_token: torch.Tensor, b: PairBatch) -> torch.Tensor:
    """The per-token surrogate times the truncated importance weights of ``b.is_weights`` (TIS), when given."""
    return per_token if b.is_weights is None else per_token * b.is_weights


def _surrogate(ratio: torch.Tensor, adv: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(-min(rho A, clip(rho, lo, hi) A), where clipping removed the gradient): above hi when A > 0, below lo when
    A < 0 (the other side is never clipped by the min, so it is not counted in the clip fraction)."""
    loss = -torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    removed = ((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo))
    return loss, removed.float()


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
    n = mask.sum(-1).clamp(min=1)
    ratio = _token_ratio(b)
    per_token, removed = _surrogate(ratio, b.advantages[:, None], *_bounds(cfg))
    loss = (_weighted(per_token, b) * mask).sum(-1) / n
    return loss, {
        "spo/advantage": b.advantages.detach(),
        "spo/clip_fraction": ((removed * mask).sum(-1) / n).detach(),
        "spo/ratio": ((ratio * mask).sum(-1) / n).detach(),
        "spo/ratio_max_dev": _max_dev(ratio, mask),
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
    L = -(1/|a(x)|) sum_t min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps) A) over the tokens the model emitted
    (``token_mask``: environment tokens are masked), rho_t = pi(a_t) / pi_old(a_t) with pi_old's log-probs
    recomputed by the learner before the iteration's first update. ml-loop clips at [1/(1+eps), 1+eps]:
    loss.clip_eps_low = 1 - 1/(1+eps) (the LOOP recipes set it).

    ``loss.importance``: ``trajectory`` is LOOP's per-trajectory ablation, one weight per episode
    w = exp(sum_t log rho_t) (as ml-loop), L = -min(w A, clip(w, 1 - eps_low, 1 + eps) A); ``sequence_mean`` is
    GSPO's length-normalised weight w = exp((1/|a|) sum_t log rho_t) (Zheng et al. 2025, Eq. 7) in the same loss."""
    mask = b.token_mask.float()
    n = mask.sum(-1).clamp(min=1)
    lo, hi = _bounds(cfg)
    importance = getattr(cfg, "importance", "token")
    if importance in ("trajectory", "sequence_mean"):
        log_ratio = ((b.token_logps - b.old_token_logps) * mask).sum(-1)
        if importance == "sequence_mean":
            log_ratio = log_ratio / n
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        loss, removed = _surrogate(ratio, b.advantages, lo, hi)
        return loss, {
            "loop/clip_fraction": removed.detach(),
            "loop/ratio": ratio.detach(),
            "loop/ratio_max_dev": (ratio - 1).abs().detach(),
            "loop/advantage": b.advantages.detach(),
        }
    ratio = _token_ratio(b)
    per_token, removed = _surrogate(ratio, b.advantages[:, None], lo, hi)
    loss = (per_token * mask).sum(-1) / n
    return loss, {
        "loop/clip_fraction": ((removed * mask).sum(-1) / n).detach(),
        "loop/ratio": ((ratio * mask).sum(-1) / n).detach(),
        "loop/ratio_max_dev": _max_dev(ratio, mask),
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
    token mean; 'dapo': the same over the global minibatch (tokens of every process, ``b.tokens_per_process``), so
    the gradient averaged over processes is the token mean of all of them (DAPO, Yu et al. 2025, Eq. 8)."""
    mask = b.token_mask.float()
    n = mask.sum(-1).clamp(min=1)
    ratio = _token_ratio(b)
    per_token, removed = _surrogate(ratio, b.advantages[:, None], *_bounds(cfg))
    per_token = _weighted(per_token, b)
    metrics = {}
    if cfg.kl_coef:
        q = (b.ref_token_logps - b.token_logps) * mask
        kl = torch.exp(q) - q - 1
        per_token = per_token + cfg.kl_coef * kl
        metrics[f"{prefix}/kl"] = ((kl * mask).sum(-1) / n).detach()
    summed = (per_token * mask).sum(-1)
    if cfg.loss_type == "bnpo" or (cfg.loss_type == "dapo" and b.tokens_per_process is None):
        loss = summed * mask.shape[0] / mask.sum().clamp(min=1)
    elif cfg.loss_type == "dapo":
        loss = summed * mask.shape[0] / max(float(b.tokens_per_process), 1.0)
    else:
        loss = summed / n
    metrics.update(
        {
            f"{prefix}/advantage": b.advantages.detach(),
            f"{prefix}/clip_fraction": ((removed * mask).sum(-1) / n).detach(),
            f"{prefix}/ratio": ((ratio * mask).sum(-1) / n).detach(),
            f"{prefix}/ratio_max_dev": _max_dev(ratio, mask),
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
