"""Differentiable group-fairness statistics on soft predictions, through the ``fairret`` package.

fairret (Buyl et al., ICLR 2024, "fairret: a Framework for Differentiable Fairness Regularization
Terms") writes each statistic as linear-fractional in the soft prediction p = P(ŷ = 1 | x) and
penalises the violation vector |stat_g(p) / stat(p) − 1| over groups g with its ``NormLoss``
(Eq. 5, p = 1). Groups whose statistic is undefined in a batch (no member, or no member of the
conditioning class) are left out of that batch's term, so it never becomes NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fairret.loss import NormLoss
from fairret.statistic import (
    Accuracy,
    FalsePositiveRate,
    PositiveRate,
    StackedLinearFractionalStatistic,
    TruePositiveRate,
)

__all__ = ["GAP_METRIC", "fairness_violation", "worst_group_loss"]

#: The fairlearn-style gap (a key of :func:`protocol.metrics.fairness_report`, or per-group
#: accuracy difference) that each statistic's penalty targets.
GAP_METRIC = {
    "demographic_parity": "demographic_parity_difference",
    "equal_opportunity": "equal_opportunity_difference",
    "equalized_odds": "equalized_odds_difference",
    "accuracy_equality": "accuracy_difference",
}


def _statistic(name: str):
    if name == "demographic_parity":
        return PositiveRate()
    if name == "equal_opportunity":
        return TruePositiveRate()
    if name == "equalized_odds":
        return StackedLinearFractionalStatistic(TruePositiveRate(), FalsePositiveRate())
    if name == "accuracy_equality":
        return Accuracy()
    raise ValueError(f"unknown fairness statistic {name!r}; known: {sorted(GAP_METRIC)}")


def _defined_groups(name: str, onehot: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(G,) bool: groups whose statistic has a non-empty denominator in the batch."""
    yf = y.float().unsqueeze(1)
    if name == "equal_opportunity":
        return (onehot * yf).sum(0) > 0
    if name == "equalized_odds":
        return ((onehot * yf).sum(0) > 0) & ((onehot * (1 - yf)).sum(0) > 0)
    return onehot.sum(0) > 0


def fairness_violation(p: torch.Tensor, s: torch.Tensor, y: torch.Tensor, n_groups: int,
                       statistic: str) -> torch.Tensor:
    """fairret's NormLoss of ``statistic`` over the groups present: a scalar ≥ 0, differentiable in p.

    Args:
        p: (B,) soft predictions P(ŷ = 1) in (0, 1); s: (B,) int64 group codes in [0, n_groups);
        y: (B,) int64 labels in {0, 1}.
        statistic: ``demographic_parity``, ``equal_opportunity``, ``equalized_odds`` or
            ``accuracy_equality``.
    Returns:
        Σ_g |stat_g / stat − 1| (summed over both statistics for equalized odds); 0 (with a
        zero gradient) when fewer than two groups are defined in the batch.
    Raises:
        ValueError: an unknown statistic, or shapes that differ.
    """
    if not (p.shape == s.shape == y.shape) or p.ndim != 1:
        raise ValueError(f"p, s, y must be (B,) of one length, got {tuple(p.shape)}, {tuple(s.shape)}, "
                         f"{tuple(y.shape)}")
    stat = _statistic(statistic)
    onehot = F.one_hot(s, n_groups).float()
    keep = _defined_groups(statistic, onehot, y)
    if int(keep.sum()) < 2:
        return p.sum() * 0.0
    sens = onehot[:, keep]
    args = () if statistic == "demographic_parity" else (y.float().unsqueeze(1),)
    return NormLoss(stat)(p.unsqueeze(1), sens, *args, pred_as_logit=False)


def worst_group_loss(logits: torch.Tensor, s: torch.Tensor, y: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Max over present groups of the group's mean cross-entropy (max-min fairness, MMF)."""
    losses = F.cross_entropy(logits, y, reduction="none")
    per = [losses[s == g].mean() for g in range(n_groups) if bool((s == g).any())]
    return torch.stack(per).max()
