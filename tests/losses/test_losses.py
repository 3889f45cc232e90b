"""Every registered loss against a value computed by hand (math module, paper equation), plus registry checks.

The fixture numbers (two examples, summed log-probs) are chosen so the arithmetic is easy to follow:

                     chosen  rejected | ref chosen  ref rejected | anchor chosen  anchor rejected | |y_w| |y_l|
    example 0        -10.0   -12.0    |   -11.0       -11.5      |    -10.5          -11.0        |   4     5
    example 1         -7.5    -5.0    |    -8.0        -6.5      |     -7.0           -6.0        |   3     2

so the policy/reference log-ratios are  cr = [1.0, 0.5], rr = [-0.5, 1.5]  and the DPO margin is
h = cr - rr = [1.5, -1.0] (one pair ranked right, one ranked wrong).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from align.config import LossConfig
from align.losses import LOSSES, PairBatch, get_loss, register_loss
from tests.conftest import pg_batch

ALL_LOSSES = {
    "dpo",
    "cdpo",
    "robust",
    "ipo",
    "ipo_norm",
    "hinge",
    "simpo",
    "sppo",
    "inpo",
    "sft",
    "spo",
    "loop",
    "grpo",
    "rloo",
}
TOL = 1e-6


def t(*xs, grad: bool = False) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def make_batch(grad: bool = False, **extra) -> PairBatch:
    fields = dict(
        chosen_logps=t(-10.0, -7.5, grad=grad),
        rejected_logps=t(-12.0, -5.0, grad=grad),
        chosen_lengths=t(4.0, 3.0),
        rejected_lengths=t(5.0, 2.0),
        ref_chosen_logps=t(-11.0, -8.0),
        ref_rejected_logps=t(-11.5, -6.5),
        anchor_chosen_logps=t(-10.5, -7.0),
        anchor_rejected_logps=t(-11.0, -6.0),
    )
    fields.update(extra)
    return PairBatch(**fields)


def run(name: str, batch: PairBatch, **cfg) -> torch.Tensor:
    loss, metrics = LOSSES[name].fn(batch, LossConfig(name=name, **cfg))
    assert loss.shape == (2,)
    for key, value in metrics.items():
        assert value.shape == (2,), key
    return loss


def close(actual: torch.Tensor, expected: list[float], tol: float = TOL) -> None:
    got = actual.detach().tolist()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert math.isclose(g, e, rel_tol=0, abs_tol=tol), (got, expected)


def log_sigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)), written out."""
    return -math.log(1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------- registry


def test_registry_holds_exactly_the_documented_losses():
    assert set(LOSSES) == ALL_LOSSES
    for name in ALL_LOSSES:
        assert get_loss(name).name == name


def test_needs_reference_false_exactly_for_simpo_sft_and_the_policy_gradient_losses():
    pg = {"spo", "loop", "grpo", "rloo"}  # (grpo/rloo take a reference pass only when loss.kl_coef > 0)
    assert {name for name, spec in LOSSES.items() if not spec.needs_reference} == {"simpo", "sft"} | pg
    assert {name for name, spec in LOSSES.items() if spec.needs_anchor} == {"inpo"}
    assert {name for name, spec in LOSSES.items() if not spec.needs_rejected} == {"sft"} | pg
    assert {name for name, spec in LOSSES.items() if spec.per_token} == pg


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_docstring_cites_its_equation(name):
    doc = LOSSES[name].fn.__doc__ or ""
    assert "L =" in doc, f"{name}: docstring should state the loss as 'L = ...'"
    if name != "sft":  # SFT is plain maximum likelihood: no paper to cite
        assert re.search(r"(et al\.|[A-Z][a-z]+) \d{4}", doc), f"{name}: docstring should cite a paper (author year)"
        assert re.search(r"\d{4}, .+\((arXiv:\d{4}\.\d{5}|\S+\.pdf)\)$", LOSSES[name].paper), LOSSES[name].paper
    assert LOSSES[name].summary and LOSSES[name].paper  # model cards cite it


def test_double_registration_is_rejected():
    original = LOSSES["dpo"]
    with pytest.raises(ValueError, match="registered twice"):

        @register_loss("dpo", needs_reference=True)
        def other(b, cfg):
            """Not a loss."""
            return b.chosen_logps, {}

    assert LOSSES["dpo"] is original
    assert set(LOSSES) == ALL_LOSSES


def test_unknown_loss_is_a_user_error():
    from align.errors import UserError

    with pytest.raises(UserError, match="not registered"):
        get_loss("nope")


# ------------------------------------------------------------------------------------------- hand-computed values


def test_dpo_by_hand():
    # Rafailov et al. Eq. 7: L = -log sigmoid(beta h); beta = 0.1, h = [1.5, -1.0]
    expected = [-log_sigmoid(0.1 * 1.5), -log_sigmoid(0.1 * -1.0)]
    # the same numbers as log(1 + e^{-beta h})
    assert math.isclose(expected[0], math.log(1 + math.exp(-0.15)), abs_tol=1e-12)
    assert math.isclose(expected[1], math.log(1 + math.exp(0.1)), abs_tol=1e-12)
    close(run("dpo", make_batch(), beta=0.1), expected)


def test_dpo_reward_metrics_by_hand():
    _, m = LOSSES["dpo"].fn(make_batch(), LossConfig(beta=0.1))
    close(m["rewards/chosen"], [0.1 * 1.0, 0.1 * 0.5])
    close(m["rewards/rejected"], [0.1 * -0.5, 0.1 * 1.5])
    close(m["rewards/margin"], [0.1 * 1.5, 0.1 * -1.0])
    close(m["rewards/accuracy"], [1.0, 0.0])


def test_cdpo_by_hand():
    # Mitchell 2023: L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); beta = 0.5, eps = 0.2
    z = [0.5 * 1.5, 0.5 * -1.0]
    expected = [-(1 - 0.2) * log_sigmoid(zi) - 0.2 * log_sigmoid(-zi) for zi in z]
    close(run("cdpo", make_batch(), beta=0.5, label_smoothing=0.2), expected)


def test_robust_by_hand():
    # Chowdhury et al. Eq. 9: L = [(1 - eps)(-log sigmoid(beta h)) - eps(-log sigmoid(-beta h))] / (1 - 2 eps)
    z = [0.5 * 1.5, 0.5 * -1.0]
    expected = [((1 - 0.2) * -log_sigmoid(zi) - 0.2 * -log_sigmoid(-zi)) / (1 - 2 * 0.2) for zi in z]
    close(run("robust", make_batch(), beta=0.5, label_smoothing=0.2), expected)


def test_ipo_by_hand():
    # Azar et al. Eq. 17: L = (h - 1/(2 tau))^2, tau = beta = 0.25 -> target 2
    expected = [(1.5 - 2.0) ** 2, (-1.0 - 2.0) ** 2]  # 0.25, 9
    close(run("ipo", make_batch(), beta=0.25), expected)
    close(torch.tensor([0.25, 9.0]), expected)


def test_ipo_norm_by_hand():
    # per-token averages: cr/|y_w| - rr/|y_l| = [1/4 - (-0.5)/5, 0.5/3 - 1.5/2] = [0.35, -7/12]
    d0 = 1.0 / 4 - (-0.5) / 5
    d1 = 0.5 / 3 - 1.5 / 2
    assert math.isclose(d0, 0.35) and math.isclose(d1, -7 / 12)
    expected = [(d0 - 1 / (2 * 0.25)) ** 2, (d1 - 1 / (2 * 0.25)) ** 2]
    close(run("ipo_norm", make_batch(), beta=0.25), expected)


def test_hinge_by_hand():
    # L = max(0, 1 - beta h); beta = 1: [max(0, 1 - 1.5), max(0, 1 + 1)] = [0, 2] (both branches of the hinge)
    close(run("hinge", make_batch(), beta=1.0), [0.0, 2.0])
    # beta = 0.5: [1 - 0.75, 1 + 0.5]
    close(run("hinge", make_batch(), beta=0.5), [0.25, 1.5])


def test_simpo_by_hand():
    # Meng et al. Eq. 6: L = -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma); beta 2, gamma 0.5
    m0 = 2.0 / 4 * -10.0 - 2.0 / 5 * -12.0 - 0.5  # -5 + 4.8 - 0.5 = -0.7
    m1 = 2.0 / 3 * -7.5 - 2.0 / 2 * -5.0 - 0.5  # -5 + 5 - 0.5 = -0.5
    assert math.isclose(m0, -0.7) and math.isclose(m1, -0.5)
    expected = [-log_sigmoid(m0), -log_sigmoid(m1)]
    # reference-free: the reference log-probs must not matter
    no_ref = make_batch(
        ref_chosen_logps=None, ref_rejected_logps=None, anchor_chosen_logps=None, anchor_rejected_logps=None
    )
    close(run("simpo", no_ref, beta=2.0, simpo_gamma=0.5), expected)
    close(run("simpo", make_batch(), beta=2.0, simpo_gamma=0.5), expected)


def test_sppo_hard_labels_by_hand_offline():
    # Wu et al. Eq. 4.7 with P(y_w) = 1, P(y_l) = 0, eta = 1/beta = 2, pi_t = the reference (no anchor given):
    # L = (cr - eta (1 - 1/2))^2 + (rr - eta (0 - 1/2))^2 = (cr - 1)^2 + (rr + 1)^2
    expected = [(1.0 - 1.0) ** 2 + (-0.5 + 1.0) ** 2, (0.5 - 1.0) ** 2 + (1.5 + 1.0) ** 2]  # 0.25, 6.5
    batch = make_batch(anchor_chosen_logps=None, anchor_rejected_logps=None)
    close(run("sppo", batch, beta=0.5), expected)


def test_sppo_hard_labels_by_hand_against_anchor():
    # With an anchor pi_t the log-ratios are against it: [-10 + 10.5, -7.5 + 7] = [0.5, -0.5] and
    # [-12 + 11, -5 + 6] = [-1, 1]
    expected = [(0.5 - 1.0) ** 2 + (-1.0 + 1.0) ** 2, (-0.5 - 1.0) ** 2 + (1.0 + 1.0) ** 2]  # 0.25, 6.25
    close(run("sppo", make_batch(), beta=0.5), expected)


def test_sppo_soft_labels_by_hand():
    # P(y_w > pi_t) = [0.7, 0.9], P(y_l > pi_t) = [0.4, 0.2], eta = 1/beta = 2, log-ratios against the anchor
    eta = 1 / 0.5
    expected = [
        (0.5 - eta * (0.7 - 0.5)) ** 2 + (-1.0 - eta * (0.4 - 0.5)) ** 2,  # (0.1)^2 + (-0.8)^2 = 0.65
        (-0.5 - eta * (0.9 - 0.5)) ** 2 + (1.0 - eta * (0.2 - 0.5)) ** 2,  # (-1.3)^2 + (1.6)^2 = 4.25
    ]
    assert math.isclose(expected[0], 0.65) and math.isclose(expected[1], 4.25)
    batch = make_batch(chosen_win_prob=t(0.7, 0.9), rejected_win_prob=t(0.4, 0.2))
    close(run("sppo", batch, beta=0.5), expected)


def test_sppo_soft_labels_one_and_zero_equal_hard_labels():
    soft = make_batch(chosen_win_prob=t(1.0, 1.0), rejected_win_prob=t(0.0, 0.0))
    close(run("sppo", soft, beta=0.5), run("sppo", make_batch(), beta=0.5).tolist())


def test_inpo_by_hand():
    # Zhang et al. Eq. 9: h = log pi(y)/pi(y') - (tau/eta) log ref(y)/ref(y') - ((eta - tau)/eta) log pi_t(y)/pi_t(y'),
    # L = (h - 1/(2 eta))^2 with eta = 0.5, tau = 0.125 (tau/eta = 1/4, (eta - tau)/eta = 3/4).
    # example 0: policy -10 + 12 = 2, ref -11 + 11.5 = 0.5, anchor -10.5 + 11 = 0.5
    h0 = 2.0 - 0.25 * 0.5 - 0.75 * 0.5  # 1.5
    # example 1: policy -7.5 + 5 = -2.5, ref -8 + 6.5 = -1.5, anchor -7 + 6 = -1
    h1 = -2.5 - 0.25 * -1.5 - 0.75 * -1.0  # -1.375
    assert math.isclose(h0, 1.5) and math.isclose(h1, -1.375)
    expected = [(h0 - 1 / (2 * 0.5)) ** 2, (h1 - 1 / (2 * 0.5)) ** 2]  # 0.25, 5.640625
    loss, metrics = LOSSES["inpo"].fn(make_batch(), LossConfig(name="inpo", eta=0.5, tau=0.125))
    close(loss, expected)
    close(metrics["inpo/h"], [h0, h1])


def test_sft_by_hand():
    # L = -log pi(y|x) / |y|: [10 / 4, 7.5 / 3]; the rejected side is not needed
    batch = PairBatch(chosen_logps=t(-10.0, -7.5), chosen_lengths=t(4.0, 3.0))
    close(run("sft", batch), [2.5, 2.5])
    batch = PairBatch(chosen_logps=t(-3.0, -0.0), chosen_lengths=t(2.0, 1.0))
    close(run("sft", batch), [1.5, 0.0])


# ----------------------------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_zero_label_noise_is_dpo(name):
    batch = make_batch()
    close(run(name, batch, beta=0.3, label_smoothing=0.0), run("dpo", batch, beta=0.3).tolist(), tol=1e-12)


def test_inpo_with_tau_equal_eta_is_online_ipo_against_the_reference():
    # With tau = eta the anchor's weight (eta - tau)/eta is 0 and h is the DPO margin against the reference, so INPO is
    # IPO (tau_IPO = eta) on pairs sampled online: the anchor log-probs must not matter.
    eta = 0.2
    batch = make_batch()
    inpo = run("inpo", batch, eta=eta, tau=eta)
    close(inpo, run("ipo", batch, beta=eta).tolist(), tol=1e-12)
    moved = make_batch(anchor_chosen_logps=t(-3.0, -1.0), anchor_rejected_logps=t(-20.0, -2.0))
    close(run("inpo", moved, eta=eta, tau=eta), inpo.tolist(), tol=1e-12)


def test_inpo_with_tau_zero_is_ipo_against_the_anchor():
    # tau = 0: no pull towards the reference; the anchor pi_t plays the reference's role.
    eta = 0.2
    batch = make_batch()
    anchored = make_batch(ref_chosen_logps=batch.anchor_chosen_logps, ref_rejected_logps=batch.anchor_rejected_logps)
    close(run("inpo", batch, eta=eta, tau=0.0), run("ipo", anchored, beta=eta).tolist(), tol=1e-12)


def test_sppo_hard_labels_equal_trl_sppo_hard():
    # TRL 1.16 DPOTrainer, loss_type "sppo_hard":
    #   (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    beta = 0.3
    batch = make_batch(anchor_chosen_logps=None, anchor_rejected_logps=None)
    chosen_logratios = batch.chosen_logps - batch.ref_chosen_logps
    rejected_logratios = batch.rejected_logps - batch.ref_rejected_logps
    trl = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    close(run("sppo", batch, beta=beta), trl.tolist(), tol=1e-12)


# ---------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "name", sorted(ALL_LOSSES - {"spo", "loop", "grpo", "rloo"})
)  # per-token losses: their own tests (loop: tests/trainers/test_agent.py; grpo, rloo: test_group_policy_losses.py)
def test_gradients_flow(name):
    if name == "sft":
        batch = PairBatch(chosen_logps=t(-10.0, -7.5, grad=True), chosen_lengths=t(4.0, 3.0))
    else:
        batch = make_batch(grad=True)
    cfg = LossConfig(name=name, beta=0.5, label_smoothing=0.1, eta=0.5, tau=0.125)
    loss, _ = LOSSES[name].fn(batch, cfg)
    loss.mean().backward()
    leaves = [batch.chosen_logps] + ([] if name == "sft" else [batch.rejected_logps])
    for leaf in leaves:
        assert leaf.grad is not None
        assert torch.isfinite(leaf.grad).all()
        assert leaf.grad.abs().sum() > 0
    if name not in ("sft", "sppo"):
        # on the mis-ranked pair (example 1) raising log pi(y_w) lowers every pairwise loss
        assert batch.chosen_logps.grad[1] < 0


