"""The DP gate: what every answer of the auditor spends, and the checks before anything is spent.

Under differential privacy (``docs/privacy.md``) one :class:`PrivacyGate` per experiment:

* checks that the method has a private form (``E_NOT_PRIVATE``), that the request is in the
  run's plan and comes in its order (``E_OUT_OF_PLAN``), and charges the run's whole plan to the
  ledger when the run starts (``E_BUDGET``, ``max_runs``);
* answers a request it answered before with the stored reply (one answer per request key);
* binds the auditor's secret to the answer's release number while the answer is computed, so
  every draw of noise is fresh per release and unknown to the developer;
* calibrates this run's noise multipliers from its plan, notes each release (:meth:`spend`),
  computes the reports from noisy counts, and zeroes non-finite entries of a release.

Without DP the same object registers runs, computes exact reports and notes the releases, so
both modes share one code path.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from flwr.app import RecordDict

from fairsplit.protocol.codec import payload_digest
from fairsplit.auditor.config import AuditorConfig
from fairsplit.protocol.config import ExperimentConfig
from fairsplit.protocol.data import Dataset
from fairsplit.protocol.methods import METHODS
from fairsplit.protocol.metrics import SmallGroupError, confusion_counts, fairness_report, report_from_counts
from fairsplit.protocol.schedule import planned_requests

from . import privacy as P
from .context import Release

__all__ = ["PrivacyGate", "sanitised"]

log = logging.getLogger(__name__)


def released_report(report: dict, dp: bool) -> dict:
    """``report`` as it crosses to the developer: under DP without its per-group table
    (``per_group`` empty). Every aggregate metric, computed inside the auditor from the noisy
    counts, crosses; the groups' own rates and sizes stay in. A signed per-group rate turns a
    crafted head into a statistical query about the groups' difference along any direction
    the developer picks (Hamman et al. 2023; ``bench/leakage.py: report_sq``), answered
    nearly exactly by counts over hundreds of people whatever ε; the aggregates (gaps as
    absolute differences, the worst group's accuracy without its name) do not carry that
    sign.

    Args:
        report: a ``FairnessReport`` as a dict (``protocol.metrics.fairness_report``).
        dp: whether the auditor's releases are differentially private.
    """
    return {**report, "per_group": {}} if dp else report


class PrivacyGate:
    """The privacy side of one experiment's answers.

    Args:
        exp, cfg: the experiment and the auditor's config (``cfg.privacy``: DP settings).
        shared: :class:`auditor.service.AuditorShared` (run registry, ledger, secret, stored
            replies), shared by every experiment the auditor serves.
        fingerprint: the experiment's fingerprint.
        data: returns the auditor's parts (loaded on first use).
        stage_events: what each stage of the method spends (:func:`auditor.methods.dp_events`,
            read from the method table; :func:`auditor.accounting.run_events`).
    """

    def __init__(self, exp: ExperimentConfig, cfg: AuditorConfig, shared, fingerprint: str,
                 data: Callable[[], dict[str, Dataset]], stage_events: P.StageEvents):
        self.exp, self.cfg, self.shared, self.fingerprint, self._data = exp, cfg, shared, fingerprint, data
        self.stage_events = stage_events
        self.dp = cfg.privacy.enabled
        self.ledger = shared.ledger
        self.spent: list[dict] = []  # every release this gate let out (ledger events; = the plan, tested)
        self.pending: list[dict] = []  # the releases of the answer being computed
        self._noise: P.RunNoise | None = None
        # the secret as the current answer sees it (bound to its release number); none outside
        self.secret: P.AuditorSecret | P.NoRelease | None = P.NoRelease() if self.dp else None

    # -- one answer ---------------------------------------------------------------------------
    def answer(self, key: tuple, content: RecordDict, compute: Callable[[], tuple[RecordDict, RecordDict | None]],
               keep: Callable[[RecordDict], None]) -> tuple[RecordDict, bool]:
        """Answer the request ``key`` = (round, split, want) whose payload is ``content``.

        ``compute()`` returns the reply and the round's state to keep (or None); ``keep(work)``
        stores that state, called only once the answer may leave (under DP: once paid for).

        Returns:
            (reply, cached): ``cached`` when the reply is the stored answer to an earlier request.

        Raises:
            auditor.privacy.NotPrivate, OutOfPlan, BudgetExceeded, RunLimitExceeded.
        """
        if not self.dp:
            self.register_run()
            reply, work = self._computed(compute)
            self.spent.extend(self.pending)
            if work is not None:
                keep(work)
            return reply, False
        store = self.shared.privacy
        cached = store.reply(self.fingerprint, key)
        if cached is not None:  # answered once: any request for this key gets the stored reply
            return cached, True
        self.check_private()
        with store.lock:  # the plan check, the charge and the reservation as one step
            self.check_plan(key)
            self.register_run()
            release, charge = self.ledger.reserve(self.fingerprint, key, payload_digest(content)["sha256"])
        self.secret = self.shared.secret.for_release(self.ledger.noise_key(release))
        try:
            reply, work = self._computed(compute)
        finally:
            self.secret = P.NoRelease()
        if charge:  # a different request for a key answered before: a new release, paid now
            log.warning("experiment %s: request (round %d, %s, %s) answered before with another "
                        "payload; its answer was lost: answered anew as release %d and charged",
                        self.fingerprint[:12], *key, release)
            self.ledger.pay(release, self.pending, "a second answer to an answered request")
        if work is not None:  # the round's state, only once its release is paid for
            keep(work)
        self.spent.extend(self.pending)
        store.store_reply(self.fingerprint, key, reply)
        return reply, False

    def _computed(self, compute):
        self.pending = []
        return compute()

    def sanitised(self, release: Release) -> Release:
        """``release`` as it may leave: under DP non-finite entries become 0 (:func:`sanitised`)."""
        return sanitised(release) if self.dp else release

    # -- what an answer spends ------------------------------------------------------------------
    @property
    def noise(self) -> P.RunNoise:
        """This run's noise multipliers per part: those the ledger charged the experiment at, once
        registered; before that calibrated from the run's plan so the planned run spends
        :meth:`PrivacyConfig.part_target` on each part (at ``delta``), or the configured ones."""
        if self._noise is None and self.ledger is not None:
            stored = self.ledger.noise.get(self.fingerprint)
            if stored is not None:  # charged at these: a changed config must not change them
                self._noise = P.RunNoise(stored["train"], stored["val"], stored["test"], stored.get("select"))
        if self._noise is None:
            pc = self.cfg.privacy
            n_train = len(self._data()["auditor_train"])
            if not pc.calibrate:
                self._noise = P.RunNoise(pc.noise_multiplier, pc.report_noise_multiplier,
                                         pc.report_noise_multiplier, pc.report_noise_multiplier)
            else:
                self._noise = self._calibrated(pc, n_train)
            log.info("noise multipliers: train %.3f, val %.3f, test %.3f, the method's val evaluations "
                     "%.3f", self._noise.train, self._noise.val, self._noise.test, self._noise.select_sigma)
        return self._noise

    def _calibrated(self, pc, n_train: int) -> P.RunNoise:
        """The noise multipliers at which the planned run spends :meth:`PrivacyConfig.part_target`
        on each part's releases; on the val part the reports first (their target), then the
        method's own evaluations (``select``) so that reports and evaluations together spend
        ``target_epsilon``. With ``report_epsilon_fraction = 1`` both share one σ."""
        def events(noise: P.RunNoise, part: str, which=lambda e: True) -> list[dict]:
            return [e for e in P.run_events(self.exp, n_train, noise, self.stage_events)
                    if e["part"] == part and which(e)]

        split = pc.report_epsilon_fraction < 1.0
        sigmas = {}
        for part in P.PARTS:
            default = pc.noise_multiplier if part == "auditor_train" else pc.report_noise_multiplier
            which = P.is_report if split and part != "auditor_train" else (lambda e: True)

            def plan(s, part=part, which=which):
                return events(P.RunNoise(s, s, s, None if split else s), part, which)
            sigmas[part] = P.calibrate_sigma(plan, pc.part_target(part), pc.delta) if plan(1.0) else default
        noise = P.RunNoise(sigmas["auditor_train"], sigmas["auditor_val"], sigmas["auditor_test"], sigmas["auditor_val"])
        if split:
            def with_select(s):
                return events(P.RunNoise(noise.train, noise.val, noise.test, s), "auditor_val")
            if [e for e in with_select(1.0) if not P.is_report(e)]:
                noise = P.RunNoise(noise.train, noise.val, noise.test,
                                   P.calibrate_sigma(with_select, pc.target_epsilon, pc.delta))
        return noise

    def planned_events(self) -> list[dict]:
        """Every release this experiment's run makes (ledger events), from its request plan."""
        events = P.run_events(self.exp, len(self._data()["auditor_train"]), self.noise, self.stage_events)
        return [{"fingerprint": self.fingerprint, **e} for e in events]

    def spend(self, part: str, kind: str, sigma: float, q: float | None = None, count: int = 1,
              use: str | None = None) -> None:
        """Note a release the current answer makes (checked against the plan by the tests);
        ``use``: :data:`auditor.accounting.SELECT` for a method's own evaluation."""
        self.pending.extend({"fingerprint": self.fingerprint, **e}
                            for e in P.dp_event(part, kind, sigma, q, count, use))

    def status(self) -> dict:
        """The reply's ``privacy`` record (:class:`protocol.privacy.PrivacyStatus`)."""
        if not self.dp:
            return {"dp": False}
        pc = self.cfg.privacy
        return {"dp": True, "epsilon_run": self.ledger.epsilon(self.fingerprint),
                "epsilon_total": self.ledger.epsilon(), "epsilon_budget": pc.epsilon_budget,
                "delta": pc.delta}

    def audit_fields(self) -> dict:
        """The ε fields of every audit line (none without DP)."""
        if not self.dp:
            return {}
        return {"epsilon_run": round(self.ledger.epsilon(self.fingerprint), 6),
                "epsilon_total": round(self.ledger.epsilon(), 6)}

    def report(self, part_name: str, scores: np.ndarray, key: tuple, select: bool = False) -> dict:
        """The report on one part at ``scores``: exact (no DP) or from noisy counts (DP).

        Under DP: the groups' true sizes are checked against ``min_group_size`` first (their
        sizes are fixed by the part, whatever model is sent), then Gaussian noise of σ = this
        run's multiplier for the part goes on the per-group confusion counts, and every rate is
        computed from the noisy counts; non-finite scores count as negative predictions.
        ``select``: a method's own evaluation on the val part (last_layer's α chosen inside the
        auditor; only the choice leaves), at the run's ``select`` σ and not counted as a report.

        Raises:
            SmallGroupError: a group of the part below ``min_group_size``.
        """
        part = self._data()[part_name]
        if not self.dp:
            return fairness_report(part.y, scores, part.s, self.exp.threshold, self.cfg.min_group_size)
        groups, sizes = np.unique(np.asarray(part.s).astype(str), return_counts=True)
        small = [str(g) for g, c in zip(groups, sizes) if c < self.cfg.min_group_size]
        if small:
            raise SmallGroupError(f"{part_name}: group(s) {small} below min_group_size="
                                  f"{self.cfg.min_group_size}")
        if select and part_name != "auditor_val":
            raise ValueError(f"a method's own evaluations are on auditor_val, not {part_name}")
        sigma = self.noise.select_sigma if select else getattr(self.noise, part_name.removeprefix("auditor_"))
        counts = confusion_counts(part.y, scores, part.s, self.exp.threshold)
        noisy = P.noisy_counts(counts, sigma, self.secret.rng(self.fingerprint, part_name, *key))
        self.spend(part_name, "gaussian", sigma, use=P.SELECT if select else None)
        return report_from_counts(noisy, min_n=self.cfg.min_group_size)

    def released_report(self, report: dict) -> dict:
        """``report`` as it crosses to the developer (``released_report`` with this gate's DP)."""
        return released_report(report, self.dp)

    # -- checks before anything is spent --------------------------------------------------------
    def check_private(self) -> None:
        """Under DP: the method has a private form and a batch of at least ``min_batch_size``.

        Raises:
            auditor.privacy.NotPrivate: naming the setting.
        """
        stage = getattr(self.exp.method, "first_stage", None) or self.exp.method
        size = getattr(stage, "auditor_batch_size", None)
        if size is not None and size < self.cfg.privacy.min_batch_size:
            raise P.NotPrivate(f"auditor_batch_size {size} < min_batch_size "
                               f"{self.cfg.privacy.min_batch_size}")
        if not METHODS[stage.name].private or not METHODS[self.exp.method.name].private:
            raise P.NotPrivate(f"method {stage.name!r} has no differentially private form")
        self.planned_events()  # raises NotPrivate for unsupported settings

    def check_plan(self, key: tuple) -> None:
        """Under DP: ``key`` is in the run's plan and no later request of the plan was answered.

        Raises:
            auditor.privacy.OutOfPlan: naming the request.
        """
        plan = planned_requests(self.exp)
        if key not in plan:
            raise P.OutOfPlan(f"request (round {key[0]}, split {key[1]!r}, want {key[2]!r}) is not "
                              f"in this experiment's plan of {len(plan)} requests")
        done = [plan.index(k) for k in self.answered_keys() if k in plan]
        if done and plan.index(key) < max(done):
            raise P.OutOfPlan(f"request (round {key[0]}, split {key[1]!r}, want {key[2]!r}) comes "
                              "after a later request of the plan was answered")

    def register_run(self) -> None:
        """Count a new experiment against ``max_runs``; under DP charge its whole plan to the ledger.

        Raises:
            RunLimitExceeded, BudgetExceeded.
        """
        runs = self.shared.runs
        if self.fingerprint in runs:
            return
        runs.check(self.fingerprint)
        if self.dp:
            planned = self.planned_events()  # the whole plan is charged when the run starts
            n = self.noise
            self.ledger.register_run(self.fingerprint, planned, {"train": n.train, "val": n.val, "test": n.test,
                                                                 "select": n.select_sigma},
                                     "this run's planned releases")
        number = runs.register(self.fingerprint)
        log.info("run %d of at most %d: experiment %s", number, self.cfg.max_runs,
                 self.fingerprint[:12])

    def answered_keys(self) -> list[tuple]:
        """Under DP: the (round, split, want) keys of this experiment answered so far (from the
        ledger's journal, shared by every service and process of the state_dir), sorted."""
        return self.ledger.reserved_keys(self.fingerprint) if self.dp else []


def sanitised(r: Release) -> Release:
    """Non-finite entries of a DP release become 0 (a crafted model must not turn NaN into an
    error, which would answer a question about the data); the noise is already added."""
    metrics = {k: (0.0 if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.metrics.items()}
    return replace(r.map_tensors(lambda d: {k: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
                                           for k, v in d.items()}), metrics=metrics)
