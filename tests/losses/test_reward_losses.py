"""Reward losses, checked against hand-computed values."""

import math

import torch

from align.losses.reward import bradley_terry, gaussian_kl, vpl_elbo


def _nls(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_bradley_terry_plain_margin_and_label_smoothing():
    rw, rl = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    loss, m = bradley_terry(rw, rl)
    assert torch.allclose(loss, torch.tensor([_nls(1.0), _nls(-1.0)]))  # 0.31326, 1.31326
    assert m["accuracy"].tolist() == [1.0, 0.0]
    assert torch.allclose(m["p_chosen"], torch.tensor([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]))
    loss, _ = bradley_terry(rw, rl, margin=torch.tensor([0.5, 0.0]))
    assert abs(loss[0].item() - _nls(0.5)) < 1e-6  # 0.47408
    loss, _ = bradley_terry(rw, rl, label_smoothing=0.1)
    assert abs(loss[0].item() - (0.9 * _nls(1.0) + 0.1 * _nls(-1.0))) < 1e-6  # 0.41326


def test_gaussian_kl_by_hand():
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    # 0.5 * [(1 + 1 - 1 - 0) + (2 + 0 - 1 - ln 2)] = 0.5 * (2 - ln 2)
    assert abs(gaussian_kl(mu, logvar).item() - 0.5 * (2 - math.log(2))) < 1e-6
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max().item() == 0.0


def test_vpl_elbo_sums_query_pairs_masks_padding_and_weights_kl():
    rw = torch.tensor([[1.0, 2.0, 9.0]])
    rl = torch.tensor([[0.0, 0.0, -9.0]])
    mask = torch.tensor([[True, True, False]])
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    loss, m = vpl_elbo(rw, rl, mu, logvar, kl_beta=0.1, mask=mask)
    expect = _nls(1.0) + _nls(2.0) + 0.1 * 0.5 * (2 - math.log(2))
    assert abs(loss.item() - expect) < 1e-6
    assert m["accuracy"].item() == 1.0 and abs(m["nll"].item() - (_nls(1.0) + _nls(2.0)) / 2) < 1e-6
    full, _ = vpl_elbo(rw, rl, mu, logvar, kl_beta=0.0)
    assert abs(full.item() - (_nls(1.0) + _nls(2.0) + _nls(18.0))) < 1e-6


def test_bradley_terry_equals_trl_reward_trainer_loss():
    """Oracle: TRL 1.16's RewardTrainer.compute_loss on the same rewards (with and without margins)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import RewardTrainer

    g = torch.Generator().manual_seed(0)
    rc, rr, mg = torch.randn(16, generator=g), torch.randn(16, generator=g), torch.rand(16, generator=g)
    logits = torch.cat([rc, rr])[:, None]
    ident = lambda x: x  # noqa: E731
    stub = SimpleNamespace(
        model=SimpleNamespace(training=False),
        args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=SimpleNamespace(gather_for_metrics=ident, gather=ident),
        _metrics={"eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    model = lambda **inputs: SimpleNamespace(logits=logits)  # noqa: E731
    for margin in (None, mg):
        inputs = {"attention_mask": torch.ones(32, 4)} | ({} if margin is None else {"margin": margin})
        trl_loss = RewardTrainer.compute_loss(stub, model, inputs)
        ours, m = bradley_terry(rc, rr, margin=margin)
        assert abs(ours.mean().item() - trl_loss.item()) < 1e-6
    assert abs(m["accuracy"].mean().item() - stub._metrics["eval"]["accuracy"][-1]) < 1e-6
