"""Our losses against TRL's DPOTrainer (the oracle) on TRL's own batch, with the same policy and reference models.

For each TRL ``loss_type`` we build a DPOTrainer, take one batch from its train dataloader, let TRL compute the loss
(``_compute_loss``, with its fused LM head), then compute the same batch with ``sequence_logps`` and our registry loss.
TRL's batch is laid out like ours: [chosen rows; rejected rows], right padded, ``completion_mask`` aligned with
``input_ids`` (1 on completion tokens), labels = input_ids shifted by one inside the model.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from align.config import LossConfig
from align.logprobs import sequence_logps
from align.losses import LOSSES, PairBatch
from align.models import build_tiny_model, char_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TOL = 1e-5
BETA = 0.1

ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "five"},
    {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome, I think."},
    {"prompt": "Say hi", "chosen": " hi!", "rejected": " no"},
    {"prompt": "Color of the sky:", "chosen": " blue", "rejected": " green and purple"},
    {"prompt": "3*3=", "chosen": "9", "rejected": "6"},
    {"prompt": "Opposite of hot:", "chosen": " cold", "rejected": " warm-ish"},
    {"prompt": "Spell cat", "chosen": " c-a-t", "rejected": " k-a-t"},
    {"prompt": "Largest planet?", "chosen": " Jupiter", "rejected": " Mars"},
]

# TRL loss_type -> (our loss name, extra DPOConfig/LossConfig settings)
CASES = {
    "sigmoid": ("dpo", {}),
    "hinge": ("hinge", {}),
    "ipo": ("ipo_norm", {}),
    "robust": ("robust", {"label_smoothing": 0.1}),
    "sppo_hard": ("sppo", {}),
    "sft": ("sft", {}),
}


def _models():
    tok = char_tokenizer()
    kw = dict(tokenizer=tok, hidden_size=64, layers=2, heads=2, intermediate_size=128)
    # policy and reference differ (different seeds) so the log-ratios, and hence the losses, are not trivial
    policy = build_tiny_model("llama", seed=1, **kw)
    ref = build_tiny_model("llama", seed=0, **kw)
    return tok, policy, ref


@pytest.fixture(scope="module", params=sorted(CASES))
def oracle(request, tmp_path_factory):
    """(TRL loss type, our loss name, extra settings, trainer, batch, TRL loss, TRL metrics) for one loss type."""
    from trl import DPOConfig, DPOTrainer

    trl_type = request.param
    ours, extra = CASES[trl_type]
    tok, policy, ref = _models()
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp(f"trl_{trl_type}")),
        per_device_train_batch_size=4,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        loss_type=[trl_type],
        beta=BETA,
        max_length=64,
        seed=0,
        label_smoothing=extra.get("label_smoothing", 0.0),
        dataloader_num_workers=0,
        save_strategy="no",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tok
        )
    batch = next(iter(trainer.get_train_dataloader()))
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    our_loss, our_metrics, pair = _our_side(trainer, batch, ours, extra)
    return dict(
        trl_type=trl_type,
        ours=ours,
        extra=extra,
        batch=batch,
        trl_loss=trl_loss.detach(),
        trl_metrics=metrics,
        loss=our_loss,
        metrics=our_metrics,
        pair=pair,
    )


def _our_side(trainer, batch, ours, extra):
    """Our per-example loss and metrics, and the policy log-probs, on TRL's batch tensors."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    with torch.no_grad():
        logps, lengths = sequence_logps(trainer.model, inputs)
        ref_logps, _ = sequence_logps(trainer.ref_model, inputs)
    b = logps.shape[0] // 2
    pair = PairBatch(
        chosen_logps=logps[:b],
        rejected_logps=logps[b:],
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
        ref_chosen_logps=ref_logps[:b],
        ref_rejected_logps=ref_logps[b:],
    )
    loss, metrics = LOSSES[ours].fn(pair, LossConfig(name=ours, beta=BETA, **extra))
    return loss, metrics, pair


def _reduce(name: str, loss: torch.Tensor, pair: PairBatch) -> float:
    """Our batch loss as our trainers reduce it: the mean over pairs; for SFT the token mean (examples weighted by
    their response lengths), which is what TRL's ``sft`` loss type computes."""
    if name == "sft":
        return ((loss * pair.chosen_lengths).sum() / pair.chosen_lengths.sum()).item()
    return loss.mean().item()


def test_trl_batch_has_our_layout(oracle):
    batch = oracle["batch"]
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    assert ids.shape[0] == 8 and ids.shape == att.shape == comp.shape
    assert (comp <= att).all(), "completion tokens are real tokens"
    assert (comp[:, 0] == 0).all(), "every row starts with a prompt token (BOS), so |y| = completion_mask.sum()"
    assert (att[:, 1:] <= att[:, :-1]).all(), "right padding: the attention mask is 1...1 0...0"
    for i in range(4):  # chosen row i and rejected row i + 4 share their prompt
        p = int((comp[i].cumsum(0) == 0).sum())
        assert p == int((comp[i + 4].cumsum(0) == 0).sum())
        assert torch.equal(ids[i, :p], ids[i + 4, :p])


def test_loss_matches_trl(oracle):
    ours, trl_loss = _reduce(oracle["ours"], oracle["loss"], oracle["pair"]), oracle["trl_loss"].item()
    assert math.isfinite(trl_loss)
    assert abs(ours - trl_loss) <= TOL, (oracle["trl_type"], ours, trl_loss)
    if oracle["trl_type"] == "ipo":
        # negative control, and the one definitional difference: TRL's "ipo" is our ipo_norm (per-token averaged
        # log-ratios), not the paper's IPO on summed log-probs (our "ipo")
        summed, _ = LOSSES["ipo"].fn(oracle["pair"], LossConfig(name="ipo", beta=BETA))
        assert abs(summed.mean().item() - trl_loss) > 1e-2


def test_logps_and_rewards_match_trl(oracle):
    m, pair = oracle["trl_metrics"], oracle["pair"]
    assert abs(pair.chosen_logps.mean().item() - m["logps/chosen"]) <= TOL
    assert abs(pair.rejected_logps.mean().item() - m["logps/rejected"]) <= TOL
    # TRL's rewards are beta * (policy - reference) log-ratios whatever the loss type
    rewards = {
        "rewards/chosen": BETA * (pair.chosen_logps - pair.ref_chosen_logps),
        "rewards/rejected": BETA * (pair.rejected_logps - pair.ref_rejected_logps),
    }
    rewards["rewards/margins"] = rewards["rewards/chosen"] - rewards["rewards/rejected"]
    rewards["rewards/accuracies"] = (rewards["rewards/chosen"] > rewards["rewards/rejected"]).float()
    for key, value in rewards.items():
        assert abs(value.mean().item() - m[key]) <= TOL, key
    if oracle["ours"] != "sft":  # our DPO-family losses report the same rewards as metrics
        ours = oracle["metrics"]
        for key in ("rewards/chosen", "rewards/rejected"):
            assert torch.allclose(ours[key], rewards[key], atol=TOL, rtol=0), key
        assert abs(ours["rewards/margin"].mean().item() - m["rewards/margins"]) <= TOL
        assert abs(ours["rewards/accuracy"].mean().item() - m["rewards/accuracies"]) <= TOL


def test_policy_and_reference_really_differ(oracle):
    """Guard against a vacuous comparison: with policy == reference every margin is 0."""
    pair = oracle["pair"]
    assert (pair.chosen_logps - pair.ref_chosen_logps).abs().min() > 1e-3
    assert (pair.chosen_logps - pair.rejected_logps).abs().min() > 1e-3
