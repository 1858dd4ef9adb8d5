"""Last-layer fairness fine-tuning (Mao, Hu, Zhang, Vondrick, Sra & Yang 2023, "Last-Layer Fairness
Fine-tuning is Simple and Effective for Neural Networks", arXiv 2304.03935, §3).

After the developer's training, the auditor freezes the representation f_φ at the received
adapter and refits the developer's linear head on its own training part with
min_h CE(h(f_φ(x)), y) + α·L_fair(h) (the paper's Eq. 1 with their constraint variants):

* ``EO``: equalized odds (TPR and FPR parity), * ``DI``: demographic parity (disparate impact),
* ``AE``: accuracy equality, all as fairret NormLoss terms on soft predictions;
* ``MMF``: max-min fairness, the worst group's mean cross-entropy (α weighs it against CE).

``balanced``: the refit uses a group × class balanced subsample (the paper's M2, as DFR,
Kirichenko et al. 2023). α is chosen on the auditor's validation part: the smallest validation
gap among the α whose accuracy is within ``max_accuracy_drop`` of the reference (the developer's
incoming head's validation accuracy, or the best refit's; MMF: the highest worst-group accuracy). Only the new head crosses, with the developer's head's keys and shapes: a
task predictor, never a predictor of s.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import RecordDict

from fairsplit.protocol.messages import RoundRequest
from fairsplit.protocol.metrics import fairness_report

from ..accounting import SELECT, NotPrivate, RunNoise, dp_event
from . import common as C
from .base import REGISTRY, AuditorMethod, Release
from .fairness_terms import fairness_violation, worst_group_loss
from .private_refit import dp_refit_head, refit_subspace

__all__ = ["LastLayer", "balanced_subsample", "refit_head"]

_STATISTIC = {"EO": "equalized_odds", "DI": "demographic_parity", "AE": "accuracy_equality"}
_GAP = {"EO": "equalized_odds_difference", "DI": "demographic_parity_difference"}


def balanced_subsample(s: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Indices of an equal number of examples per present (group, class) cell (the smallest cell's count)."""
    rng = np.random.default_rng([seed, 7])
    cells = [np.flatnonzero((s == g) & (y == c)) for g in np.unique(s) for c in np.unique(y)]
    cells = [c for c in cells if len(c)]
    k = min(len(c) for c in cells)
    return np.sort(np.concatenate([rng.choice(c, k, replace=False) for c in cells]))


def refit_head(feats: torch.Tensor, y: torch.Tensor, s: torch.Tensor, n_groups: int,
               init: dict[str, torch.Tensor], constraint: str, alpha: float, steps: int,
               lr: float) -> dict[str, torch.Tensor]:
    """Full-batch Adam on CE + α·L_fair from ``init``; returns the head (``weight`` (C, D), ``bias`` (C,)).

    Args:
        feats: (N, D) detached representations; y: (N,) int64 labels; s: (N,) int64 groups.
    """
    w = init["weight"].detach().clone().float().requires_grad_(True)
    b = init["bias"].detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        logits = feats @ w.T + b
        loss = F.cross_entropy(logits, y)
        if alpha > 0:
            if constraint == "MMF":
                loss = loss + alpha * worst_group_loss(logits, s, y, n_groups)
            else:
                p = torch.softmax(logits, -1)[:, 1]
                loss = loss + alpha * fairness_violation(p, s, y, n_groups, _STATISTIC[constraint])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"weight": w.detach().to(init["weight"].dtype), "bias": b.detach().to(init["bias"].dtype)}


def _score(report: dict, constraint: str) -> float:
    """The validation quantity to minimise for a constraint (lower is fairer)."""
    if constraint in _GAP:
        return float(report[_GAP[constraint]] or 0.0)
    if constraint == "AE":
        accs = [g["accuracy"] for g in report["per_group"].values() if g["accuracy"] is not None]
        return float(max(accs) - min(accs))
    return -float(report["worst_group_accuracy"] or 0.0)  # MMF


