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

import logging
import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fairsplit.protocol.messages import RoundRequest
from fairsplit.protocol.metrics import fairness_report
from fairsplit.protocol.model import adapter_parameters
from fairsplit.protocol.schedule import planned_requests

from ..accounting import RunNoise, dp_event
from . import common as C
from .base import AuditorMethod, Release, grad_norm
from .fairness_terms import GAP_METRIC, fairness_violation
from .private_signal import noisy_mean_gradient

DUAL = "fairsplit.penalty_dual"
STATS = "fairsplit.penalty_dp_stats"  # the noisy cell statistics released with the last signal

log = logging.getLogger(__name__)

__all__ = ["Penalty", "dead_zone", "validation_gap"]

#: :func:`auditor.mechanisms.cell_violation`'s dead zone, in noise standard deviations
DEAD_ZONE_Z = 3.0


def dead_zone(sigma: float, batch: float, n_groups: int, z: float = DEAD_ZONE_Z) -> float:
    """The smallest relative gap |r_g − 1| the DP signal can act on, for a typical cell.

    Under DP each cell statistic (count n_c, sum S_c of p) carries noise of sd 2σ (gradient and
    statistics each at multiplier σ√2, :func:`auditor.mechanisms.noisy_cell_stats`), and a
    group's gap r_g − 1 within ``z`` sd of r_g gives no gradient (:func:`cell_violation`). With
    the expected cell of a batch of ``batch`` examples split evenly over ``n_groups`` × 2 labels,
    n = B / 2G, and a mean prediction of 1/2, S = n / 2, the delta method as
    :func:`cell_violation` applies it gives sd(r_g) ≈ 2σ·√(1/S² + 1/n²), and the returned bound
    is z·sd(r_g) (dimensionless; e.g. 0.3: a group whose rate differs by less than 30 % from the
    overall rate gives no gradient). That sd leaves out the overall rate's share of the group's
    own noise; the ratio's true sd is about √(1 − 1/G) of it (simulated in the tests). Computed
    from the plan alone (σ, the batch, the number of groups): no data.

    Raises:
        ValueError: ``batch`` ≤ 0 or ``n_groups`` < 1.
    """
    if batch <= 0 or n_groups < 1:
        raise ValueError("dead_zone needs batch > 0 and n_groups >= 1")
    n = batch / (2 * n_groups)
    return z * 2.0 * sigma * math.sqrt(1.0 / (n / 2) ** 2 + 1.0 / n ** 2)


def validation_gap(ctx, statistic: str, round_: int = 0) -> float:
    """The fairlearn gap of ``statistic`` on the auditor's validation part at its current model.

    Never released as such (only through the adapted λ). Under the auditor's DP it is computed
    from noisy validation counts (one report-sized release, charged to the val part).
    """
    part = ctx.data["auditor_val"]
    scores = ctx.model.predict_scores(part.inputs, ctx.exp.eval_batch_size, ctx.cfg.device)
    if ctx.gate.dp:
        rep = ctx.gate.report("auditor_val", scores, ("dual", round_))
    else:
        rep = fairness_report(part.y, scores, part.s, ctx.exp.threshold, 1)
    if GAP_METRIC[statistic] == "accuracy_difference":
        accs = [g["accuracy"] for g in rep["per_group"].values() if g["accuracy"] is not None]
        return float(max(accs) - min(accs)) if accs else 0.0
    value = rep[GAP_METRIC[statistic]]
    return float(value) if value is not None else 0.0


