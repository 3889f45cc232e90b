"""Pairwise preference objectives: DPO, cDPO, robust DPO, IPO, hinge, SimPO, SPPO, INPO, and SFT.

Notation: for a prompt x with preferred response y_w and dispreferred y_l,
    h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]
All log-probs are sums over response tokens. Each function returns the per-example loss [B] and metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.losses.registry import PairBatch, register_loss


def _ratios(b: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return b.chosen_logps - b.ref_chosen_logps, b.rejected_logps - b.ref_rejected_logps


def _reward_metrics(chosen_r: torch.Tensor, rejected_r: torch.Tensor) -> dict[str, torch.Tensor]:
    """Implicit rewards (beta * log-ratio for DPO-style losses) and how often the chosen one is higher."""
    chosen_r, rejected_r = chosen_r.detach(), rejected_r.detach()
    return {
        "rewards/chosen": chosen_r,
        "rewards/rejected": rejected_r,
        "rewards/margin": chosen_r - rejected_r,
        "rewards/accuracy": (chosen_r > rejected_r).float(),
    }


@register_loss(
    "dpo",
    needs_reference=True,
    summary="DPO (sigmoid): -log sigmoid(beta h)",
    paper="Rafailov et al. 2023, Direct Preference Optimization (arXiv:2305.18290)",
)
def dpo(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """DPO, Rafailov et al. 2023, Eq. 7: L = -log sigmoid(beta * h)."""
    cr, rr = _ratios(b)
    loss = -F.logsigmoid(cfg.beta * (cr - rr))
    return loss, _reward_metrics(cfg.beta * cr, cfg.beta * rr)


@register_loss(
    "cdpo",
    needs_reference=True,
    summary="conservative DPO: labels flipped with probability eps",
    paper="Mitchell 2023, A note on DPO with noisy preferences and relationship to IPO (ericmitchell.ai/cdpo.pdf)",
)
def cdpo(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """cDPO, Mitchell 2023 ("A note on DPO with noisy preferences"): the DPO loss against a label that is wrong
    with probability eps: L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    cr, rr = _ratios(b)
    z = cfg.beta * (cr - rr)
    eps = cfg.label_smoothing
    loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return loss, _reward_metrics(cfg.beta * cr, cfg.beta * rr)


