"""What a run spends: its releases as DP events, their composition and the noise calibration.

Google's ``dp-accounting`` RDP accountant (Mironov 2017), one per part of the auditor's data
(train, val, test are disjoint: parallel composition). :func:`run_events` lists every release a
run of an experiment makes from its request plan; :func:`calibrate_sigma` finds the noise
multiplier that spends a target ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fairsplit.protocol.methods import request_plan
from fairsplit.protocol.privacy import planned_requests

__all__ = ["PARTS", "RDP_ORDERS", "NotPrivate", "RunNoise", "calibrate_sigma", "epsilon", "part_epsilon",
           "run_events"]

PARTS = ("auditor_train", "auditor_val", "auditor_test")
#: RDP orders: integers (the fractional defaults below 2 often fail to converge for large q).
RDP_ORDERS = tuple(range(2, 257)) + (320, 384, 512, 768, 1024)


class NotPrivate(RuntimeError):
    """The method (or its settings) has no differentially private form; refused under DP."""


@dataclass(frozen=True)
class RunNoise:
    """Noise multipliers of one run, per part: σ of the train part's releases (sampled Gaussian
    steps and statistics), σ of the val and of the test reports."""

    train: float
    val: float
    test: float


def _event(kind: str, sigma: float, q: float | None) -> dp_accounting.DpEvent:
    gauss = dp_accounting.GaussianDpEvent(sigma)
    return gauss if kind == "gaussian" else dp_accounting.PoissonSampledDpEvent(q, gauss)


def epsilon(events: list[dict], delta: float) -> float:
    """ε of the composition of ``events`` (dicts with kind, sigma, q, count) at ``delta``."""
    if not events:
        return 0.0
    acc = RdpAccountant(list(RDP_ORDERS))
    acc.compose(_composed(events))
    return float(acc.get_epsilon(delta))


def run_events(exp, n_train: int, noise: RunNoise) -> list[dict]:
    """Every release a run of ``exp`` makes, as ledger events (part, kind, sigma, q, count).

    From :func:`protocol.privacy.planned_requests`: a Gaussian report event on val per
    validation request and on test per test request; for a penalty (stage) signal per round one
    sampled-Gaussian step (gradient and the next step's statistics, combined multiplier σ_train)
    plus one statistics-only release (multiplier √2·σ_train) before the first; the penalty's
    dual ascent one val report per update; last_layer's ``"stats"`` refit: two Gaussian
    releases (counts, clipped feature sums; multiplier σ_train) and one val evaluation per α > 0
    of ``dp_stats_alphas`` plus the incoming head's; its ``"sgd"`` refit: per α of ``dp_alphas``
    ``dp_refit_steps`` gradient steps (multiplier σ_train), one release of the whole training
    part's statistics at the incoming head (Gaussian, multiplier σ_train), and one val evaluation
    per α plus the incoming head's.

    Raises:
        NotPrivate: a stage without a differentially private form.
    """
    method = exp.method
    plan = request_plan(method)
    events: list[dict] = []

    def add(part, kind, sigma, q, count):
        if count:
            events.append({"part": part, "kind": kind, "sigma": float(sigma),
                           "q": None if q is None else float(q), "count": int(count)})

    reqs = planned_requests(exp)
    add("auditor_val", "gaussian", noise.val, None, sum(1 for r in reqs if r[1] == "val"))
    add("auditor_test", "gaussian", noise.test, None, sum(1 for r in reqs if r[1] == "test"))
    first = getattr(method, "first_stage", None)
    stage = first if first is not None else method
    n_signals = sum(1 for r in reqs if r[2] == "signal")
    if stage.name == "penalty":
        q = min(1.0, stage.auditor_batch_size / n_train)
        add("auditor_train", "sampled", noise.train, q, n_signals)
        add("auditor_train", "sampled", noise.train * math.sqrt(2), q, 1 if n_signals else 0)
        if stage.bound is not None:
            every = stage.dual_every or exp.eval_every
            add("auditor_val", "gaussian", noise.val, None, math.ceil(n_signals / every))
    elif stage.name != "erm":
        raise NotPrivate(f"method {stage.name!r} has no differentially private form")
    if plan.final_want == "head":
        if method.constraint == "MMF" or method.balanced:
            raise NotPrivate("last_layer under DP supports constraint EO, DI or AE without balanced")
        if method.dp_refit == "stats":  # counts and sums, once; the incoming head and each α > 0 on val
            if method.constraint not in ("EO", "DI"):
                raise NotPrivate("last_layer's statistics refit supports EO and DI (AE: dp_refit = 'sgd')")
            add("auditor_train", "gaussian", noise.train, None, 2)
            add("auditor_val", "gaussian", noise.val, None, 1 + len({a for a in method.dp_stats_alphas if a > 0}))
            return events
        q = min(1.0, method.dp_batch_size / n_train)
        add("auditor_train", "sampled", noise.train, q, method.dp_refit_steps * len(method.dp_alphas))
        add("auditor_train", "gaussian", noise.train, None, 1)
        add("auditor_val", "gaussian", noise.val, None, len(method.dp_alphas) + 1)
    return events


def part_epsilon(events: list[dict], delta: float) -> dict[str, float]:
    """ε per part of ``events``."""
    return {part: epsilon([e for e in events if e["part"] == part], delta) for part in PARTS}


def _composed(events: list[dict]) -> dp_accounting.DpEvent:
    """The composition of ledger events as one ``dp-accounting`` event."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(_event(e["kind"], e["sigma"], e.get("q")), int(e["count"]))
        for e in events])


def calibrate_sigma(make_events: Callable[[float], list[dict]], target_epsilon: float, delta: float,
                    lo: float = 0.05, hi: float = 5000.0) -> float:
    """The smallest noise multiplier σ whose ``make_events(σ)`` spends at most ``target_epsilon``.

    ``dp_accounting.calibrate_dp_mechanism`` (Brent's method over [``lo``, ``hi``], tolerance
    1e-6 in σ; RDP accountant with :data:`RDP_ORDERS`), then moved up by that tolerance so the
    returned σ is on the private side of the target.

    Raises:
        ValueError: even σ = ``hi`` spends more than the target.
    """
    if epsilon(make_events(hi), delta) > target_epsilon:
        raise ValueError(f"no noise multiplier up to {hi} reaches ε = {target_epsilon}")
    if epsilon(make_events(lo), delta) <= target_epsilon:
        return lo
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: RdpAccountant(list(RDP_ORDERS)), lambda s: _composed(make_events(s)),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(lo, hi), tol=1e-6)
    return float(sigma) + 1e-6
