"""Our losses against the formulas as the reference implementations and papers write them, on hand-built batches
whose numbers are worked out in the comments:

- LOOP (apple/ml-loop's PPO form): per token max(-A rho, -A clip(rho, 1/(1+eps), 1+eps)), masked mean over the
  model's tokens; the trajectory ablation with one weight w = exp(sum_t log rho_t) per episode;
- SPPO (Wu et al. 2024, Eq. 4.7): (log pi/pi_t(y) - eta (P(y > pi_t) - 1/2))^2 on both responses, eta = 1/beta;
- INPO (Zhang et al. 2024, Eq. 9): h = log pi(y)/pi(y') - (tau/eta) log ref(y)/ref(y') - ((eta-tau)/eta) log
  pi_t(y)/pi_t(y'), L = (h - 1/(2 eta))^2;
- SPO's leave-one-out advantage (Ahmadian et al. 2024, Eq. 7) and the clip fraction (only the side the advantage's
  sign makes binding)."""

from __future__ import annotations

import math

import pytest
import torch

from align.config import LossConfig
from align.losses import LOSSES
from align.losses.policy import group_advantages
from align.losses.registry import PairBatch
from tests.conftest import pg_batch

EPS = 0.2
LOW = 1 - 1 / (1 + EPS)  # ml-loop's lower bound 1/(1+eps) as loss.clip_eps_low


def _ml_loop_token_loss(log_ratios, mask, adv, eps=EPS):
    """ml-loop's form, written out on floats: pg1 = -A rho, pg2 = -A clip(rho, 1/(1+eps), 1+eps), max, masked mean."""
    terms = []
    for lr, m in zip(log_ratios, mask):
        if m:
            rho = math.exp(lr)
            terms.append(max(-adv * rho, -adv * min(max(rho, 1 / (1 + eps)), 1 + eps)))
    return sum(terms) / len(terms)


def _loop_batch():
    # episode 0: model tokens with log-ratios 0.1, -0.3, 0.0 around one environment token (masked, log-ratio 5.0);
    # episode 1: log-ratios 0.4, -0.5, then padding. A = +0.5 and -1.0.
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.6, -1.0, 0.0, 0.0]])
    new = old + torch.tensor([[0.1, 5.0, -0.3, 0.0], [0.4, -0.5, 0.0, 0.0]])
    return pg_batch(new, old, torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]]), [0.5, -1.0])


def test_loop_token_form_equals_ml_loop_and_the_hand_numbers():
    loss, m = LOSSES["loop"].fn(_loop_batch(), LossConfig(name="loop", clip_eps=EPS, clip_eps_low=LOW))
    # ep 0 (A > 0): rho = 1.10517, 0.74082 (below 1/1.2, but A > 0 so the min keeps rho A), 1 -> -(0.55259 + 0.37041
    # + 0.5) / 3 = -0.47433. ep 1 (A < 0): rho = 1.49182 (above 1.2: not binding for A < 0), 0.60653 -> clipped to
    # 0.83333 -> (1.49182 + 0.83333) / 2 = 1.16258
    hand = [-(0.5 * math.exp(0.1) + 0.5 * math.exp(-0.3) + 0.5) / 3, (math.exp(0.4) + 1 / 1.2) / 2]
    ref = [_ml_loop_token_loss([0.1, 5.0, -0.3, 0.0], [1, 0, 1, 1], 0.5), _ml_loop_token_loss([0.4, -0.5], [1, 1], -1)]
    assert loss.tolist() == pytest.approx(hand, abs=1e-6) and loss.tolist() == pytest.approx(ref, abs=1e-6)
    assert hand == pytest.approx([-0.474332, 1.162579], abs=1e-6)
    # the clip fraction counts only the binding side: ep 0 none of 3 (0.74 is below the bound but A > 0), ep 1 one
    # of 2 (0.61 below the bound with A < 0; 1.49 above it does not bind for A < 0)
    assert m["loop/clip_fraction"].tolist() == pytest.approx([0.0, 0.5])


