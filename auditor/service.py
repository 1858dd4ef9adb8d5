"""The auditor's side of the protocol: answer the developer's round requests on its own data.

:class:`AuditorService` is transport-free: the Flower ClientApp (:mod:`auditor.clientapp`) and the
co-located reference runner both call :meth:`AuditorService.handle` with a request ``RecordDict``
and send back the ``RecordDict`` it returns. Everything that leaves the auditor passes
:func:`protocol.messages.make_reply`, which admits only the records the request asked for:
aggregate metrics, and an adapter-shaped signal or per-module update.

Order of checks on every request: payload records/keys/shapes/dtypes/finiteness, message type,
experiment fingerprint and method; only then is the auditor's data read (lazily, once per
process).

The service keeps request checks and dispatch; around it: the per-round state snapshots that
make every answer repeatable (:mod:`auditor.snapshots`), the DP gate that checks, charges and
noises what leaves (:mod:`auditor.gate`), the audit log (:mod:`auditor.audit_log`), and the
:class:`auditor.context.MethodContext` the methods see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict

from fairsplit.protocol.conditional import GatedModel, build_gated
from fairsplit.auditor.config import AuditorConfig
from fairsplit.protocol.config import ExperimentConfig, experiment_fingerprint
from fairsplit.protocol.data import Dataset, load_split
from fairsplit.protocol.messages import RoundRequest, make_reply, message_type_for, parse_request
from fairsplit.protocol.methods import METHODS, request_plan
from fairsplit.protocol.metrics import SmallGroupError
from fairsplit.protocol.policy import refit_basis_spec
from fairsplit.protocol.model import (
    FairsplitModel,
    adapter_state,
    build_model,
    head_state,
    load_adapter_state,
    resolve_image_size,
    state_spec,
    update_spec,
)

from . import methods as M
from . import privacy as P
from .audit_log import AuditLog, now, request_round
from .context import Release, RoundBatch
from .gate import PrivacyGate
from .methods import REGISTRY, AuditorMethod, ProtocolMismatch
from .snapshots import KEEP_ROUNDS, Snapshots, StateUnavailable
from .state import PrivacyState, PrivacyStateError

__all__ = ["AuditorService", "AuditorShared", "KEEP_ROUNDS", "ProtocolMismatch", "StateUnavailable"]

log = logging.getLogger(__name__)

@dataclass
class AuditorShared:
    """What every experiment the auditor serves shares: the privacy state (run registry with
    ``max_runs``, the privacy ledger with its journal of answers, the secret, the stored
    replies: :class:`auditor.state.PrivacyState`), and the decoded data (loaded once per
    partition and input size, then reused by every experiment's :class:`AuditorService`).

    A service can be evicted and rebuilt, or the process restarted: what bounds the developer's
    knowledge is here and on disk, never in a service object."""

    runs: P.RunRegistry
    ledger: P.Ledger | None
    secret: P.AuditorSecret | None
    privacy: PrivacyState | None = None
    data: dict = field(default_factory=dict)  # (partition, image size) → parts

    @classmethod
    def create(cls, cfg: AuditorConfig) -> "AuditorShared":
        """From the auditor's config: the privacy state in ``state_dir``.

        Without ``state_dir`` only an auditor without DP runs (its run registry in memory); under
        DP the launchers choose one (``fairsplit auditor``: :func:`auditor.state.default_state_dir`;
        ``fairsplit run`` and the co-located runner: ``OUT/auditor``).

        Raises:
            auditor.state.PrivacyStateError: DP without ``state_dir``; a state_dir that is not
                writable, or whose privacy files are damaged or incomplete.
        """
        if cfg.state_dir is None:
            if cfg.privacy.enabled:
                raise PrivacyStateError(
                    "under differential privacy the auditor keeps its ledger, run registry, "
                    "secret and answers on disk: set [auditor] state_dir (fairsplit auditor, "
                    "fairsplit run and the co-located runner choose one when it is unset)")
            return cls(runs=P.RunRegistry(cfg.max_runs), ledger=None, secret=None)
        state = PrivacyState(Path(cfg.state_dir), cfg.max_runs, cfg.privacy)
        return cls(runs=state.runs, ledger=state.ledger, secret=state.secret, privacy=state)

    def load_data(self, cfg: AuditorConfig, exp: ExperimentConfig) -> dict[str, Dataset]:
        """The auditor's parts for ``exp`` (cached by partition and input size).

        Raises:
            protocol.data.DataError: unusable data.
        """
        size = resolve_image_size(exp.model)
        key = (exp.partition.model_dump_json(), size)
        if key not in self.data:
            cache = Path(cfg.cache_dir) if cfg.cache_dir else None
            self.data[key] = load_split(cfg.data, exp, "auditor", size, cache)
        return self.data[key]


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a configuration warning once per process (a host builds one service per experiment)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


class AuditorService:
    """Answers the developer's requests on the auditor's data.

    Args:
        exp: the shared experiment config (the auditor's own copy).
        cfg: the auditor's own config (data with sensitive attributes, ``min_group_size``,
            optional ``state_dir``).
        keep_rounds: how many per-round state snapshots to keep (the latest rounds).

    The model and data are built on first use and cached for the life of the process.

    With ``cfg.state_dir`` set, the service writes ``state_dir/<fingerprint>/state.pt`` (the
    per-round snapshots, :mod:`auditor.snapshots`) and ``state_dir/audit.jsonl`` (one line per
    payload, :mod:`auditor.audit_log`).

    Raises:
        ValueError: ``keep_rounds`` < 1.
    """

    def __init__(self, exp: ExperimentConfig, cfg: AuditorConfig, keep_rounds: int = KEEP_ROUNDS,
                 shared: "AuditorShared | None" = None):
        self.exp = exp
        self.cfg = cfg
        self.fingerprint = experiment_fingerprint(exp)
        state_dir = Path(cfg.state_dir) if cfg.state_dir is not None else None
        self.snapshots = Snapshots(self.fingerprint, state_dir / self.fingerprint / "state.pt" if state_dir else None,
                                   keep_rounds)  # checks keep_rounds before anything is written
        self.shared = shared if shared is not None else AuditorShared.create(cfg)
        self._model: FairsplitModel | None = None
        self._gated: GatedModel | None = None
        self.cond_spec = self.detector_spec = self.refit_basis_spec = None
        self._refit_basis: dict[str, torch.Tensor] | None = None
        self._data: dict[str, Dataset] | None = None
        self._method: AuditorMethod | None = None
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        #: the DP gate (docs/privacy.md): checks, charges and noises everything that leaves
        self.gate = PrivacyGate(exp, cfg, self.shared, self.fingerprint, lambda: self.data, M.dp_events)
        self.audit_log = AuditLog(state_dir / "audit.jsonl" if state_dir else None, self.fingerprint,
                                  self.gate.audit_fields)
        if not self.gate.dp:
            _warn_once("[auditor.privacy] enabled = false: releases are exact, not differentially "
                       "private, and the developer can simulate the auditor's random draws; for "
                       "controlled studies only")
        if exp.partition.mode == "shared_source":
            _warn_once("partition mode 'shared_source': the developer holds the auditor's inputs "
                       "(controlled studies only; a deployment uses mode = 'own_data')")

    @property
    def model(self) -> FairsplitModel:
        """The shared backbone + LoRA + head (built once)."""
        if self._model is None:
            with torch.random.fork_rng():  # leave the caller's RNG (co-located developer) alone
                self._model = build_model(self.exp).to(self.cfg.device)
            self.adapter_spec = state_spec(adapter_state(self._model))
            self.head_spec = state_spec(head_state(self._model))
            self.update_spec = update_spec(self._model)
            if METHODS[self.exp.method.name].gated:  # FairNet: conditional LoRA + detector
                with torch.random.fork_rng():
                    self._gated = build_gated(self._model, self.exp).to(self.cfg.device)
                self.cond_spec, self.detector_spec = self._gated.contracts()
            k = getattr(self.exp.method, "dp_subspace_dim", None)  # last_layer: the head refit's basis
            self.refit_basis_spec = refit_basis_spec(self.head_spec, k) if k is not None else None
        return self._model

    @property
    def gated(self) -> GatedModel | None:
        """FairNet's gated model around :attr:`model` (gated methods), else None."""
        self.model  # noqa: B018 - builds it
        return self._gated

    @property
    def data_loaded(self) -> bool:
        """Whether the auditor's data has been read (a refused request reads none of it)."""
        return self._data is not None

    @property
    def data(self) -> dict[str, Dataset]:
        """The auditor's parts: auditor_train, auditor_val, auditor_test (with sensitive groups)."""
        if self._data is None:
            self._data = self.shared.load_data(self.cfg, self.exp)
            codes, names = M.encode_groups(self._data["auditor_train"].s)
            self._train_codes, self._group_names = codes, names
            if len(names) < 2:
                raise ValueError("the auditor's training part has fewer than 2 sensitive groups")
        return self._data

    # ------------------------------------------------------------------------------------
    def handle(self, message_type: str, content: RecordDict, state: RecordDict | None = None,
               run_id: int | None = None) -> RecordDict:
        """Answer one request.

        The request for round r starts from the state snapshot of the latest earlier round (empty
        for round 0), so answering is deterministic: a re-sent request for round r gets the same
        reply as the first time, whatever was answered in between. The unlearning update is
        computed once per experiment and served again, identically, on a repeated request.

        Args:
            message_type: Flower message type (``evaluate`` or ``train``, per the request).
            content: the request's records (see :mod:`protocol.messages`).
            state: where to keep the snapshots when ``cfg.state_dir`` is None: Flower's
                ``context.state`` (it survives the per-message ClientApp processes of one Flower
                run). Ignored when ``cfg.state_dir`` is set (the disk is authoritative); with
                neither, the snapshots live in this object's memory.

        Returns:
            The reply's records, exactly those the request asked for.

        Raises:
            ProtocolMismatch: wrong message type, a different experiment fingerprint or method.
            protocol.codec.PayloadError: the request violates the payload contract.
            protocol.metrics.SmallGroupError: an evaluation group is below ``min_group_size``.
            StateUnavailable: the snapshot the round must start from was discarded (only the last
                ``keep_rounds`` are kept) or lost (no state for a round > 0 of a method other
                than erm), or ``state.pt`` is for another experiment.
            auditor.privacy.RunLimitExceeded: a new experiment beyond ``max_runs``.
            auditor.privacy.BudgetExceeded: the run's planned releases would take the ledger
                past ``epsilon_budget`` (DP).
            auditor.privacy.OutOfPlan: a request that is not in the run's plan, or comes after a
                later round was answered (DP; a repeat gets the cached reply).
            auditor.privacy.NotPrivate: the method has no differentially private form (DP).

        ``run_id``: the Flower run id, for the audit log.
        """
        received_at = now()  # the line is written once the round is known, with this time
        if self.shared.runs.note_run(run_id, self.fingerprint, received_at):
            log.info("Flower run %s: experiment %s", run_id, self.fingerprint[:12])
        try:
            req, reply, cached = self._answer(message_type, content, state)
        except Exception as err:
            log.error("refused request (round %s): %s: %s", request_round(content), type(err).__name__, err)
            self.audit_log.write("received", message_type, request_round(content), content,
                                 type(err).__name__, at=received_at, run_id=run_id)
            raise
        self.audit_log.write("received", message_type, req.round, content, at=received_at, run_id=run_id)
        self.audit_log.write("sent", message_type, req.round, reply, run_id=run_id, cached=cached)
        return reply

    def state_after(self, round_: int, state: RecordDict | None = None) -> RecordDict | None:
        """The state snapshot kept after answering ``round_`` (a copy), or None if there is none.

        ``state``: the caller's RecordDict, as passed to :meth:`handle` (used only without
        ``state_dir``). Snapshots exist only for requests that asked for a signal or update.
        """
        return self.snapshots.after(round_, state)

    def _answer(self, message_type: str, content: RecordDict, state: RecordDict | None
                ) -> tuple[RoundRequest, RecordDict, bool]:
        self.model  # noqa: B018 - builds the model and the payload specs
        gated: dict = {}
        refit: dict = {}
        adapter, head, req = parse_request(content, self.adapter_spec, self.head_spec,
                                           cond_spec=self.cond_spec, detector_spec=self.detector_spec,
                                           gated=gated, refit_basis_spec=self.refit_basis_spec, refit=refit)
        if message_type != message_type_for(req):
            raise ProtocolMismatch(f"message type {message_type!r} does not match the request "
                                   f"(expected {message_type_for(req)!r})")
        if req.fingerprint != self.fingerprint:
            raise ProtocolMismatch(
                "experiment config differs between developer and auditor "
                f"(fingerprint {req.fingerprint[:12]} != {self.fingerprint[:12]})")
        if req.method != self.exp.method.name:
            raise ProtocolMismatch(f"method {req.method!r} != agreed {self.exp.method.name!r}")
        plan = request_plan(self.exp.method)
        if req.want != "none" and req.want not in plan.wants:
            raise ProtocolMismatch(f"method {req.method!r} serves no {req.want!r} request")
        if req.stage != plan.stage[req.want]:
            raise ProtocolMismatch(f"stage {req.stage!r} != agreed {plan.stage[req.want]!r} for "
                                   f"{req.want!r} requests")
        key = (req.round, req.split, req.want)
        self._refit_basis = refit.get("refit_basis")
        reply, cached = self.gate.answer(key, content, lambda: self._compute(req, adapter, head, gated, state),
                                         lambda work: self.snapshots.keep(req.round, work, state))
        return req, reply, cached

    def _compute(self, req: RoundRequest, adapter: dict, head: dict | None, gated: dict,
                 state: RecordDict | None) -> tuple[RecordDict, RecordDict | None]:
        """The answer to ``req`` at the received adapter, head (and gated records): the method's
        release and the report, checked by :func:`protocol.messages.make_reply`, and the state
        to keep after this round (None when the request changes none); the caller keeps it once
        the answer may leave. Under DP every draw uses the gate's secret, bound to this answer's
        release by the gate."""
        model = self.model
        work = self.snapshots.start(req.round, state, request_plan(self.exp.method).round0_want != "none")
        method = self.method
        method.prepare(work)
        load_adapter_state(model, adapter)
        if head is not None:
            model.head.load_state_dict(head)
        if self._gated is not None:
            self._gated.cond.load(gated["cond_adapter"])
            self._gated.detector.load(gated["detector"])

        release = None
        if req.want == "signal":
            release = method.signal(req, work)
        elif req.want == "unlearning_update":
            release = method.update(req, work)
        elif req.want == "head":
            release = method.refit_head(req, work)
        elif req.want == "threshold":
            release = method.choose_threshold(req, work)
        report = None
        if req.split != "none":
            name = "auditor_val" if req.split == "val" else "auditor_test"
            part = self.data[name]
            scorer = model if self._gated is None else self._gated  # gated: at the received τ
            scores = scorer.predict_scores(part.inputs, self.exp.eval_batch_size, self.cfg.device)
            report = self.gate.report(name, scores, ("report", req.round))
            log.info("round %d %s: accuracy %s, DPD %s", req.round, req.split,
                     report["accuracy"], report["demographic_parity_difference"])
        r = self.gate.sanitised(release or Release())
        report = self.gate.released_report(report) if report is not None else None
        reply = make_reply(req, report=report, signal_metrics=r.metrics if release is not None else None,
                           adapter_spec=self.adapter_spec, update_spec=self.update_spec,
                           head_spec=self.head_spec, min_group_size=self.cfg.min_group_size,
                           privacy=self.gate.status(), cond_spec=self.cond_spec, **r.records())
        return reply, (work if req.want != "none" else None)

    # -- what the methods use (auditor.methods.base.AuditorMethod's context) -------------------
    @property
    def method(self) -> AuditorMethod:
        """The experiment's method (:data:`auditor.methods.REGISTRY`), built once."""
        if self._method is None:
            self._method = REGISTRY[self.exp.method.name](self)
        return self._method

    @property
    def group_names(self) -> list[str]:
        """Sorted sensitive group names of the auditor's training part (the code order; loads the data)."""
        self.data  # noqa: B018 - property loads and encodes the groups
        return self._group_names

    @property
    def refit_basis(self) -> dict[str, torch.Tensor] | None:
        """The request's refit basis (``basis`` (D, k), ``mean`` (D,)) with a head refit, else None."""
        return self._refit_basis

    @property
    def train_codes(self) -> np.ndarray:
        """(N,) int64 group codes of the auditor's training part (loads the data)."""
        self.data  # noqa: B018
        return self._train_codes

    def round_batch(self, round_: int, size: int, salt: int = 0) -> RoundBatch:
        """A seeded sample of ``min(size, N)`` training examples for (experiment seed, round, salt)."""
        train = self.data["auditor_train"]
        idx = M.batch_indices(len(train), size, self.exp.seed, round_, salt)
        inputs = train.inputs[idx] if isinstance(train.inputs, np.ndarray) else [train.inputs[i] for i in idx]
        return RoundBatch(inputs, torch.as_tensor(self._train_codes[idx]), torch.as_tensor(train.y[idx]))

    def cached_records(self, *names: str) -> tuple | None:
        """The records ``names`` from the latest kept snapshot holding all of them, or None."""
        return self.snapshots.latest_with(*names)

    def check_groups(self) -> None:
        """Check ``min_group_size`` on every evaluation part now (at start-up, before serving).

        Raises:
            SmallGroupError: naming each part's groups that are too small, with their sizes, and
                how to fix it (``group_map``, ``include``). For the auditor's own console and
                log; what crosses to the developer is the fixed ``E_SMALL_GROUP`` text.
        """
        problems = []
        for name in ("auditor_val", "auditor_test"):
            groups, sizes = np.unique(np.asarray(self.data[name].s).astype(str), return_counts=True)
            small = {str(g): int(c) for g, c in zip(groups, sizes) if c < self.cfg.min_group_size}
            if small:
                problems.append(f"{name}: {small}")
        if problems:
            raise SmallGroupError(
                f"sensitive group(s) below min_group_size={self.cfg.min_group_size}: "
                + "; ".join(problems) + ". Merge small groups with [auditor.data] group_map "
                "(e.g. group_map = {\"Asian\" = \"Other\"}), keep only the compared groups with "
                "include, or give the evaluation parts more rows (partition fractions, max_auditor_*)")