def test_dpo_gradient_by_hand():
    # d/d log pi(y_w) of -log sigmoid(beta h) = -beta (1 - sigmoid(beta h)) = -beta sigmoid(-beta h); mean over 2
    batch = make_batch(grad=True)
    LOSSES["dpo"].fn(batch, LossConfig(beta=0.1))[0].mean().backward()
    expected = [-0.1 / (1 + math.exp(0.1 * h)) / 2 for h in (1.5, -1.0)]
    close(batch.chosen_logps.grad, expected)
    close(batch.rejected_logps.grad, [-e for e in expected])


# ------------------------------------------------------------------------------------------------------ SPO


def test_spo_clipped_policy_gradient_by_hand():
    """Two samples, three token slots (the last one masked on row 1). eps = 0.2.
    Row 0, A = +0.5: ratios e^0.1 = 1.10517 (kept), e^0.5 = 1.64872 (clipped to 1.2), e^-0.3 = 0.74082;
      min(rho A, clip(rho) A) = 0.552585, 0.6 (clipped is smaller), 0.370409 -> L = -(0.552585 + 0.6 + 0.370409)/3.
    Row 1, A = -1.0: ratios e^-0.4 = 0.67032 (clipped to 0.8), e^0.0 = 1; masked third token.
      min(-0.67032, -0.8) = -0.8, min(-1, -1) = -1 -> L = -(-0.8 - 1)/2 = 0.9."""
    new = torch.tensor([[-1.0, -2.0, -0.5], [-0.6, -1.2, 0.0]])
    old = torch.tensor([[-1.1, -2.5, -0.2], [-0.2, -1.2, 0.0]])
    b = pg_batch(new, old, torch.tensor([[1, 1, 1], [1, 1, 0]]), [0.5, -1.0])
    cfg = LossConfig(name="spo", clip_eps=0.2)
    loss, metrics = LOSSES["spo"].fn(b, cfg)
    r0 = [math.exp(0.1), math.exp(0.5), math.exp(-0.3)]
    row0 = -(min(r0[0] * 0.5, r0[0] * 0.5) + min(r0[1] * 0.5, 1.2 * 0.5) + min(r0[2] * 0.5, 0.8 * 0.5)) / 3
    row1 = -(min(math.exp(-0.4) * -1.0, 0.8 * -1.0) + min(1.0 * -1.0, 1.0 * -1.0)) / 2
    close(loss, [row0, row1])
    # clip fraction = tokens whose clipping removes the gradient: row 0 only e^0.5 (A > 0, above 1.2; e^-0.3 is below
    # 0.8 but with A > 0 the min keeps rho A, whose gradient flows); row 1 e^-0.4 (A < 0, below 0.8)
    close(metrics["spo/clip_fraction"], [1 / 3, 1 / 2])