class LastLayer(AuditorMethod):
    """Serves one refitted head after the developer's last round (``want == "head"``).

    Its first stage (``first_stage``, default ERM) serves the training rounds: prepare, signal and
    update are that method's, with its own config.
    """

    name = "last_layer"

    @classmethod
    def dp_events(cls, cfg, exp, n_train: int, noise: RunNoise) -> list[dict]:
        """The refit's releases. ``"stats"``: two Gaussian releases (counts, clipped feature
        sums; multiplier σ_train) and one val evaluation per α > 0 of ``dp_stats_alphas`` plus
        the incoming head's. ``"sgd"``: per α of ``dp_alphas`` ``dp_refit_steps`` gradient steps
        (multiplier σ_train, rate q = ``dp_batch_size`` / n_train), one release of the whole
        training part's statistics at the incoming head (Gaussian, multiplier σ_train), and one
        val evaluation per α plus the incoming head's.

        Raises:
            auditor.accounting.NotPrivate: constraint MMF, ``balanced``, the statistics refit
                with a constraint other than EO or DI, or more than :data:`MAX_DP_CANDIDATES`
                candidate heads.
        """
        if cfg.constraint == "MMF" or cfg.balanced:
            raise NotPrivate("last_layer under DP supports constraint EO, DI or AE without balanced")
        grid = cfg.dp_alphas if cfg.dp_refit == "sgd" else [a for a in set(cfg.dp_stats_alphas) if a > 0]
        if len(grid) + 1 > MAX_DP_CANDIDATES:  # the choice leaves: at most log2(candidates) bits a run
            raise NotPrivate(f"last_layer under DP chooses among at most {MAX_DP_CANDIDATES} heads "
                             f"(the α grid and the incoming head)")
        if cfg.dp_refit == "stats":  # counts and sums, once; the incoming head and each α > 0 on val
            if cfg.constraint not in ("EO", "DI"):
                raise NotPrivate("last_layer's statistics refit supports EO and DI (AE: dp_refit = 'sgd')")
            return (dp_event("auditor_train", "gaussian", noise.train, None, 2)
                    + dp_event("auditor_val", "gaussian", noise.select_sigma, None,
                               len(grid) + 1, SELECT))
        q = min(1.0, cfg.dp_batch_size / n_train)
        return (dp_event("auditor_train", "sampled", noise.train, q, cfg.dp_refit_steps * len(cfg.dp_alphas))
                + dp_event("auditor_train", "gaussian", noise.train, None, 1)
                + dp_event("auditor_val", "gaussian", noise.select_sigma, None, len(cfg.dp_alphas) + 1, SELECT))

    def __init__(self, ctx, cfg=None):
        super().__init__(ctx, cfg)
        first = self.cfg.first_stage
        self.first = REGISTRY[first.name](ctx, first)

    def prepare(self, state: RecordDict) -> None:
        """The first stage's (e.g. unlearning's W0 − λ·ΔW_s)."""
        self.first.prepare(state)

    def signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """The first stage's signal."""
        return self.first.signal(req, state)

    def update(self, req: RoundRequest, state: RecordDict) -> Release:
        """The first stage's weight update."""
        return self.first.update(req, state)

    def refit_head(self, req: RoundRequest, state: RecordDict) -> Release:
        """The head refitted with the α chosen on validation; metrics: n, the fair term, the chosen α.

        Under the auditor's DP: :meth:`private_refit`.
        """
        if self.ctx.gate.dp:
            return self.private_refit(req)
        ctx, cfg, device = self.ctx, self.cfg, self.ctx.cfg.device
        train, val = ctx.data["auditor_train"], ctx.data["auditor_val"]
        idx = (balanced_subsample(ctx.train_codes, train.y, ctx.exp.seed) if cfg.balanced
               else np.arange(len(train)))
        inputs = train.inputs[idx] if isinstance(train.inputs, np.ndarray) else [train.inputs[i] for i in idx]
        feats = C._features(ctx.model, inputs, device, ctx.exp.eval_batch_size).float()
        y = torch.as_tensor(train.y[idx], device=feats.device)
        s = torch.as_tensor(ctx.train_codes[idx], device=feats.device)
        val_feats = C._features(ctx.model, val.inputs, device, ctx.exp.eval_batch_size).float()
        init = {k: v.detach().to(device) for k, v in ctx.model.head.state_dict().items()}
        candidates = []
        for alpha in cfg.alphas:
            head = refit_head(feats, y, s, self.n_groups, init, cfg.constraint, alpha,
                              cfg.refit_steps, cfg.refit_lr)
            scores = torch.softmax(val_feats @ head["weight"].float().T + head["bias"].float(), -1)[:, 1]
            rep = fairness_report(val.y, scores.cpu().numpy(), val.s, ctx.exp.threshold, 1)
            candidates.append((alpha, head, float(rep["accuracy"]), _score(rep, cfg.constraint)))
        if cfg.accuracy_reference == "incoming":
            scores = torch.softmax(val_feats @ init["weight"].float().T + init["bias"].float(), -1)[:, 1]
            ref_acc = float(fairness_report(val.y, scores.cpu().numpy(), val.s, ctx.exp.threshold, 1)["accuracy"])
        else:
            ref_acc = max(c[2] for c in candidates)
        ok = [c for c in candidates if c[2] >= ref_acc - cfg.max_accuracy_drop - 1e-12]
        if ok:
            alpha, head, _, _ = min(ok, key=lambda c: (c[3], c[0]))
        else:  # no refit keeps the reference accuracy: the most accurate one
            alpha, head, _, _ = max(candidates, key=lambda c: (c[2], -c[0]))
        with torch.no_grad():
            logits = feats @ head["weight"].float().T + head["bias"].float()
            if cfg.constraint == "MMF":
                fair = worst_group_loss(logits, s, y, self.n_groups)
            else:
                fair = fairness_violation(torch.softmax(logits, -1)[:, 1], s, y, self.n_groups,
                                          _STATISTIC[cfg.constraint])
        head = {k: v.cpu() for k, v in head.items()}
        delta = float(torch.sqrt(sum(((head[k].double() - init[k].cpu().double()) ** 2).sum() for k in head)))
        return Release(head=head, metrics={"n": int(len(idx)), "objective": float(fair),
                                           "sensitive_accuracy": None, "signal_norm": delta,
                                           "lam": float(alpha)})

    def private_refit(self, req: RoundRequest) -> Release:
        """The DP form: one DP-SGD path through the α grid (:func:`dp_refit_head` per segment),
        α chosen on noisy counts.

        The path starts at the incoming head and runs ``dp_refit_steps`` steps at each α of
        ``dp_alphas`` in increasing order (Adam, lr ``dp_refit_lr``), changing the head only
        within the span of the request's refit basis (:func:`refit_subspace`: the developer's top
        ``dp_subspace_dim`` principal directions), each segment starting where the last ended; the head at
        the end of each segment is that α's candidate. The candidates are points of one DP-SGD
        run, so the grid costs len(dp_alphas) × dp_refit_steps steps in all, what one candidate
        of the same length would (spend once, post-process for free). A larger α moves the head
        further along the fairness direction from where the smaller one left it, as a
        continuation (homotopy) path does. Every candidate (and the incoming head, the accuracy
        reference) is evaluated on the validation part through the auditor's noisy report (one
        Gaussian release each), and the rule of :meth:`refit_head` picks on those noisy reports.
        The reported objective is α·NormLoss of the incoming head at the released statistics.

        Raises:
            auditor.privacy.NotPrivate: ``MMF`` or ``balanced`` (no private form).
        """
        from .. import privacy as P

        ctx, cfg, device = self.ctx, self.cfg, self.ctx.cfg.device
        if cfg.constraint == "MMF" or cfg.balanced:
            raise P.NotPrivate("last_layer under DP supports constraint EO, DI or AE without balanced")
        if cfg.dp_refit == "stats":
            return self.stats_refit(req)
        train, val = ctx.data["auditor_train"], ctx.data["auditor_val"]
        feats = C._features(ctx.model, train.inputs, device, ctx.exp.eval_batch_size).float().cpu()
        feats = torch.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)
        y = torch.as_tensor(train.y)
        s = torch.as_tensor(ctx.train_codes)
        val_feats = C._features(ctx.model, val.inputs, device, ctx.exp.eval_batch_size).float().cpu()
        init = {k: v.detach().float().cpu() for k, v in ctx.model.head.state_dict().items()}
        basis = refit_subspace(ctx.refit_basis, feats.shape[1])  # checked before anything is spent
        sigma = ctx.gate.noise.train
        n_all = len(y)
        q = min(1.0, cfg.dp_batch_size / n_all)
        gen = ctx.gate.secret.generator(ctx.fingerprint, "last_layer", "stats0")
        with torch.no_grad():  # the incoming head's statistics on the whole part: one release
            p0 = torch.softmax(feats @ init["weight"].T + init["bias"], -1)[:, 1]
        stats0 = P.noisy_cell_stats(p0, s, y, self.n_groups, sigma, gen)
        ctx.gate.spend("auditor_train", "gaussian", sigma)

        def val_report(head, key):
            scores = torch.softmax(val_feats @ head["weight"].float().T + head["bias"].float(), -1)[:, 1]
            return ctx.gate.report("auditor_val", scores.numpy(), key, select=True)

        candidates, head = [], init
        for alpha in sorted(cfg.dp_alphas):
            head, fair = dp_refit_head(
                feats, y, s, self.n_groups, head, _STATISTIC[cfg.constraint], alpha, cfg.dp_refit_steps,
                cfg.dp_refit_lr, q, sigma, cfg.dp_clip_norm, stats0,
                ctx.gate.secret.rng(ctx.fingerprint, "last_layer", alpha),
                ctx.gate.secret.generator(ctx.fingerprint, "last_layer", alpha), basis)
            ctx.gate.spend("auditor_train", "sampled", sigma, q, cfg.dp_refit_steps)
            rep = val_report(head, ("last_layer", alpha))
            candidates.append((alpha, head, float(rep["accuracy"] or 0.0), _score(rep, cfg.constraint), fair))
        incoming = val_report(init, ("last_layer", "incoming"))
        ref_acc = (float(incoming["accuracy"] or 0.0) if cfg.accuracy_reference == "incoming"
                   else max(c[2] for c in candidates))
        ok = [c for c in candidates if c[2] >= ref_acc - cfg.max_accuracy_drop - 1e-12]
        if ok:
            alpha, head, _, _, fair = min(ok, key=lambda c: (c[3], c[0]))
        else:
            alpha, head, _, _, fair = max(candidates, key=lambda c: (c[2], -c[0]))
        head = {k: v.to(ctx.model.head.weight.dtype) for k, v in head.items()}
        delta = float(torch.sqrt(sum(((head[k].double() - init[k].double()) ** 2).sum() for k in head)))
        return Release(head=head, metrics={"n": int(cfg.dp_batch_size), "objective": float(fair),
                                           "sensitive_accuracy": None, "signal_norm": delta,
                                           "lam": float(alpha)})

    def stats_refit(self, req: RoundRequest) -> Release:
        """The ``"stats"`` DP refit (:mod:`auditor.methods.private_head`): one release of noisy
        per-(group, label) counts and clipped feature sums of the training part (two Gaussian
        mechanisms, multiplier σ_train), every α of ``dp_stats_alphas`` computed from them, each
        α > 0 and the incoming head (α = 0) evaluated once on the validation part through the
        noisy report, the choice by :meth:`refit_head`'s rule. The reported objective is the
        chosen head's relative mean-score disparity at the noisy statistics, Σ_k (w·d_k)² / Σ_k
        (w₀·d_k)² (1: as unfair as the incoming head, 0: none left).

        Raises:
            auditor.privacy.NotPrivate: a constraint other than EO or DI, more than two classes,
                or a backbone without a final LayerNorm to bound the features by.
        """
        from .. import privacy as P
        from . import private_head as H

        ctx, cfg, device = self.ctx, self.cfg, self.ctx.cfg.device
        if cfg.constraint not in ("EO", "DI"):
            raise P.NotPrivate("last_layer's statistics refit supports EO and DI (AE: dp_refit = 'sgd')")
        init = {k: v.detach().float().cpu() for k, v in ctx.model.head.state_dict().items()}
        if init["weight"].shape[0] != 2:
            raise P.NotPrivate("last_layer's statistics refit needs a two-class head")
        train, val = ctx.data["auditor_train"], ctx.data["auditor_val"]
        feats = C._features(ctx.model, train.inputs, device, ctx.exp.eval_batch_size).float().cpu()
        bound = H.feature_bound(ctx.model.backbone, feats.shape[1])
        if bound is None:
            raise P.NotPrivate("no final LayerNorm bounds the features: dp_refit = 'sgd'")
        sigma = ctx.gate.noise.train
        exact = H.cell_stats(feats, torch.as_tensor(train.y), torch.as_tensor(ctx.train_codes),
                             self.n_groups, bound)
        stats = H.noisy_cell_stats(exact, sigma, ctx.gate.secret.generator(ctx.fingerprint, "last_layer", "cells"))
        ctx.gate.spend("auditor_train", "gaussian", sigma, count=2)
        val_feats = C._features(ctx.model, val.inputs, device, ctx.exp.eval_batch_size).float().cpu()

        def val_report(head, key):
            scores = torch.softmax(val_feats @ head["weight"].float().T + head["bias"].float(), -1)[:, 1]
            return ctx.gate.report("auditor_val", scores.numpy(), key, select=True)

        w0 = init["weight"][1].double() - init["weight"][0].double()
        b0 = float(init["bias"][1] - init["bias"][0])
        ds, _ = H._differences(stats, cfg.constraint)

        def disparity(w):
            return float(sum((w @ d) ** 2 for d in ds))

        incoming = val_report(init, ("last_layer", "incoming"))
        candidates = [(0.0, init, float(incoming["accuracy"] or 0.0), _score(incoming, cfg.constraint), 1.0)]
        for alpha in sorted({a for a in cfg.dp_stats_alphas if a > 0}):
            w, b = H.fair_projection(w0, b0, stats, cfg.constraint, alpha)
            head = H.to_logit_head(init, w, b)
            rep = val_report(head, ("last_layer", alpha))
            rel = disparity(w) / max(disparity(w0), 1e-300)
            candidates.append((alpha, head, float(rep["accuracy"] or 0.0), _score(rep, cfg.constraint), rel))
        ref_acc = (candidates[0][2] if cfg.accuracy_reference == "incoming"
                   else max(c[2] for c in candidates))
        slack = accuracy_noise_slack(ctx.gate.noise.select_sigma, self.n_groups, len(val))
        alpha, head, _, _, rel = _choose(candidates, ref_acc, cfg.max_accuracy_drop, slack)
        head = {k: v.to(ctx.model.head.weight.dtype) for k, v in head.items()}
        delta = float(torch.sqrt(sum(((head[k].double() - init[k].double()) ** 2).sum() for k in head)))
        n_noisy = max(0, int(round(float(stats.n.sum()))))  # the noisy count: len(train) would be exact
        return Release(head=head, metrics={"n": n_noisy, "objective": float(rel),
                                           "sensitive_accuracy": None, "signal_norm": delta,
                                           "lam": float(alpha)})


