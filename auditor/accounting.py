"""What a run spends: its releases as DP events, their composition and the noise calibration.

Google's ``dp-accounting`` RDP accountant (Mironov 2017), one per part of the auditor's data
(train, val, test are disjoint: parallel composition). :func:`run_events` lists every release a
run of an experiment makes from its request plan; :func:`calibrate_sigma` finds the noise
multiplier that spends a target ε.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fairsplit.protocol.schedule import planned_requests

__all__ = ["PARTS", "RDP_ORDERS", "SELECT", "NotPrivate", "RunNoise", "StageEvents", "calibrate_sigma", "dp_event",
           "epsilon", "is_report", "part_epsilon", "run_events"]

PARTS = ("auditor_train", "auditor_val", "auditor_test")
#: RDP orders: integers (the fractional defaults below 2 often fail to converge for large q).
RDP_ORDERS = tuple(range(2, 257)) + (320, 384, 512, 768, 1024)


class NotPrivate(RuntimeError):
    """The method (or its settings) has no differentially private form; refused under DP."""


@dataclass(frozen=True)
class RunNoise:
    """Noise multipliers of one run, per part: σ of the train part's releases (sampled Gaussian
    steps and statistics), σ of the val and of the test reports, and σ of the method's own
    evaluations on the val part (``select``: last_layer's α chosen inside the auditor, where only
    the choice leaves; ``None``: the val reports' σ)."""

    train: float
    val: float
    test: float
    select: float | None = None

    @property
    def select_sigma(self) -> float:
        """σ of the method's own val evaluations."""
        return self.val if self.select is None else self.select


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


#: One stage's own releases: ``(stage config, experiment, n_train, noise) -> events``; the
#: auditor's method table answers it (:func:`auditor.methods.dp_events`).
StageEvents = Callable[[Any, Any, int, RunNoise], list[dict]]


#: ``use`` of an event that is a method's own evaluation on the val part, whose outcome leaves
#: only as a choice (last_layer's α): not a report the developer points at its own heads, so it does
#: not count against a report part's cap (:meth:`auditor.ledger.Ledger.part_budget`).
SELECT = "select"


def dp_event(part: str, kind: str, sigma: float, q: float | None, count: int, use: str | None = None) -> list[dict]:
    """``count`` releases on ``part`` as one ledger event (none when ``count`` is 0): ``kind``
    ``"gaussian"`` (multiplier ``sigma``) or ``"sampled"`` (Poisson rate ``q``); ``use``
    :data:`SELECT` for a method's own evaluation (else a release as it is)."""
    if not count:
        return []
    event = {"part": part, "kind": kind, "sigma": float(sigma), "q": None if q is None else float(q),
             "count": int(count)}
    return [{**event, "use": use}] if use else [event]


def is_report(event: dict) -> bool:
    """Whether ``event`` counts against a report part's cap: a val or test release that is not
    a method's own evaluation (:data:`SELECT`)."""
    return event["part"] != "auditor_train" and event.get("use") != SELECT


def run_events(exp, n_train: int, noise: RunNoise, stage_events: StageEvents) -> list[dict]:
    """Every release a run of ``exp`` makes, as ledger events (part, kind, sigma, q, count).

    From :func:`protocol.schedule.planned_requests`: a Gaussian report event on val per
    validation request and on test per test request; then each stage's own releases,
    ``stage_events`` of the first stage (``first_stage``, if the method has one) and of the
    method (each method's :meth:`auditor.methods.base.AuditorMethod.dp_events` says what it
    spends: penalty's signals, last_layer's refit).

    Raises:
        NotPrivate: a stage without a differentially private form (from ``stage_events``).
    """
    reqs = planned_requests(exp)
    events = dp_event("auditor_val", "gaussian", noise.val, None, sum(1 for r in reqs if r[1] == "val"))
    events += dp_event("auditor_test", "gaussian", noise.test, None, sum(1 for r in reqs if r[1] == "test"))
    first = getattr(exp.method, "first_stage", None)
    for stage in ([first] if first is not None else []) + [exp.method]:
        events += stage_events(stage, exp, n_train, noise)
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