def test_spo_on_policy_is_reinforce_with_the_baseline():
    """rho = 1 everywhere: L = -A (per-token mean of A), and the gradient is -A * d log pi / |y|."""
    lp = torch.tensor([[-0.7, -1.3]], requires_grad=True)
    b = PairBatch(
        chosen_logps=lp.sum(-1),
        chosen_lengths=torch.tensor([2.0]),
        token_logps=lp,
        old_token_logps=lp.detach(),
        token_mask=torch.ones(1, 2),
        advantages=torch.tensor([0.25]),
    )
    loss, _ = LOSSES["spo"].fn(b, LossConfig(name="spo"))
    close(loss, [-0.25])
    loss.sum().backward()
    close(lp.grad[0], [-0.125, -0.125])


def test_chosen_nll_is_a_token_mean_over_the_batch():
    # the loss.sft_weight (RPO) term: -sum log pi(y_w) / sum |y_w| over the batch, as TRL's rpo_alpha and RLHFlow's
    # dpo.py; chosen log-probs -2 (1 token) and -3 (3 tokens): 5 / 4 = 1.25, not the per-example mean (2 + 1) / 2
    from align.losses import chosen_nll

    b = PairBatch(chosen_logps=torch.tensor([-2.0, -3.0]), chosen_lengths=torch.tensor([1.0, 3.0]))
    assert float(chosen_nll(b)) == 1.25
