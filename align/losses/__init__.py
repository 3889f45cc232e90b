"""The loss registry: every objective is a pure function of log-probs (and labels) registered by name.

A loss takes a ``PairBatch`` (sequence log-probs of the policy, and where the objective needs them of the
reference and of the anchor pi_t, response lengths, soft preferences) and the ``LossConfig``, and returns
``(per_example_loss [B], metrics)`` where metrics are per-example tensors. Trainers read ``LossSpec`` to know
which inputs to compute: a reference-free loss (SimPO, SFT) skips the reference forward pass entirely.

Add an objective: write the function in a module here with ``@register_loss(...)``, give it a hand-computed
test in tests/losses/, a recipe, and a row in docs/algorithms.md.
"""

from __future__ import annotations

from align.losses import policy, preference  # noqa: F401  (registers the DPO family, SPPO, INPO, SFT, SPO)
from align.losses.registry import LOSSES, LossFn, LossSpec, PairBatch, chosen_nll, get_loss, register_loss

__all__ = ["LOSSES", "LossFn", "LossSpec", "PairBatch", "chosen_nll", "get_loss", "register_loss"]