@register_loss(
    "robust",
    needs_reference=True,
    summary="robust DPO: unbiased loss under label noise eps",
    paper="Chowdhury et al. 2024, Provably Robust DPO (arXiv:2403.00409)",
)
def robust(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """Robust DPO, Chowdhury et al. 2024, Eq. 9: the unbiased estimator of the clean loss under flip rate eps,
    L = [(1 - eps) (-log sigmoid(beta h)) - eps (-log sigmoid(-beta h))] / (1 - 2 eps)."""
    cr, rr = _ratios(b)
    z = cfg.beta * (cr - rr)
    eps = cfg.label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return loss, _reward_metrics(cfg.beta * cr, cfg.beta * rr)


@register_loss(
    "ipo",
    needs_reference=True,
    summary="IPO: (h - 1/(2 tau))^2, tau = beta",
    paper=(
        "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences "
        "(arXiv:2310.12036)"
    ),
)
def ipo(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """IPO, Azar et al. 2023, Eq. 17: L = (h - 1/(2 tau))^2 with tau = loss.beta and h on summed log-probs."""
    cr, rr = _ratios(b)
    loss = (cr - rr - 1 / (2 * cfg.beta)) ** 2
    return loss, _reward_metrics(cfg.beta * cr, cfg.beta * rr)


@register_loss(
    "ipo_norm",
    needs_reference=True,
    summary="IPO on per-token average log-ratios (TRL's form)",
    paper=(
        "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences "
        "(arXiv:2310.12036)"
    ),
)
def ipo_norm(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """IPO, Azar et al. 2023, Eq. 17, with each log-ratio divided by its response length (the form TRL uses,
    confirmed by the IPO authors): L = (cr/|y_w| - rr/|y_l| - 1/(2 tau))^2."""
    cr, rr = _ratios(b)
    cr_avg, rr_avg = cr / b.chosen_lengths.clamp(min=1), rr / b.rejected_lengths.clamp(min=1)
    loss = (cr_avg - rr_avg - 1 / (2 * cfg.beta)) ** 2
    return loss, _reward_metrics(cfg.beta * cr, cfg.beta * rr)


@register_loss(
    "hinge",
    needs_reference=True,
    summary="SLiC-style hinge: max(0, 1 - beta h)",
    paper="Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback (arXiv:2305.10425)",
)
def hinge(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """Hinge loss on the DPO margin (SLiC-HF, Zhao et al. 2023; RSO, Liu et al. 2023): L = max(0, 1 - beta h)."""
    cr, rr = _ratios(b)
    loss = torch.relu(1 - cfg.beta * (cr - rr))
    return loss, _reward_metrics(cfg.beta * cr, cfg.beta * rr)


@register_loss(
    "simpo",
    needs_reference=False,
    summary="SimPO: length-normalised, reference-free, margin gamma",
    paper="Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward (arXiv:2405.14734)",
)
def simpo(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """SimPO, Meng et al. 2024, Eq. 6:
    L = -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)."""
    cr = cfg.beta * b.chosen_logps / b.chosen_lengths.clamp(min=1)
    rr = cfg.beta * b.rejected_logps / b.rejected_lengths.clamp(min=1)
    loss = -F.logsigmoid(cr - rr - cfg.simpo_gamma)
    return loss, _reward_metrics(cr, rr)


@register_loss(
    "sppo",
    needs_reference=True,
    summary="SPPO regression: (log pi/pi_t (y) - (P(y > pi_t) - 1/2)/beta)^2 on both responses",
    paper="Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment (arXiv:2405.00675)",
)
def sppo(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """SPPO, Wu et al. 2024, Eq. 4.7 (Algorithm 1):
    L = (log pi/pi_t(y_w) - eta (P(y_w > pi_t) - 1/2))^2 + (log pi/pi_t(y_l) - eta (P(y_l > pi_t) - 1/2))^2
    with eta = 1/beta (paper: eta 1e3 -> beta 1e-3). pi_t is the anchor when given, else the reference
    (offline). Hard labels (P = 1 for y_w, 0 for y_l) give TRL's ``sppo_hard``; soft ones come from a judge."""
    anchor_c = b.anchor_chosen_logps if b.anchor_chosen_logps is not None else b.ref_chosen_logps
    anchor_r = b.anchor_rejected_logps if b.anchor_rejected_logps is not None else b.ref_rejected_logps
    cr, rr = b.chosen_logps - anchor_c, b.rejected_logps - anchor_r
    p_w = b.chosen_win_prob if b.chosen_win_prob is not None else torch.ones_like(cr)
    p_l = b.rejected_win_prob if b.rejected_win_prob is not None else torch.zeros_like(rr)
    eta = 1.0 / cfg.beta
    loss = (cr - eta * (p_w - 0.5)) ** 2 + (rr - eta * (p_l - 0.5)) ** 2
    return loss, _reward_metrics(cfg.beta * cr, cfg.beta * rr)


@register_loss(
    "inpo",
    needs_reference=True,
    needs_anchor=True,
    summary="INPO: (h_t - 1/(2 eta))^2 against pi_ref and pi_t",
    paper="Zhang et al. 2024, Iterative Nash Policy Optimization (arXiv:2407.00617)",
)
def inpo(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """INPO, Zhang et al. 2024, Eq. 9 / Algorithm 1:
    h_t = log(pi(y)/pi(y')) - (tau/eta) log(ref(y)/ref(y')) - ((eta - tau)/eta) log(pi_t(y)/pi_t(y')),
    L = (h_t - 1/(2 eta))^2. With tau = eta it is online IPO. Paper: eta 0.005, tau = eta/3."""
    eta, tau = cfg.eta, cfg.tau
    policy = b.chosen_logps - b.rejected_logps
    ref = b.ref_chosen_logps - b.ref_rejected_logps
    anchor = b.anchor_chosen_logps - b.anchor_rejected_logps
    h = policy - (tau / eta) * ref - ((eta - tau) / eta) * anchor
    loss = (h - 1 / (2 * eta)) ** 2
    metrics = _reward_metrics(
        eta * (b.chosen_logps - b.anchor_chosen_logps), eta * (b.rejected_logps - b.anchor_rejected_logps)
    )
    metrics["inpo/h"] = h.detach()
    return loss, metrics


@register_loss(
    "sft",
    needs_reference=False,
    needs_rejected=False,
    summary="supervised fine-tuning: mean NLL of the response tokens",
    paper="supervised fine-tuning (maximum likelihood)",
)
def sft(b: PairBatch, cfg) -> tuple[torch.Tensor, dict]:
    """Supervised fine-tuning: per-token negative log-likelihood of the response, L = -log pi(y|x) / |y|.
    (The trainer weights examples by their token counts so the batch loss is the token mean.)"""
    nll = -b.chosen_logps / b.chosen_lengths.clamp(min=1)
    return nll, {"nll": nll.detach()}
