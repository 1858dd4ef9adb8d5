"""A fair linear head from noisy sufficient statistics, released once per run (last_layer under DP).

Spend privacy once, post-process for free: the auditor releases, inside itself, the per-(group,
label) counts n_{g,y} and feature sums S_{g,y} = Σ_{i∈(g,y)} f_i of its training part under the
received representation, with every feature clipped to L2 norm C (two Gaussian mechanisms of one
noise multiplier σ: count sensitivity 1, sum sensitivity C, add/remove-one adjacency; each
example is in one cell). Every candidate head of the α grid is then computed from those noisy
statistics in closed form, so the grid costs no more privacy than one head.

The head is the developer's incoming linear head made fair by a penalised projection. With w₀ the
incoming logit direction (weight[1] − weight[0]) and d_k the noisy differences between a cell's
mean feature and its reference mean,

    w_α = argmin_w ‖w − w₀‖² + (α / tr Q)·Σ_k (w·d_k)² = (I + α·Q / tr Q)⁻¹ w₀,    Q = Σ_k d_k d_kᵀ,

and the bias moves so the mean logit over the part is unchanged: b_α = b₀ + (w₀ − w_α)·m̄.
``DI`` (demographic parity): d_g = m_g − m̄ for each group g (cells pooled over labels);
``EO`` (equalized odds): d_{g,y} = m_{g,y} − m_y for each group and label. As α → ∞, w_α is w₀
with its components along the group mean differences removed: the linear score's mean no longer
differs between groups (within each label, for EO). This is the one-step linear null-space
projection of INLP (Ravfogel et al., ACL 2020, "Null It Out", Eq. 1–2) applied to the task head
and penalised rather than hard, computed from noisy group statistics as RaCO-DP does
(Yaghini et al., ICLR 2026) and needing no second moment (the D × D Gram, the expensive statistic
of AdaSSP, Wang 2018, would cost a third release whose noise grows with D).

The clip bound C is data-independent: the features are (convex combinations of) outputs of the
backbone's final LayerNorm, whose norm is at most max|γ|·√D + ‖β‖ (:func:`feature_bound`); the
developer's LoRA does not touch LayerNorm parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CellStats", "cell_stats", "fair_projection", "feature_bound", "noisy_cell_stats", "to_logit_head"]


@dataclass(frozen=True)
class CellStats:
    """Per-(group, label) counts ``n`` (G, 2) and feature sums ``S`` (G, 2, D), float64, and the
    clip bound ``bound`` (C) the features were clipped to."""

    n: torch.Tensor
    S: torch.Tensor
    bound: float


def feature_bound(backbone: nn.Module, dim: int) -> float | None:
    """max|γ|·√D + ‖β‖ of the last ``LayerNorm`` over ``dim`` features in ``backbone``: a bound on
    the norm of its outputs and of any mean of them (the pooled features). None if there is none.
    """
    last = None
    for m in backbone.modules():
        if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (dim,):
            last = m
    if last is None:
        return None
    gamma = last.weight.detach().double() if last.weight is not None else torch.ones(dim, dtype=torch.float64)
    beta = last.bias.detach().double() if last.bias is not None else torch.zeros(dim, dtype=torch.float64)
    return float(gamma.abs().max() * math.sqrt(dim) + beta.norm())


def cell_stats(feats: torch.Tensor, y: torch.Tensor, s: torch.Tensor, n_groups: int, bound: float) -> CellStats:
    """Exact statistics of ``feats`` (N, D) clipped to L2 norm ``bound``; ``y``, ``s``: (N,) int64.

    Non-finite features count as 0. Adding or removing one example changes ``n`` by 1 in one
    cell and ``S`` by at most ``bound`` (L2) in one cell.
    """
    f = torch.nan_to_num(feats.detach().double(), nan=0.0, posinf=0.0, neginf=0.0)
    f = f * torch.clamp(bound / (f.norm(dim=1, keepdim=True) + 1e-12), max=1.0)
    cells = s.long() * 2 + y.long()
    k = 2 * n_groups
    n = torch.bincount(cells, minlength=k).double().reshape(n_groups, 2)
    S = torch.zeros(k, f.shape[1], dtype=torch.float64).index_add_(0, cells, f).reshape(n_groups, 2, -1)
    return CellStats(n, S, float(bound))


def noisy_cell_stats(stats: CellStats, sigma: float, generator: torch.Generator) -> CellStats:
    """The Gaussian mechanism on ``stats``: N(0, σ²) on every count, N(0, σ²C²) on every sum
    coordinate (two releases of noise multiplier σ)."""
    n = stats.n + sigma * torch.randn(stats.n.shape, generator=generator, dtype=torch.float64)
    S = stats.S + sigma * stats.bound * torch.randn(stats.S.shape, generator=generator, dtype=torch.float64)
    return CellStats(n, S, stats.bound)


def _differences(stats: CellStats, constraint: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the differences d_k (D,), the overall mean m̄ (D,)) of ``stats`` (counts below 1 count as 1)."""
    n, S = stats.n.clamp(min=1.0), stats.S
    mean = S.sum((0, 1)) / n.sum()
    if constraint == "DI":
        return [S[g].sum(0) / n[g].sum() - mean for g in range(S.shape[0])], mean
    if constraint == "EO":
        ds = []
        for c in range(2):
            ref = S[:, c].sum(0) / n[:, c].sum()
            ds += [S[g, c] / n[g, c] - ref for g in range(S.shape[0])]
        return ds, mean
    raise ValueError(f"constraint {constraint!r} has no statistics form (EO, DI)")


def fair_projection(w0: torch.Tensor, b0: float, stats: CellStats, constraint: str, alpha: float
                    ) -> tuple[torch.Tensor, float]:
    """(w_α (D,), b_α) of the module doc from the incoming direction ``w0`` (D,) and bias ``b0``.

    Raises:
        ValueError: a constraint other than ``EO`` or ``DI``; ``alpha`` < 0.
    """
    if alpha < 0:
        raise ValueError("alpha must be >= 0")
    ds, mean = _differences(stats, constraint)
    w0 = w0.double()
    if alpha == 0:
        return w0.clone(), float(b0)
    Q = sum(torch.outer(d, d) for d in ds)
    scale = float(torch.trace(Q))
    if scale <= 0:
        return w0.clone(), float(b0)
    w = torch.linalg.solve(torch.eye(len(w0), dtype=torch.float64) + (alpha / scale) * Q, w0)
    return w, float(b0) + float((w0 - w) @ mean)


def to_logit_head(init: dict[str, torch.Tensor], w: torch.Tensor, b: float) -> dict[str, torch.Tensor]:
    """A two-class head (``weight`` (2, D), ``bias`` (2,)) whose logit difference is w·f + b: the
    incoming head with half of the change on each row, so row 0 keeps its own part."""
    w0 = init["weight"][1].double() - init["weight"][0].double()
    b0 = float(init["bias"][1] - init["bias"][0])
    dw, db = (w - w0) / 2, (b - b0) / 2
    weight = init["weight"].detach().double().clone()
    bias = init["bias"].detach().double().clone()
    weight[1] += dw
    weight[0] -= dw
    bias[1] += db
    bias[0] -= db
    return {"weight": weight.to(init["weight"].dtype), "bias": bias.to(init["bias"].dtype)}
