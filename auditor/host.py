"""The auditor's long-lived host: one deployment serving many runs (a FairTune study, several configs).

:class:`AuditorHost` routes each request to the :class:`auditor.service.AuditorService` of its
experiment. The experiment is the auditor's own ``[experiment]`` or, when the auditor's file has
a ``[tune]`` table, any experiment of that search space that the request carries
(``RoundRequest.experiment``, checked by :func:`protocol.trials.admit` and against the request's
fingerprint). Services are keyed by experiment fingerprint and built on first use; they share
one :class:`auditor.service.AuditorShared` (the decoded data, loaded once, the run registry
with ``max_runs``, the privacy ledger), so a new run costs a model build, not a data load. At
most ``max_services`` services are kept in memory (least recently used first out); with
``state_dir`` an evicted experiment's state and cached replies are on disk.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from flwr.app import RecordDict

from fairsplit.protocol.codec import PayloadError
from fairsplit.auditor.config import AuditorConfig
from fairsplit.protocol.config import (
    ConfigError,
    ExperimentConfig,
    experiment_fingerprint,
    experiment_from_json,
)
from fairsplit.protocol.policy import MAX_CONFIG_BYTES, RoundRequest, parse_config_record
from fairsplit.protocol.trials import admit
from fairsplit.protocol.tune import NotAdmitted, TuneConfig

from .service import AuditorService, AuditorShared, ProtocolMismatch

__all__ = ["AuditorHost"]

log = logging.getLogger(__name__)


class AuditorHost:
    """Answers requests for the auditor's experiment and the experiments its search space admits.

    Args:
        exp: the auditor's own ``[experiment]`` (the base of the search space).
        cfg: the auditor's ``[auditor]`` table.
        tune: the auditor's ``[tune]`` table (None: only ``exp`` is served).
        max_services: experiments kept in memory at once (≥ 1).

    Raises:
        ValueError: ``max_services`` < 1; an unreadable ledger or run registry.
    """

    def __init__(self, exp: ExperimentConfig, cfg: AuditorConfig, tune: TuneConfig | None = None,
                 max_services: int = 4):
        if max_services < 1:
            raise ValueError("max_services must be at least 1")
        self.base_exp = exp
        self.cfg = cfg
        self.space = tune.space if tune is not None else None
        self.max_services = max_services
        self.shared = AuditorShared.create(cfg)
        self.base = AuditorService(exp, cfg, shared=self.shared)
        self._services: OrderedDict[str, AuditorService] = OrderedDict({self.base.fingerprint: self.base})
        self.startup_error: Exception | None = None

    def check(self) -> None:
        """The start-up check (:meth:`AuditorService.check_groups`; loads the data). On failure
        the error is kept and every later request is refused with it (its fixed code crosses).

        Raises:
            protocol.metrics.SmallGroupError: with each small group and its size.
        """
        try:
            self.base.check_groups()
        except Exception as err:
            self.startup_error = err
            raise

    def service(self, exp: ExperimentConfig) -> AuditorService:
        """The service of an (already admitted) experiment, built on first use; the model
        weights are the auditor's own file (``exp`` comes without a weights path)."""
        fp = experiment_fingerprint(exp)
        if fp in self._services:
            self._services.move_to_end(fp)
            return self._services[fp]
        local = exp.model_copy(update={"model": exp.model.model_copy(
            update={"weights": self.base_exp.model.weights})})
        svc = AuditorService(local, self.cfg, shared=self.shared)
        self._services[fp] = svc
        while len(self._services) > self.max_services:
            old, _ = self._services.popitem(last=False)
            log.info("experiment %s: service released (least recently used)", old[:12])
        log.info("experiment %s: new service (%d in memory)", fp[:12], len(self._services))
        return svc

    def experiment_of(self, content: RecordDict) -> ExperimentConfig:
        """The experiment a request is for: the one it carries (admitted), else the auditor's own.

        Raises:
            protocol.codec.PayloadError: an unreadable ``config`` record or experiment JSON.
            ProtocolMismatch: the carried experiment's fingerprint is not the request's.
            protocol.tune.NotAdmitted: the carried experiment is outside the search space.
        """
        if not isinstance(content, RecordDict) or "config" not in content.keys():
            raise PayloadError("request: missing ConfigRecord 'config'")
        req = parse_config_record(content["config"], RoundRequest, "config", "request", MAX_CONFIG_BYTES)
        if req.experiment is None:
            return self.base_exp
        try:
            exp = experiment_from_json(req.experiment)
        except ConfigError as err:
            raise PayloadError(f"request: config['experiment'] is not a valid experiment: {err}") from None
        fingerprint = experiment_fingerprint(exp)
        if fingerprint != req.fingerprint:
            raise ProtocolMismatch("request: config['experiment'] does not have the request's fingerprint")
        if fingerprint != self.base.fingerprint:
            admit(self.base_exp, self.space, exp)
        return exp

    def handle(self, message_type: str, content: RecordDict, state: RecordDict | None = None,
               run_id: int | None = None) -> RecordDict:
        """Answer one request with its experiment's service (see :meth:`AuditorService.handle`).

        Raises:
            protocol.tune.NotAdmitted: the request's experiment is outside the search space
                (logged in the audit log under the auditor's own experiment);
            and whatever :meth:`AuditorService.handle` raises.
        """
        if self.startup_error is not None:  # refused at start-up: nothing is evaluated
            self.base.audit_log.write("received", message_type, None, content, type(self.startup_error).__name__,
                                      run_id=run_id)
            raise self.startup_error
        try:
            exp = self.experiment_of(content)
        except (PayloadError, ProtocolMismatch, NotAdmitted) as err:
            log.error("refused request: %s: %s", type(err).__name__, err)
            self.base.audit_log.write("received", message_type, None, content, type(err).__name__, run_id=run_id)
            raise
        return self.service(exp).handle(message_type, content, state, run_id=run_id)
