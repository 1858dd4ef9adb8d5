"""last_layer's DP-SGD refit (``dp_refit = "sgd"``): one path of a linear head on fixed features
through the α grid, changing the head only within the developer's refit basis.

:func:`dp_refit_head` is one segment of the path (Abadi et al. 2016's DP-SGD on CE + α·L_fair,
the fairness term linearised once); :func:`refit_subspace` turns the basis a head-refit request
carries into the orthonormal basis the path uses.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MAX_MEAN_NORM", "dp_refit_head", "refit_subspace"]

#: The largest norm of a refit basis's mean the auditor accepts (features of a LayerNorm backbone
#: have norms of tens): beyond it the bias compensation −V·Uᵀ·μ could overflow float32.
MAX_MEAN_NORM = 1e6


def refit_subspace(refit_basis: dict[str, torch.Tensor] | None, dim: int
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The developer's refit basis as the private refit uses it: (U (D, k), μ (D,)) float32, U
    replaced by its partial isometry L·diag(σ > 0)·Vᵀ (from U = L·diag(σ)·Vᵀ): the same column
    span, singular values 0 or 1, and U itself when its columns are orthonormal (or zero), so a
    crafted basis can span fewer directions but never scale a step, and an honest basis keeps
    its principal directions as the coordinates Adam scales. None without a basis.

    The basis is the developer's (its own features), so whatever it holds, the refit's privacy
    is unchanged: every example's gradient is clipped after the projection.

    Raises:
        ValueError: a basis whose rows are not the features' dimension ``dim``, or a mean whose
            norm exceeds :data:`MAX_MEAN_NORM` (its bias compensation could overflow); raised
            before anything is spent.
    """
    if refit_basis is None:
        return None
    U, mu = refit_basis["basis"].double(), refit_basis["mean"].double()
    if U.ndim != 2 or U.shape[0] != dim or tuple(mu.shape) != (dim,):
        raise ValueError(f"refit basis: basis {tuple(U.shape)} and mean {tuple(mu.shape)} do not "
                         f"match the features' dimension {dim}")
    if not bool(torch.isfinite(mu).all()) or float(mu.norm()) > MAX_MEAN_NORM:
        raise ValueError(f"refit basis: the mean's norm exceeds {MAX_MEAN_NORM:g}")
    left, sv, vh = torch.linalg.svd(U, full_matrices=False)
    keep = sv > 1e-6 * max(float(sv.max()) if len(sv) else 0.0, 1e-12)
    return ((left * keep) @ vh).float(), mu.float()  # the partial isometry of U: U itself if orthonormal


def dp_refit_head(feats: torch.Tensor, y: torch.Tensor, s: torch.Tensor, n_groups: int,
                  init: dict[str, torch.Tensor], statistic: str, alpha: float, steps: int, lr: float,
                  q: float, sigma: float, clip_norm: float, stats0: tuple[torch.Tensor, torch.Tensor],
                  rng: np.random.Generator, generator: torch.Generator,
                  basis: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """DP-SGD (Abadi et al. 2016) refit of a linear head on fixed features with CE + α·L_fair.

    The fairness term is linearised once, at the incoming head: w = ∂NormLoss/∂S at ``stats0``,
    the noisy per-(group, label) statistics of the whole training part (released once, noise
    std √2σ per entry; :func:`auditor.privacy.cell_weights`, gaps within 2 noise standard
    deviations give no gradient). Each of ``steps`` steps draws a Poisson sample of rate ``q``;
    example i's loss is CE_i + α·B·w_{c(i)}·p_i with B = qN; the per-example gradients
    (``weight`` and ``bias`` together) are clipped to ``clip_norm``, summed, noised with
    N(0, σ²C²), divided by B, and Adam (lr ``lr``) takes the step: one sampled Gaussian
    mechanism of multiplier σ. α, chosen on validation, sets how far the head moves along the
    fairness direction.

    With ``basis`` = (U, μ), U (D, k) with orthonormal (or zero) columns and μ (D,), the head
    changes only within span(U): weight = W₀ + V·Uᵀ, bias = b₀ + c − V·Uᵀμ, and DP-SGD runs on
    (V (C, k), c (C,)) with example i's features (f_i − μ)·U (k,) and its incoming logits as a
    fixed offset. The per-example gradient then has C·k + C entries instead of C·D + C, so the
    same noise multiplier puts (k + 1)/(D + 1) of the noise energy on the head (Yu et al., ICLR 2021, "Do
    not let privacy overbill utility: gradient embedding perturbation", project gradients onto a
    public low-dimensional subspace; here the subspace is the developer's, from its own data).
    Without it, U = I and μ = 0: the same steps as DP-SGD on (weight, bias) from ``init`` (Adam's
    steps do not depend on where the parameters start).

    Args:
        feats: (N, D) features; y, s: (N,) int64; init: ``weight`` (C, D), ``bias`` (C,);
        basis: optional (U (D, k), μ (D,)).
    Returns:
        (head ``weight`` (C, D), ``bias`` (C,), float32; α·NormLoss at ``stats0``).
    """
    from .. import privacy as P

    n_all = len(y)
    b_exp = q * n_all
    w0, b0 = init["weight"].detach().float(), init["bias"].detach().float()
    if basis is None:
        U, mu = torch.eye(feats.shape[1]), torch.zeros(feats.shape[1])
    else:
        U, mu = basis[0].float(), basis[1].float()
    proj = (feats.float() - mu) @ U  # (N, k)
    with torch.no_grad():
        offset = feats.float() @ w0.T + b0  # (N, C): the incoming head's logits
    v = torch.zeros(w0.shape[0], U.shape[1], requires_grad=True)
    c = torch.zeros_like(b0, requires_grad=True)
    opt = torch.optim.Adam([v, c], lr=lr)
    n_c, S_c = stats0
    weights, violation = P.cell_weights(n_c, S_c, statistic, noise_sd=sigma * math.sqrt(2.0), z=2.0)
    fair = alpha * violation

    def loss_fn(prm, f, o, yi, ci):
        logits = o + f @ prm["weight"].T + prm["bias"]
        ce = F.cross_entropy(logits.unsqueeze(0), yi.unsqueeze(0))
        return ce + ci * torch.softmax(logits, -1)[1]

    for _ in range(steps):
        idx = torch.as_tensor(P.poisson_indices(n_all, q, rng))
        yy, ss = y[idx], s[idx]
        coef = (alpha * b_exp * weights[(ss * 2 + yy).long()]).float()
        params = {"weight": v.detach(), "bias": c.detach()}
        if len(idx):
            grads = P.per_example_grads(loss_fn, params, proj[idx], offset[idx], yy, coef)
        else:
            grads = {k: torch.zeros((0, *t.shape)) for k, t in params.items()}
        sums, _ = P.clipped_noisy_sum(grads, clip_norm, sigma, generator)
        v.grad, c.grad = sums["weight"] / b_exp, sums["bias"] / b_exp
        opt.step()
    with torch.no_grad():
        dw = v.detach() @ U.T  # (C, D)
        return {"weight": w0 + dw, "bias": b0 + c.detach() - dw @ mu}, float(fair)
