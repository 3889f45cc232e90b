"""GRPO and RLOO (single-turn, online) by hand: group advantages, the clipped per-token surrogate, the k3 KL term and
TRL's loss aggregations ('grpo' = per-response token mean, 'bnpo' = token mean over the minibatch).

The batch: two responses, three token slots, the second response two tokens long (its third slot is padding):

                  log pi            log pi_old         log pi_ref        mask     A
    response 0    [-1.0, -2.0, -0.5] [-1.0, -2.2, -0.5] [-1.1, -2.0, -0.4] [1,1,1]  +1.0
    response 1    [-0.7, -1.0,  9.9] [-0.2, -1.0,  9.9] [-0.7, -1.3,  9.9] [1,1,0]  -0.5

so rho_0 = [1, e^0.2, 1] (e^0.2 = 1.2214 > 1 + eps: clipped at 1.2 for A > 0) and rho_1 = [e^-0.5, 1] (0.6065 < 0.8:
clipped at 0.8 for A < 0, and the min picks -0.5 * 0.8 = -0.4 over -0.5 * 0.6065 = -0.3033).
"""

from __future__ import annotations

import math

import pytest
import torch

from align.config import LossConfig
from align.losses import LOSSES, PairBatch
from align.losses.policy import group_advantages


def batch() -> PairBatch:
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.0, 9.9]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    return PairBatch(
        chosen_logps=(lp * mask).sum(-1),
        chosen_lengths=mask.sum(-1),
        token_logps=lp * mask,
        old_token_logps=torch.tensor([[-1.0, -2.2, -0.5], [-0.2, -1.0, 9.9]], dtype=torch.float64) * mask,
        ref_token_logps=torch.tensor([[-1.1, -2.0, -0.4], [-0.7, -1.3, 9.9]], dtype=torch.float64) * mask,
        token_mask=mask,
        advantages=torch.tensor([1.0, -0.5], dtype=torch.float64),
    )


# per-token surrogate terms -min(rho A, clip(rho) A), by hand
SURR_0 = [-1.0, -1.2, -1.0]  # A = 1: rho 1, min(1.2214, 1.2) = 1.2, 1
SURR_1 = [-(-0.5 * 0.8), -(-0.5 * 1.0)]  # A = -0.5: min(-0.3033, -0.4) = -0.4; rho 1: -0.5


def k3(ref: float, pi: float) -> float:
    q = ref - pi
    return math.exp(q) - q - 1


def test_group_advantages_by_hand():
    r = [1.0, 0.0, 0.0, 1.0]
    assert group_advantages("rloo", r) == pytest.approx([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3])
    assert group_advantages("spo", r) == group_advantages("rloo", r)
    std = math.sqrt((4 * 0.25) / 3)  # Bessel-corrected, as torch.std and TRL
    a = 0.5 / (std + 1e-4)
    assert group_advantages("grpo", r) == pytest.approx([a, -a, -a, a])
    assert group_advantages("grpo", r, scale=False) == [0.5, -0.5, -0.5, 0.5]  # Dr. GRPO
    assert group_advantages("grpo", [0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]  # a tie teaches nothing


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_sequence_mean_loss_and_clip_fraction_by_hand(name):
    loss, m = LOSSES[name].fn(batch(), LossConfig(name=name, clip_eps=0.2))
    assert loss.tolist() == pytest.approx([sum(SURR_0) / 3, sum(SURR_1) / 2], abs=1e-12)
    assert m[f"{name}/clip_fraction"].tolist() == pytest.approx([1 / 3, 1 / 2])
    assert m[f"{name}/ratio"].tolist() == pytest.approx([(2 + math.exp(0.2)) / 3, (math.exp(-0.5) + 1) / 2])
    assert f"{name}/kl" not in m


def test_bnpo_takes_the_token_mean_over_the_minibatch():
    loss, _ = LOSSES["grpo"].fn(batch(), LossConfig(name="grpo", loss_type="bnpo"))
    assert loss.mean().item() == pytest.approx((sum(SURR_0) + sum(SURR_1)) / 5, abs=1e-12)  # 5 real tokens


def test_dapo_takes_the_token_mean_over_every_processs_tokens():
    """Two processes, this one with 5 tokens and the other with 11: each divides by the mean count (8), so the
    average of the two processes' mean losses (DDP's gradient average) is the sum over all tokens / 16."""
    b = batch()
    b.tokens_per_process = 8.0
    loss, _ = LOSSES["grpo"].fn(b, LossConfig(name="grpo", loss_type="dapo"))
    assert loss.mean().item() == pytest.approx((sum(SURR_0) + sum(SURR_1)) / 8, abs=1e-12)
    one, _ = LOSSES["grpo"].fn(batch(), LossConfig(name="grpo", loss_type="dapo"))  # one process: bnpo
    bnpo, _ = LOSSES["grpo"].fn(batch(), LossConfig(name="grpo", loss_type="bnpo"))
    assert one.tolist() == bnpo.tolist()


def test_kl_to_the_reference_is_the_k3_estimator_weighted_by_kl_coef():
    loss, m = LOSSES["grpo"].fn(batch(), LossConfig(name="grpo", kl_coef=0.1))
    kl0 = [k3(-1.1, -1.0), k3(-2.0, -2.0), k3(-0.4, -0.5)]
    kl1 = [k3(-0.7, -0.7), k3(-1.3, -1.0)]
    assert m["grpo/kl"].tolist() == pytest.approx([sum(kl0) / 3, sum(kl1) / 2], abs=1e-12)
    expected = [(sum(SURR_0) + 0.1 * sum(kl0)) / 3, (sum(SURR_1) + 0.1 * sum(kl1)) / 2]
    assert loss.tolist() == pytest.approx(expected, abs=1e-12)


def test_rloo_without_kl_is_spos_update_and_gradients_flow_only_through_pi():
    b = batch()
    b.token_logps = b.token_logps.clone().requires_grad_(True)
    rloo, _ = LOSSES["rloo"].fn(b, LossConfig(name="rloo"))
    spo, _ = LOSSES["spo"].fn(b, LossConfig(name="spo"))
    assert torch.equal(rloo, spo)  # SPO is RLOO on win-rate rewards
    rloo.sum().backward()
    g = b.token_logps.grad
    assert g[0, 1] == 0 and g[1, 0] == 0  # clipped tokens carry no gradient
    assert g[0, 0] == pytest.approx(-1.0 / 3) and g[1, 1] == pytest.approx(0.5 / 2)


@pytest.mark.parametrize("name", ["spo", "loop", "grpo", "rloo"])
def test_an_outlier_log_ratio_is_clamped_before_exp(name):
    """log pi - log pi_old = 1000 on one token would overflow exp: it is clamped at 20 (verl), so the loss and its
    gradient stay finite; the clamped token sits far outside the clip range and carries no gradient."""
    b = batch()
    b.token_logps = b.token_logps.clone()
    b.token_logps[0, 0] = 999.0
    b.old_token_logps = b.old_token_logps.clone()
    b.old_token_logps[0, 0] = -1.0
    b.token_logps.requires_grad_(True)
    loss, m = LOSSES[name].fn(b, LossConfig(name=name))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(b.token_logps.grad).all()
    assert m[f"{name}/ratio"][0].item() == pytest.approx((math.exp(20) + math.exp(0.2) + 1) / 3)
