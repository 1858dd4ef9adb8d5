"""In-processing fairness regularisation on the auditor's labelled data.

R = λ·NormLoss(stat) on the soft predictions p = softmax(h(f_φ(x)))₁ of the auditor's round batch
(fairret, Buyl et al. ICLR 2024, Eq. 5; see :mod:`auditor.methods.fairness_terms`). The auditor
returns ∂R/∂φ for the adapter and ∂R/∂h for the head; the developer adds both to its task
gradients at every local step of the next round.

Constraint form (``bound`` set): λ is the Lagrange multiplier of ``gap ≤ bound`` and follows
projected dual ascent on the auditor's validation gap (Cotter, Jiang & Sridharan 2019, "Two-Player
Games for Efficient Non-Convex Constrained Optimization", Alg. 1 with a fixed step; Tran, Fioretto
& Van Hentenryck 2021, "Differentially Private and Fair Deep Learning: A Lagrangian Dual
Approach", Eq. 7): λ_{r} = max(0, λ_{r−1} + η·(gap_val(φ_r, h_r) − ε)), λ_{−1} = ``lam``, updated
every ``dual_every`` rounds (default ``eval_every``: one validation pass per released report, not
per step). The λ in use is reported in the signal metrics (a function of the validation gap,
which the reports of those rounds show anyway).
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, RecordDict

from protocol.messages import RoundRequest
from protocol.metrics import fairness_report
from protocol.model import adapter_parameters

from .base import AuditorMethod, Release, grad_norm
from .fairness_terms import GAP_METRIC, fairness_violation

DUAL = "fairsplit.penalty_dual"

__all__ = ["Penalty", "validation_gap"]


def validation_gap(ctx, statistic: str) -> float:
    """The fairlearn gap of ``statistic`` on the auditor's validation part at its current model.

    Never released as such (only through the adapted λ).
    """
    part = ctx.data["auditor_val"]
    scores = ctx.model.predict_scores(part.inputs, ctx.exp.eval_batch_size, ctx.cfg.device)
    rep = fairness_report(part.y, scores, part.s, ctx.exp.threshold, 1)
    if GAP_METRIC[statistic] == "accuracy_difference":
        accs = [g["accuracy"] for g in rep["per_group"].values() if g["accuracy"] is not None]
        return float(max(accs) - min(accs))
    value = rep[GAP_METRIC[statistic]]
    return float(value) if value is not None else 0.0


class Penalty(AuditorMethod):
    """Returns ∇_φ R and ∇_h R of the fairret penalty on its round batch (x, y, s)."""

    name = "penalty"

    def lam_for(self, req: RoundRequest, state: RecordDict) -> float:
        """λ for this round: ``lam``, or in the constraint form the dual-ascent multiplier (kept in ``state``)."""
        if self.cfg.bound is None:
            return self.cfg.lam
        every = self.cfg.dual_every or self.ctx.exp.eval_every
        if DUAL in state and req.round - int(state[DUAL]["round"]) < every:
            return float(state[DUAL]["lam"])  # between dual updates: no validation pass
        lam = float(state[DUAL]["lam"]) if DUAL in state else self.cfg.lam
        gap = validation_gap(self.ctx, self.cfg.statistic)
        lam = max(0.0, lam + self.cfg.dual_lr * (gap - self.cfg.bound))
        state[DUAL] = ConfigRecord({"lam": lam, "round": req.round})
        return lam

    def signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """(∇_φ R, ∇_h R) at the received adapter and head; metrics: R, λ, the joint norm."""
        model, device = self.ctx.model, self.ctx.cfg.device
        lam = self.lam_for(req, state)
        b = self.batch(req.round)
        model.eval()
        logits = model(model.prepare(b.inputs, device))
        p = torch.softmax(logits.float(), -1)[:, 1]
        objective = lam * fairness_violation(p, b.s.to(device), b.y.to(device), self.n_groups,
                                             self.cfg.statistic)
        adapter = adapter_parameters(model)
        head = dict(model.head.named_parameters())
        params = [*adapter.values(), *head.values()]
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        out = [(torch.zeros_like(p_) if g is None else g).detach().cpu() for p_, g in zip(params, grads)]
        ga = dict(zip(adapter, out[:len(adapter)]))
        gh = dict(zip(head, out[len(adapter):]))
        return Release(adapter_gradient=ga, head_gradient=gh, metrics={
            "n": int(len(b.s)), "objective": float(objective.detach()), "sensitive_accuracy": None,
            "signal_norm": grad_norm(ga, gh), "lam": lam})