class Penalty(AuditorMethod):
    """Returns ∇_φ R and ∇_h R of the fairret penalty on its round batch (x, y, s)."""

    name = "penalty"

    @classmethod
    def dp_events(cls, cfg, exp, n_train: int, noise: RunNoise) -> list[dict]:
        """Per signal request one sampled-Gaussian step (the gradient and the next step's
        statistics, combined multiplier σ_train, rate q = batch / n_train), plus one
        statistics-only release (multiplier √2·σ_train) before the first; with a ``bound``, the
        dual ascent's one val report per update."""
        n_signals = sum(1 for r in planned_requests(exp) if r[2] == "signal")
        q = min(1.0, cfg.auditor_batch_size / n_train)
        events = dp_event("auditor_train", "sampled", noise.train, q, n_signals)
        events += dp_event("auditor_train", "sampled", noise.train * math.sqrt(2), q, 1 if n_signals else 0)
        if cfg.bound is not None:
            every = cfg.dual_every or exp.eval_every
            # a report, not a selection: λ moves with the gap, and every later signal's scale with λ
            events += dp_event("auditor_val", "gaussian", noise.val, None, math.ceil(n_signals / every))
        return events

    def lam_for(self, req: RoundRequest, state: RecordDict) -> float:
        """λ for this round: ``lam``, or in the constraint form the dual-ascent multiplier (kept in ``state``)."""
        if self.cfg.bound is None:
            return self.cfg.lam
        every = self.cfg.dual_every or self.ctx.exp.eval_every
        if DUAL in state and req.round - int(state[DUAL]["round"]) < every:
            return float(state[DUAL]["lam"])  # between dual updates: no validation pass
        lam = float(state[DUAL]["lam"]) if DUAL in state else self.cfg.lam
        gap = validation_gap(self.ctx, self.cfg.statistic, req.round)
        lam = max(0.0, lam + self.cfg.dual_lr * (gap - self.cfg.bound))
        state[DUAL] = ConfigRecord({"lam": lam, "round": req.round})
        return lam

    def signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """(∇_φ R, ∇_h R) at the received adapter and head; metrics: R, λ, the joint norm.

        Under the auditor's DP: :meth:`private_signal`.
        """
        if self.ctx.gate.dp:
            return self.private_signal(req, state)
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

    def private_signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """The DP form of the signal: clipped per-example gradients of the linearised penalty.

        On a Poisson sample (rate q = ``auditor_batch_size`` / N, drawn from the auditor's
        secret) each example i contributes ℓ_i = λ·B·w_{c(i)}·p_i, where w = ∂NormLoss/∂S at the
        noisy per-(group, label) statistics released with the previous round's signal
        (:func:`auditor.privacy.cell_weights`; before round 0's signal one statistics-only
        release) and B = qN, so that (1/B)·Σ_i ∇ℓ_i = ∇R at exact statistics. Each ∇ℓ_i (adapter
        and head together) is clipped to C, the sum gets N(0, 2σ²C²) and is divided by B; the
        batch's statistics at the received model are released with the same noise multiplier for
        the next round: one sampled Gaussian step of multiplier σ (the run's train σ).
        The reported objective is λ·NormLoss at the noisy statistics used.
        """
        from .. import privacy as P

        ctx, model, device = self.ctx, self.ctx.model, self.ctx.cfg.device
        pc, sigma = ctx.cfg.privacy, ctx.gate.noise.train
        m = sigma * math.sqrt(2.0)  # gradient and statistics each; combined multiplier σ
        lam = self.lam_for(req, state)
        train = ctx.data["auditor_train"]
        n_all = len(train)
        q = min(1.0, self.cfg.auditor_batch_size / n_all)
        b_exp = q * n_all
        rng = ctx.gate.secret.rng(ctx.fingerprint, "penalty", req.round)
        gen = ctx.gate.secret.generator(ctx.fingerprint, "penalty", req.round)
        s_all, y_all = torch.as_tensor(ctx.train_codes), torch.as_tensor(train.y)
        model.eval()

        def probs(idx):
            with torch.no_grad():
                return torch.softmax(model(model.prepare(C._inputs(train.inputs, idx), device)).float(), -1)[:, 1].cpu()

        if STATS in state:
            n_c, S_c = (state[STATS].to_torch_state_dict()[k].double() for k in ("n", "S"))
        else:  # the first signal: a statistics-only release at the received model
            zone = dead_zone(sigma, b_exp, self.n_groups)
            log.log(logging.WARNING if zone >= 0.5 else logging.INFO,
                    "DP penalty: at noise multiplier %.2f and an expected batch of %.0f, a group "
                    "gap |r_g - 1| below about %.2f gives no gradient (bench/penalty_snr.py sizes "
                    "the batch and the rounds)", sigma, b_exp, zone)
            idx0 = P.poisson_indices(n_all, q, rng)
            n_c, S_c = P.noisy_cell_stats(probs(idx0), s_all[idx0], y_all[idx0], self.n_groups, m, gen)
            ctx.gate.spend("auditor_train", "sampled", m, q)
        w, violation = P.cell_weights(n_c, S_c, self.cfg.statistic, noise_sd=m * math.sqrt(2.0), z=DEAD_ZONE_Z)
        idx = P.poisson_indices(n_all, q, rng)
        cells = (s_all[idx] * 2 + y_all[idx]).long()
        coef = (lam * b_exp * w[cells]).float().to(device)
        x = model.prepare(C._inputs(train.inputs, idx), device) if len(idx) else torch.zeros(0)
        ga, gh, clipped = noisy_mean_gradient(
            model, x, lambda logits, c: c * torch.softmax(logits, -1)[1], (coef,), clip_norm=pc.clip_norm,
            sigma=m, b_exp=b_exp, generator=gen, head=True)
        n_next, S_next = P.noisy_cell_stats(probs(idx) if len(idx) else torch.zeros(0), s_all[idx],
                                            y_all[idx], self.n_groups, m, gen)
        ctx.gate.spend("auditor_train", "sampled", sigma, q)
        state[STATS] = ArrayRecord({"n": n_next.float(), "S": S_next.float()})
        log.info("round %d: DP penalty signal, %d examples, %.0f %% clipped", req.round, len(idx), 100 * clipped)
        return Release(adapter_gradient=ga, head_gradient=gh, metrics={
            "n": int(self.cfg.auditor_batch_size), "objective": float(lam * violation),
            "sensitive_accuracy": None, "signal_norm": grad_norm(ga, gh), "lam": lam})
