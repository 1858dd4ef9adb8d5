"""The Gaussian mechanisms of the auditor's releases (``docs/privacy.md``; the accounting of
each is in :mod:`auditor.accounting`).

* :func:`noisy_counts`: per-group confusion counts plus N(0, σ²) (L2 sensitivity 1);
* :func:`clipped_noisy_sum` of :func:`per_example_grads`: DP-SGD's clipped, noised sum (Abadi et
  al. 2016, Alg. 1) on a Poisson sample (:func:`poisson_indices`);
* :func:`noisy_cell_stats`, :func:`cell_violation`, :func:`cell_weights`: group fairness terms
  linearised per example from noisy per-(group, label) statistics (L2 sensitivity √2).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping

import numpy as np
import torch

__all__ = ["cell_violation", "cell_weights", "clipped_noisy_sum", "noisy_cell_stats", "noisy_counts",
           "per_example_grads", "poisson_indices"]


def poisson_indices(n: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson subsample of ``range(n)``: each index independently with probability ``q`` (sorted)."""
    return np.flatnonzero(rng.random(n) < q)


def noisy_counts(counts: Mapping[str, np.ndarray], sigma: float, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """Gaussian mechanism on per-group confusion counts: each count + N(0, σ²) (sensitivity 1).

    Args:
        counts: group → ``[tn, fp, fn, tp]`` (4,) from :func:`protocol.metrics.confusion_counts`.
        sigma: noise standard deviation in counts (= the noise multiplier, sensitivity 1).
    """
    return {g: np.asarray(c, dtype=np.float64) + rng.normal(0.0, sigma, 4) for g, c in sorted(counts.items())}


def per_example_grads(loss_fn: Callable, params: dict[str, torch.Tensor], *batch) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``loss_fn(params, *example)`` with ``torch.func.vmap(grad(...))``.

    A forward with data-dependent control flow cannot run under ``vmap``. For those, vmap's
    refusal (a ``RuntimeError`` naming vmap, raised before any gradient is taken) falls back to
    ``torch.func.grad`` per example in a loop: the same gradients, one forward and backward
    each, about 3× vmap's time through MiniLM (``bench/per_example_grads.py``). transformers'
    BERT models take that branch from a 2D padding mask (they ask whether it is all ones,
    ``masking_utils._ignore_bidirectional_mask_sdpa``); :class:`protocol.model.FairsplitModel`
    passes them a 4D additive mask instead, so text backbones run under vmap.

    Args:
        loss_fn: ``(params, *example) -> scalar`` for one example (no batch dimension).
        params: name → tensor (detached).
        batch: tensors with the batch on dim 0 (B, ...), or dicts of such tensors.
    Returns:
        name → (B, *param.shape).
    Raises:
        RuntimeError: from ``loss_fn`` itself (anything other than vmap's data-dependence refusal).
    """
    from torch.func import grad, vmap

    with warnings.catch_warnings():  # SDPA has no batching rule on CPU yet: vmap loops it (exact)
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        try:
            return vmap(grad(loss_fn), in_dims=(None, *([0] * len(batch))))(params, *batch)
        except RuntimeError as err:
            if not str(err).startswith("vmap:"):
                raise
    g, n = grad(loss_fn), _batch_len(batch[0])
    rows = [g(params, *(_example(b, i) for b in batch)) for i in range(n)]
    return {k: torch.stack([r[k] for r in rows]) for k in params}


def _batch_len(b) -> int:
    return len(next(iter(b.values()))) if isinstance(b, dict) else len(b)


def _example(b, i: int):
    """Example ``i`` of a batch (a tensor, or a dict of tensors), without its batch dimension."""
    return {k: v[i] for k, v in b.items()} if isinstance(b, dict) else b[i]


def clipped_noisy_sum(grads: dict[str, torch.Tensor], clip_norm: float, noise_multiplier: float,
                      generator: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """Σ_i clip_C(g_i) + N(0, σ²C²·I) (DP-SGD, Abadi et al. 2016, Alg. 1).

    Args:
        grads: name → (B, ...) per-example gradients; a non-finite example's gradient counts as 0.
        clip_norm: C, the per-example L2 bound over all names together.
        noise_multiplier: σ.
    Returns:
        (name → noisy sum, same shape as one example's gradient, float32 CPU; fraction of
        examples that were clipped, for the auditor's log only).
    """
    names = list(grads)
    if not names:
        return {}, 0.0
    b = next(iter(grads.values())).shape[0]
    flat = torch.cat([grads[k].reshape(b, -1).double() for k in names], 1) if b else None
    sums = {}
    clipped = 0.0
    if b:
        finite = torch.isfinite(flat).all(1)
        flat = torch.where(finite[:, None], flat, torch.zeros_like(flat))
        norms = flat.norm(dim=1)
        scale = torch.clamp(clip_norm / (norms + 1e-12), max=1.0)
        clipped = float((norms > clip_norm).double().mean())
        total = (flat * scale[:, None]).sum(0)
    offset = 0
    for k in names:
        shape = grads[k].shape[1:]
        size = int(np.prod(shape)) if len(shape) else 1
        part = total[offset:offset + size].reshape(shape) if b else torch.zeros(shape, dtype=torch.float64)
        noise = torch.normal(0.0, noise_multiplier * clip_norm, size=tuple(shape), generator=generator,
                             dtype=torch.float64)
        sums[k] = (part.cpu() + noise).float()
        offset += size
    return sums, clipped


def _cells(s: torch.Tensor, y: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Cell index g·2 + y of each example (G·2 cells)."""
    return s.long() * 2 + y.long()


def noisy_cell_stats(p: torch.Tensor, s: torch.Tensor, y: torch.Tensor, n_groups: int, sigma: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy per-(group, label) counts n_c and sums S_c = Σ_{i∈c} p_i (Gaussian, L2 sensitivity √2).

    Args:
        p: (B,) soft predictions in [0, 1] (non-finite → 0); s, y: (B,) int64.
        sigma: noise multiplier; each entry gets N(0, 2σ²).
    Returns:
        (n (2G,), S (2G,)) float64, cell c = 2g + y.
    """
    p = torch.nan_to_num(p.detach().double(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    cells = _cells(s, y, n_groups)
    k = 2 * n_groups
    n = torch.bincount(cells, minlength=k).double()
    S = torch.bincount(cells, weights=p, minlength=k).double()
    std = sigma * math.sqrt(2.0)
    n = n + torch.normal(0.0, std, size=(k,), generator=generator, dtype=torch.float64)
    S = S + torch.normal(0.0, std, size=(k,), generator=generator, dtype=torch.float64)
    return n, S


def cell_violation(S: torch.Tensor, n: torch.Tensor, statistic: str, noise_sd: float = 0.0,
                   z: float = 3.0) -> torch.Tensor:
    """fairret's NormLoss (p = 1) written on per-(group, label) sums: Σ_g |stat_g / stat − 1|.

    Args:
        S: (2G,) sums of p per cell c = 2g + y; n: (2G,) counts per cell (noisy counts allowed;
            a statistic whose denominator is ≤ 0.5 leaves its group out).
        statistic: ``demographic_parity``, ``equal_opportunity``, ``equalized_odds``,
            ``accuracy_equality`` (as :func:`auditor.methods.fairness_terms.fairness_violation`).
        noise_sd: the standard deviation of the noise on each entry of S and n. With noise, a
            group's term is max(0, |r_g − 1| − z·sd(r_g)) (sd by the delta method): a gap the
            noise alone could make gives no gradient. Without it, the sign of a pure-noise gap
            would still point the gradient along the groups' mean difference, a population-level
            s-direction with no fairness purpose (``bench/leakage.py``, ``signal_direction``).
    Returns:
        a scalar, differentiable in S; 0 when fewer than two groups are defined.
    """
    S2, n2 = S.reshape(-1, 2), n.reshape(-1, 2)  # (G, label)

    def norm_loss(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        keep = den > 0.5
        if int(keep.sum()) < 2:
            return S.sum() * 0.0
        overall = num[keep].sum() / den[keep].sum()
        r = (num[keep] / den[keep]) / overall
        gap = (r - 1).abs()
        if noise_sd > 0:
            num_k = num[keep].detach().clamp(min=1.0)
            sd = r.detach() * noise_sd * torch.sqrt(1 / num_k ** 2 + 1 / den[keep].detach() ** 2)
            gap = torch.relu(gap - z * sd)
        return gap.sum()

    if statistic == "demographic_parity":
        return norm_loss(S2.sum(1), n2.sum(1))
    if statistic == "equal_opportunity":
        return norm_loss(S2[:, 1], n2[:, 1])
    if statistic == "equalized_odds":
        both = (n2[:, 1] > 0.5) & (n2[:, 0] > 0.5)
        if int(both.sum()) < 2:
            return S.sum() * 0.0
        return (norm_loss(S2[both, 1], n2[both, 1]) + norm_loss(S2[both, 0], n2[both, 0]))
    if statistic == "accuracy_equality":
        return norm_loss(S2[:, 1] + n2[:, 0] - S2[:, 0], n2.sum(1))
    raise ValueError(f"unknown fairness statistic {statistic!r}")


def cell_weights(n: torch.Tensor, S: torch.Tensor, statistic: str, noise_sd: float = 0.0,
                 z: float = 3.0) -> tuple[torch.Tensor, float]:
    """w_c = ∂L/∂S_c at (noisy) statistics, and L there: the linearised per-example fairness term.

    With these weights Σ_i w_{c(i)}·∇p_i = ∇L when the statistics are the batch's exact ones.
    ``noise_sd``: the noise on each statistic (gaps within ``z`` sd give no gradient; see
    :func:`cell_violation`). Returns ((2G,) float64 weights, L).
    """
    S = S.detach().clone().requires_grad_(True)
    n = n.detach().clamp(min=0.0)
    S_used = torch.minimum(S.clamp(min=0.0), n)  # a sum of p in [0, 1] lies in [0, n]
    loss = cell_violation(S_used, n, statistic, noise_sd, z)
    if not loss.requires_grad:
        return torch.zeros_like(S.detach()), 0.0
    (w,) = torch.autograd.grad(loss, S)
    return torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0), float(loss.detach())