def test_loop_trajectory_ablation_is_one_weight_exp_of_the_summed_log_ratio():
    cfg = LossConfig(name="loop", clip_eps=EPS, clip_eps_low=LOW, importance="trajectory")
    loss, m = LOSSES["loop"].fn(_loop_batch(), cfg)
    # ep 0: w = exp(0.1 - 0.3 + 0.0) = 0.81873 (inside [0.8333, 1.2]? no: below; A > 0 so min(wA, clip(w)A) = wA)
    # -> -0.40937; ep 1: w = exp(0.4 - 0.5) = 0.90484, inside the range -> 0.90484. The environment token's 5.0
    # never enters (masked).
    w0, w1 = math.exp(-0.2), math.exp(-0.1)
    assert loss.tolist() == pytest.approx([-0.5 * w0, w1], abs=1e-6)
    assert m["loop/ratio"].tolist() == pytest.approx([w0, w1], abs=1e-6)
    gspo, _ = LOSSES["loop"].fn(_loop_batch(), LossConfig(name="loop", clip_eps=EPS, importance="sequence_mean"))
    # GSPO's length-normalised weight: ep 0 exp(-0.2 / 3) = 0.93551, ep 1 exp(-0.1 / 2) = 0.95123
    assert gspo.tolist() == pytest.approx([-0.5 * math.exp(-0.2 / 3), math.exp(-0.05)], abs=1e-6)


def test_sppo_is_eq_4_7_with_eta_one_over_beta():
    # beta 0.5 -> eta 2; log pi/pi_t: y_w -1.0 - (-1.2) = 0.2, y_l -2.0 - (-1.5) = -0.5; P_w 0.8, P_l 0.3
    # targets eta (P - 1/2): 0.6 and -0.4 -> (0.2 - 0.6)^2 + (-0.5 + 0.4)^2 = 0.16 + 0.01 = 0.17
    b = PairBatch(
        chosen_logps=torch.tensor([-1.0]),
        chosen_lengths=torch.tensor([1.0]),
        rejected_logps=torch.tensor([-2.0]),
        rejected_lengths=torch.tensor([1.0]),
        anchor_chosen_logps=torch.tensor([-1.2]),
        anchor_rejected_logps=torch.tensor([-1.5]),
        chosen_win_prob=torch.tensor([0.8]),
        rejected_win_prob=torch.tensor([0.3]),
    )
    loss, _ = LOSSES["sppo"].fn(b, LossConfig(name="sppo", beta=0.5))
    assert loss.item() == pytest.approx(0.17, abs=1e-6)
    b.chosen_win_prob = b.rejected_win_prob = None  # hard labels: targets +-eta/2 = +-1 -> 0.64 + 0.25
    assert LOSSES["sppo"].fn(b, LossConfig(name="sppo", beta=0.5))[0].item() == pytest.approx(0.89, abs=1e-6)


def test_inpo_margin_is_eq_9():
    # eta 0.5, tau 0.25: policy margin -1.0 - (-2.0) = 1.0, reference -1.5 - (-1.7) = 0.2, pi_t -1.2 - (-1.8) = 0.6
    # h = 1.0 - 0.5 * 0.2 - 0.5 * 0.6 = 0.6; L = (0.6 - 1/(2 * 0.5))^2 = 0.16
    b = PairBatch(
        chosen_logps=torch.tensor([-1.0]),
        chosen_lengths=torch.tensor([1.0]),
        rejected_logps=torch.tensor([-2.0]),
        rejected_lengths=torch.tensor([1.0]),
        ref_chosen_logps=torch.tensor([-1.5]),
        ref_rejected_logps=torch.tensor([-1.7]),
        anchor_chosen_logps=torch.tensor([-1.2]),
        anchor_rejected_logps=torch.tensor([-1.8]),
    )
    loss, m = LOSSES["inpo"].fn(b, LossConfig(name="inpo", eta=0.5, tau=0.25))
    assert m["inpo/h"].item() == pytest.approx(0.6, abs=1e-6) and loss.item() == pytest.approx(0.16, abs=1e-6)


def test_spo_leave_one_out_advantage_and_its_one_step_update():
    # win rates 0.75, 0.5, 0.25, 0.5: A_i = r_i - mean of the others -> 0.75 - 0.41667 = 0.33333, 0.5 - 0.5 = 0,
    # 0.25 - 0.58333 = -0.33333, 0
    adv = group_advantages("spo", [0.75, 0.5, 0.25, 0.5])
    assert adv == pytest.approx([1 / 3, 0.0, -1 / 3, 0.0])
    # on-policy (rho = 1) the loss is -A per token: the REINFORCE step with the leave-one-out baseline
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    b = pg_batch(lp, lp.clone(), torch.ones(2, 2, dtype=torch.long), [adv[0], adv[2]])
    loss, m = LOSSES["spo"].fn(b, LossConfig(name="spo", clip_eps=0.2))
    assert loss.tolist() == pytest.approx([-1 / 3, 1 / 3]) and m["spo/clip_fraction"].tolist() == [0.0, 0.0]
