"""Reward-model objectives: Bradley-Terry and the VPL evidence lower bound.

These take rewards, not log-probs: ``r_w`` / ``r_l`` are the scalar rewards of the preferred / dispreferred
response of each pair, shape [B]. Each function returns the per-example loss [B] and per-example metrics, like
the policy losses in the registry. The reward trainer (``align/trainers/reward.py``) is their only caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REWARD_LOSSES = {
    "bt": "Bradley-Terry: -(1-eps) log sigmoid(r_w - r_l - m) - eps log sigmoid(r_l - r_w + m)",
    "vpl": "VPL ELBO: E_q(z|context)[-log sigmoid(r(y_w,z) - r(y_l,z))] + beta KL(q || N(0, I))",
}
"""Objectives of ``trainer: reward`` (``reward.kind``), listed by ``align recipes --losses``."""


def bradley_terry(
    r_w: torch.Tensor, r_l: torch.Tensor, margin: torch.Tensor | None = None, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, Eq. 1), with the two usual options:

        L = -(1 - eps) log sigmoid(r_w - r_l - m) - eps log sigmoid(r_l - r_w + m)

    ``margin`` m per pair (Llama 2, Touvron et al. 2023, Eq. 2: the preferred answer must win by m; 0 = none) and
    ``label_smoothing`` eps, the probability that a label is flipped (eps = 0 is plain BT).
    Metrics: accuracy (r_w > r_l), the margin r_w - r_l, and P(y_w > y_l) = sigmoid(r_w - r_l)."""
    m = torch.zeros_like(r_w) if margin is None else margin.to(r_w)
    d = r_w - r_l
    loss = -(1 - label_smoothing) * F.logsigmoid(d - m) - label_smoothing * F.logsigmoid(-(d - m))
    d = d.detach()
    return loss, {"accuracy": (d > 0).float(), "margin": d, "p_chosen": torch.sigmoid(d)}


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row: 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar)."""
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(-1)


def vpl_elbo(
    r_w: torch.Tensor,
    r_l: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    kl_beta: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Negative ELBO of VPL (Poddar et al. 2024, "Personalizing RLHF with Variational Preference Learning", Eq. 4):

        L(user) = E_{z ~ q(z | C)} [ -sum_{(y_w, y_l) in Q} log sigmoid(r(x, y_w, z) - r(x, y_l, z)) ]
                  + beta KL(q(z | C) || N(0, I))

    for one user with context pairs C and query pairs Q. Here ``r_w``, ``r_l`` are [U, Q] rewards of U users' Q
    query pairs under one reparameterised sample z = mu + exp(logvar/2) * e (a one-sample Monte-Carlo estimate of
    the expectation), ``mu``/``logvar`` [U, D] the encoder's posterior, ``mask`` [U, Q] marks real query pairs
    (users with fewer pairs are padded). Returns the loss per user [U] and metrics (per-pair means)."""
    m = torch.ones_like(r_w) if mask is None else mask.to(r_w)
    n = m.sum(-1).clamp(min=1)
    nll = -(F.logsigmoid(r_w - r_l) * m).sum(-1)
    kl = gaussian_kl(mu, logvar)
    d = (r_w - r_l).detach()
    return nll + kl_beta * kl, {
        "accuracy": ((d > 0).float() * m).sum(-1) / n,
        "nll": nll.detach() / n,
        "kl": kl.detach(),
        "margin": (d * m).sum(-1) / n,
    }