#: The most candidate heads (α grid + the incoming head) a private refit chooses among: the
#: choice is the one outcome of its ``select`` evaluations that leaves, at most log₂ of this
#: in bits per run, so a developer cannot widen that channel with a longer grid.
MAX_DP_CANDIDATES = 8


def _choose(candidates: list, ref_acc: float, max_drop: float, slack: float = 0.0):
    """The fairest candidate (alpha, head, val accuracy, val gap, ...) within ``max_drop`` +
    ``slack`` of ``ref_acc`` (ties: the smaller α), else the most accurate. ``slack``: what the
    noise of two noisy validation accuracies alone can make of their difference
    (:func:`accuracy_noise_slack`), so that a real accuracy loss, not noise, rejects a candidate."""
    ok = [c for c in candidates if c[2] >= ref_acc - max_drop - slack - 1e-12]
    if ok:
        return min(ok, key=lambda c: (c[3], c[0]))
    return max(candidates, key=lambda c: (c[2], -c[0]))


def accuracy_noise_slack(sigma: float, n_groups: int, n: int, z: float = 1.0) -> float:
    """z standard deviations of the difference of two accuracies computed from independently
    noised confusion counts: each accuracy's numerator Σ_g (tn_g + tp_g) carries 2G counts of
    N(0, σ²), so its sd is σ·√(2G)/n, and the difference's √2 times that (the noise on the
    denominator n is second order)."""
    return float(z * math.sqrt(2.0) * sigma * math.sqrt(2.0 * n_groups) / max(n, 1))
