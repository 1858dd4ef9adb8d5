"""The auditor's side of the protocol: answer the developer's round requests on its own data.

:class:`AuditorService` is transport-free: the Flower ClientApp (:mod:`auditor.clientapp`) and the
co-located reference runner both call :meth:`AuditorService.handle` with a request ``RecordDict``
and send back the ``RecordDict`` it returns. Everything that leaves the auditor passes
:func:`protocol.messages.make_reply`, which admits only the records the request asked for:
aggregate metrics, and an adapter-shaped signal or per-module update.

Order of checks on every request: payload records/keys/shapes/dtypes/finiteness, message type,
experiment fingerprint and method; only then is the auditor's data read (lazily, once per
process).

State between rounds (the adversary or sensitive classifier, the sensitive LoRA's A_s, the
unlearning update ΔW_s) is owned by the service as one snapshot per answered round: the request
for round r starts from the snapshot of the latest earlier round (none for round 0), never from
"whatever came last", and every random draw is seeded from (experiment seed, round). So a request
re-sent after a crash of either party, even after later rounds were answered, gets a
bit-identical reply. The snapshots live in ``AuditorConfig.state_dir`` on disk when it is set
(surviving restarts), else in the caller's ``RecordDict`` (Flower's ``context.state``) or in
memory. With ``state_dir`` set, every payload received and sent is also logged to
``state_dir/audit.jsonl`` with the same fields as the developer's ``audit.jsonl``.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fairsplit.protocol.codec import payload_digest
from fairsplit.protocol.conditional import GatedModel, build_gated
from fairsplit.protocol.config import AuditorConfig, ExperimentConfig, experiment_fingerprint
from fairsplit.protocol.data import Dataset, load_split
from fairsplit.protocol.fileio import append_line, atomic_write_bytes
from fairsplit.protocol.messages import RoundRequest, make_reply, message_type_for, parse_request
from fairsplit.protocol.methods import METHODS, request_plan
from fairsplit.protocol.metrics import SmallGroupError, confusion_counts, fairness_report, report_from_counts
from fairsplit.protocol.privacy import planned_requests
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
from .state import PrivacyState, PrivacyStateError
from .methods import REGISTRY, AuditorMethod, ProtocolMismatch

__all__ = ["AuditorService", "AuditorShared", "KEEP_ROUNDS", "ProtocolMismatch", "StateUnavailable"]

log = logging.getLogger(__name__)

_SNAP_INDEX = "fairsplit.snapshots"  # index record when snapshots live in the caller's RecordDict
_SNAP_PREFIX = "fairsplit.snapshot."
_STATE_FORMAT = 1

#: Snapshots kept (the latest rounds); older ones are dropped and a request needing one is refused.
KEEP_ROUNDS = 3


class StateUnavailable(RuntimeError):
    """The state a request's round must start from was discarded (or belongs to another experiment)."""


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


def _now() -> str:
    """UTC wall-clock time for audit lines (ISO 8601, milliseconds); same format as the developer's."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _request_round(content) -> int | None:
    """The round a (possibly malformed) request claims, for the audit log; None if unreadable."""
    try:
        value = content["config"]["round"]
    except Exception:  # noqa: BLE001 - any malformed payload
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _copy_state(snapshot: RecordDict | None) -> RecordDict:
    """A new RecordDict holding the same records (records are replaced, never mutated, in place)."""
    out = RecordDict()
    for name, rec in (snapshot or {}).items():
        out[name] = rec
    return out


class AuditorService:
    """Answers the developer's requests on the auditor's data.

    Args:
        exp: the shared experiment config (the auditor's own copy).
        cfg: the auditor's own config (data with sensitive attributes, ``min_group_size``,
            optional ``state_dir``).
        keep_rounds: how many per-round state snapshots to keep (the latest rounds).

    The model and data are built on first use and cached for the life of the process.

    With ``cfg.state_dir`` set, the service writes:

    * ``state_dir/<fingerprint>/state.pt``: ``torch.save`` of ``{"format": 1, "fingerprint",
      "pruned": [rounds dropped], "snapshots": {round: {record name: {"kind": "array" | "config",
      "data": tensors | values}}}}``, replaced atomically after every round that changes state
      (requests with ``want != "none"``); a fresh service with the same ``state_dir`` resumes
      from it.
    * ``state_dir/audit.jsonl``: one line per payload: ``direction`` (``received``/``sent``),
      ``message_type``, ``round``, ``records``, ``bytes``, ``sha256`` (from
      :func:`protocol.codec.payload_digest`, as in the developer's ``audit.jsonl``), ``time``, and
      for a refused request ``error`` (the error's class name; no data).

    Raises:
        ValueError: ``keep_rounds`` < 1.
    """

    def __init__(self, exp: ExperimentConfig, cfg: AuditorConfig, keep_rounds: int = KEEP_ROUNDS,
                 shared: "AuditorShared | None" = None):
        if keep_rounds < 1:
            raise ValueError("keep_rounds must be at least 1")
        self.exp = exp
        self.cfg = cfg
        self.keep_rounds = keep_rounds
        self.fingerprint = experiment_fingerprint(exp)
        self.shared = shared if shared is not None else AuditorShared.create(cfg)
        self._model: FairsplitModel | None = None
        self._gated: GatedModel | None = None
        self.cond_spec = self.detector_spec = None
        self._data: dict[str, Dataset] | None = None
        self._method: AuditorMethod | None = None
        self._snapshots: dict[int, RecordDict] = {}  # round -> state after answering it
        self._pruned: set[int] = set()  # rounds whose snapshot was dropped
        self._disk_stamp: tuple | None = None  # (inode, mtime, size) of state.pt last read/written
        state_dir = Path(cfg.state_dir) if cfg.state_dir is not None else None
        self.state_path: Path | None = state_dir / self.fingerprint / "state.pt" if state_dir else None
        self.audit_path: Path | None = state_dir / "audit.jsonl" if state_dir else None
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        # -- privacy (docs/privacy.md) --
        self.dp = cfg.privacy.enabled
        self.spent: list[dict] = []  # every release this service made (ledger events; = the plan, tested)
        self._pending: list[dict] = []  # the releases of the request being answered
        self._noise: P.RunNoise | None = None
        # the secret as the current answer sees it (bound to its release number); none outside
        self.secret: P.AuditorSecret | P.NoRelease | None = P.NoRelease() if self.dp else None
        self.ledger = self.shared.ledger
        if not self.dp:
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
        return self._model

    @property
    def gated(self) -> GatedModel | None:
        """FairNet's gated model around :attr:`model` (gated methods), else None."""
        self.model  # noqa: B018 - builds it
        return self._gated

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
        received_at = _now()  # the line is written once the round is known, with this time
        if self.shared.runs.note_run(run_id, self.fingerprint, received_at):
            log.info("Flower run %s: experiment %s", run_id, self.fingerprint[:12])
        try:
            req, reply, cached = self._answer(message_type, content, state)
        except Exception as err:
            log.error("refused request (round %s): %s: %s", _request_round(content), type(err).__name__, err)
            self._audit("received", message_type, _request_round(content), content,
                        type(err).__name__, at=received_at, run_id=run_id)
            raise
        self._audit("received", message_type, req.round, content, at=received_at, run_id=run_id)
        self._audit("sent", message_type, req.round, reply, run_id=run_id, cached=cached)
        return reply

    def state_after(self, round_: int, state: RecordDict | None = None) -> RecordDict | None:
        """The state snapshot kept after answering ``round_`` (a copy), or None if there is none.

        ``state``: the caller's RecordDict, as passed to :meth:`handle` (used only without
        ``state_dir``). Snapshots exist only for requests that asked for a signal or update.
        """
        self._refresh(state)
        snap = self._snapshots.get(round_)
        return None if snap is None else _copy_state(snap)

    def _answer(self, message_type: str, content: RecordDict, state: RecordDict | None
                ) -> tuple[RoundRequest, RecordDict, bool]:
        model = self.model
        gated: dict = {}
        adapter, head, req = parse_request(content, self.adapter_spec, self.head_spec,
                                           cond_spec=self.cond_spec, detector_spec=self.detector_spec,
                                           gated=gated)
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
        if not self.dp:
            self._register_run()
            reply, work = self._compute(req, adapter, head, gated, state)
            if work is not None:
                self._keep(req.round, work, state)
            return req, reply, False
        store = self.shared.privacy
        cached = store.reply(self.fingerprint, key)
        if cached is not None:  # answered once: any request for this key gets the stored reply
            return req, cached, True
        self._check_private()
        with store.lock:  # the plan check, the charge and the reservation as one step
            self._check_plan(key)
            self._register_run()
            release, charge = self.ledger.reserve(self.fingerprint, key, payload_digest(content)["sha256"])
        self.secret = self.shared.secret.for_release(self.ledger.noise_key(release))
        try:
            reply, work = self._compute(req, adapter, head, gated, state)
        finally:
            self.secret = P.NoRelease()
        if charge:  # a different request for a key answered before: a new release, paid now
            log.warning("experiment %s: request (round %d, %s, %s) answered before with another "
                        "payload; its answer was lost: answered anew as release %d and charged",
                        self.fingerprint[:12], *key, release)
            self.ledger.pay(release, self._pending, "a second answer to an answered request")
        if work is not None:  # the round's state, only once its release is paid for
            self._keep(req.round, work, state)
        self.spent.extend(self._pending)
        store.store_reply(self.fingerprint, key, reply)
        return req, reply, False

    def _compute(self, req: RoundRequest, adapter: dict, head: dict | None, gated: dict,
                 state: RecordDict | None) -> tuple[RecordDict, RecordDict | None]:
        """The answer to ``req`` at the received adapter, head (and gated records): the method's
        release and the report, checked by :func:`protocol.messages.make_reply`, and the state
        to keep after this round (None when the request changes none); the caller keeps it once
        the answer may leave. Under DP every draw uses :attr:`secret`, bound to this answer's
        release by the caller."""
        model = self.model
        work = self._start_state(req.round, state)
        method = self.method
        self._pending = []
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
            report = self.report(name, scores, ("report", req.round))
            log.info("round %d %s: accuracy %s, DPD %s", req.round, req.split,
                     report["accuracy"], report["demographic_parity_difference"])
        r = release or M.Release()
        if self.dp:
            r = _sanitised(r)
        reply = make_reply(req, report=report, signal=r.adapter_gradient, update=r.update,
                           signal_metrics=r.metrics if release is not None else None,
                           head_signal=r.head_gradient, head=r.head,
                           adapter_spec=self.adapter_spec, update_spec=self.update_spec,
                           head_spec=self.head_spec, min_group_size=self.cfg.min_group_size,
                           privacy=self.privacy_status(), cond_signal=r.cond_gradient,
                           cond_spec=self.cond_spec)
        if not self.dp:
            self.spent.extend(self._pending)
        return reply, (work if req.want != "none" else None)

    # -- state snapshots ------------------------------------------------------------------
    def _start_state(self, round_: int, state: RecordDict | None) -> RecordDict:
        """A working copy of the snapshot of the latest round before ``round_`` (empty if none)."""
        self._refresh(state)
        base = max((r for r in self._snapshots if r < round_), default=None)
        lost = sorted(p for p in self._pruned if p < round_ and (base is None or p > base))
        if lost:
            raise StateUnavailable(
                f"the auditor's state after round {lost[-1]} was discarded (it keeps the last "
                f"{self.keep_rounds} rounds); cannot recompute round {round_}")
        if base is None and round_ > 0 and request_plan(self.exp.method).round0_want != "none":
            # a method that asks at round 0 keeps state from round 0 on: it was lost, not never made
            raise StateUnavailable(
                f"the auditor holds no state from before round {round_} (restarted without "
                "auditor.state_dir, or a new Flower run); it cannot answer as it did the first time")
        return _copy_state(self._snapshots.get(base) if base is not None else None)

    def _keep(self, round_: int, work: RecordDict, state: RecordDict | None) -> None:
        """Store ``work`` as the snapshot after ``round_``, keep the ``keep_rounds`` snapshots
        nearest to ``round_`` (in a run: the latest rounds), drop the others, persist.

        Nearest, not latest: when an experiment goes back (a new run of it from round 0 on a
        long-lived auditor, or a developer resumed from an earlier checkpoint) the state just
        written is the one the next request needs; dropping "the oldest" would drop it.
        """
        self._snapshots[round_] = work
        keep = sorted(self._snapshots, key=lambda r: (abs(r - round_), r))[:self.keep_rounds]
        for r in [r for r in self._snapshots if r not in keep]:
            del self._snapshots[r]
            self._pruned.add(r)
        self._pruned -= set(self._snapshots)
        if self.state_path is not None:
            self._write_disk()
        elif state is not None:
            self._write_records(state)

    def _refresh(self, state: RecordDict | None) -> None:
        """Load the snapshots from ``state.pt`` (if changed since last read) or the caller's state."""
        if self.state_path is not None:
            try:
                st = os.stat(self.state_path)
            except FileNotFoundError:
                return
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._disk_stamp:
                self._read_disk()
                self._disk_stamp = stamp
        elif state is not None:
            self._read_records(state)

    def _write_disk(self) -> None:
        snaps = {r: {name: ({"kind": "array", "data": rec.to_torch_state_dict()}
                            if isinstance(rec, ArrayRecord) else {"kind": "config", "data": dict(rec)})
                     for name, rec in snap.items()}
                 for r, snap in self._snapshots.items()}
        buf = io.BytesIO()
        torch.save({"format": _STATE_FORMAT, "fingerprint": self.fingerprint,
                    "pruned": sorted(self._pruned), "snapshots": snaps}, buf)
        atomic_write_bytes(self.state_path, buf.getvalue())
        st = os.stat(self.state_path)
        self._disk_stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read_disk(self) -> None:
        obj = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if obj.get("format") != _STATE_FORMAT or obj.get("fingerprint") != self.fingerprint:
            raise StateUnavailable(f"{self.state_path} holds state for another experiment or format")
        self._snapshots = {
            int(r): _copy_state({name: (ArrayRecord(rec["data"]) if rec["kind"] == "array"
                                        else ConfigRecord(rec["data"]))
                                 for name, rec in snap.items()})
            for r, snap in obj["snapshots"].items()}
        self._pruned = set(int(p) for p in obj["pruned"])

    def _write_records(self, state: RecordDict) -> None:
        for name in [n for n in state.keys() if n.startswith(_SNAP_PREFIX) or n == _SNAP_INDEX]:
            del state[name]
        for r, snap in self._snapshots.items():
            for name, rec in snap.items():
                state[f"{_SNAP_PREFIX}{r}.{name}"] = rec
        state[_SNAP_INDEX] = ConfigRecord({"rounds": sorted(self._snapshots), "pruned": sorted(self._pruned)})

    def _read_records(self, state: RecordDict) -> None:
        if _SNAP_INDEX not in state:
            return
        index = state[_SNAP_INDEX]
        snaps: dict[int, RecordDict] = {int(r): RecordDict() for r in index["rounds"]}
        for name in state.keys():
            if name.startswith(_SNAP_PREFIX):
                r, rec_name = name[len(_SNAP_PREFIX):].split(".", 1)
                if int(r) in snaps:
                    snaps[int(r)][rec_name] = state[name]
        self._snapshots = snaps
        self._pruned = set(int(p) for p in index["pruned"])

    def _audit(self, direction: str, message_type: str, round_: int | None, content,
               error: str | None = None, at: str | None = None, run_id: int | None = None,
               cached: bool = False) -> None:
        """Append one line to ``state_dir/audit.jsonl`` (no-op without ``state_dir``).

        ``at``: the event's time (default: now). Every line also names the experiment
        (``fingerprint``), the Flower ``run_id`` (None co-located) and, under DP, the ε the
        experiment is charged (``epsilon_run``) and the ledger's total (``epsilon_total``);
        ``cached``: a sent reply that was answered before (a re-sent request).
        """
        if self.audit_path is None:
            return
        try:
            digest = payload_digest(content)
        except Exception:  # noqa: BLE001 - a payload too malformed to summarise
            digest = {"records": None, "bytes": None, "sha256": None}
        line = {"direction": direction, "message_type": str(message_type), "round": round_,
                **digest, "time": at or _now(), "fingerprint": self.fingerprint, "run_id": run_id}
        if self.dp:
            line["epsilon_run"] = round(self.ledger.epsilon(self.fingerprint), 6)
            line["epsilon_total"] = round(self.ledger.epsilon(), 6)
        if cached:
            line["cached"] = True
        if error is not None:
            line["error"] = error
        append_line(self.audit_path, json.dumps(line))

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
    def train_codes(self) -> np.ndarray:
        """(N,) int64 group codes of the auditor's training part (loads the data)."""
        self.data  # noqa: B018
        return self._train_codes

    def round_batch(self, round_: int, size: int, salt: int = 0) -> M.RoundBatch:
        """A seeded sample of ``min(size, N)`` training examples for (experiment seed, round, salt)."""
        train = self.data["auditor_train"]
        idx = M.batch_indices(len(train), size, self.exp.seed, round_, salt)
        inputs = train.inputs[idx] if isinstance(train.inputs, np.ndarray) else [train.inputs[i] for i in idx]
        return M.RoundBatch(inputs, torch.as_tensor(self._train_codes[idx]), torch.as_tensor(train.y[idx]))

    def _round_batch(self, round_: int, salt: int = 0):
        """(inputs, s) of :meth:`round_batch` at the method's ``auditor_batch_size``."""
        b = self.round_batch(round_, self.exp.method.auditor_batch_size, salt)
        return b.inputs, b.s

    def cached_records(self, *names: str) -> tuple | None:
        """The records ``names`` from the latest kept snapshot holding all of them, or None."""
        for _, snap in sorted(self._snapshots.items(), reverse=True):
            if all(n in snap for n in names):
                return tuple(snap[n] for n in names)
        return None

    # -- privacy: run limits, one answer per request, the ledger (docs/privacy.md) --------------
    @property
    def noise(self) -> P.RunNoise:
        """This run's noise multipliers per part: those the ledger charged the experiment at, once
        registered; before that calibrated from the run's plan so the planned run spends
        ``target_epsilon`` (per part, at ``delta``), or the configured ones."""
        if self._noise is None and self.ledger is not None:
            stored = self.ledger.noise.get(self.fingerprint)
            if stored is not None:  # charged at these: a changed config must not change them
                self._noise = P.RunNoise(stored["train"], stored["val"], stored["test"])
        if self._noise is None:
            pc = self.cfg.privacy
            n_train = len(self.data["auditor_train"])
            if not pc.calibrate:
                self._noise = P.RunNoise(pc.noise_multiplier, pc.report_noise_multiplier,
                                         pc.report_noise_multiplier)
            else:
                sigmas = {}
                for part in P.PARTS:
                    def events(sigma, part=part):
                        return [e for e in P.run_events(self.exp, n_train, P.RunNoise(sigma, sigma, sigma))
                                if e["part"] == part]
                    default = pc.noise_multiplier if part == "auditor_train" else pc.report_noise_multiplier
                    sigmas[part] = (P.calibrate_sigma(events, pc.target_epsilon, pc.delta)
                                    if events(1.0) else default)
                self._noise = P.RunNoise(sigmas["auditor_train"], sigmas["auditor_val"], sigmas["auditor_test"])
            log.info("noise multipliers: train %.3f, val %.3f, test %.3f", self._noise.train,
                     self._noise.val, self._noise.test)
        return self._noise

    def planned_events(self) -> list[dict]:
        """Every release this experiment's run makes (ledger events), from its request plan."""
        events = P.run_events(self.exp, len(self.data["auditor_train"]), self.noise)
        return [{"fingerprint": self.fingerprint, **e} for e in events]

    def spend(self, part: str, kind: str, sigma: float, q: float | None = None, count: int = 1) -> None:
        """Note a release the current request makes (checked against the plan by the tests)."""
        self._pending.append({"fingerprint": self.fingerprint, "part": part, "kind": kind,
                              "sigma": float(sigma), "q": None if q is None else float(q),
                              "count": int(count)})

    def privacy_status(self) -> dict:
        """The reply's ``privacy`` record (:class:`protocol.privacy.PrivacyStatus`)."""
        if not self.dp:
            return {"dp": False}
        pc = self.cfg.privacy
        return {"dp": True, "epsilon_run": self.ledger.epsilon(self.fingerprint),
                "epsilon_total": self.ledger.epsilon(), "epsilon_budget": pc.epsilon_budget,
                "delta": pc.delta}

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

    def report(self, part_name: str, scores: np.ndarray, key: tuple) -> dict:
        """The report on one part at ``scores``: exact (no DP) or from noisy counts (DP).

        Under DP: the groups' true sizes are checked against ``min_group_size`` first (their
        sizes are fixed by the part, whatever model is sent), then Gaussian noise of σ = this
        run's multiplier for the part goes on the per-group confusion counts, and every rate is
        computed from the noisy counts; non-finite scores count as negative predictions.

        Raises:
            SmallGroupError: a group of the part below ``min_group_size``.
        """
        part = self.data[part_name]
        if not self.dp:
            return fairness_report(part.y, scores, part.s, self.exp.threshold, self.cfg.min_group_size)
        groups, sizes = np.unique(np.asarray(part.s).astype(str), return_counts=True)
        small = [str(g) for g, c in zip(groups, sizes) if c < self.cfg.min_group_size]
        if small:
            raise SmallGroupError(f"{part_name}: group(s) {small} below min_group_size="
                                  f"{self.cfg.min_group_size}")
        sigma = getattr(self.noise, part_name.removeprefix("auditor_"))
        counts = confusion_counts(part.y, scores, part.s, self.exp.threshold)
        noisy = P.noisy_counts(counts, sigma, self.secret.rng(self.fingerprint, part_name, *key))
        self.spend(part_name, "gaussian", sigma)
        return report_from_counts(noisy, min_n=self.cfg.min_group_size)

    def _check_private(self) -> None:
        """Under DP: the method has a private form and a batch of at least ``min_batch_size``."""
        stage = getattr(self.exp.method, "first_stage", None) or self.exp.method
        size = getattr(stage, "auditor_batch_size", None)
        if size is not None and size < self.cfg.privacy.min_batch_size:
            raise P.NotPrivate(f"auditor_batch_size {size} < min_batch_size "
                               f"{self.cfg.privacy.min_batch_size}")
        if not METHODS[stage.name].private or not METHODS[self.exp.method.name].private:
            raise P.NotPrivate(f"method {stage.name!r} has no differentially private form")
        self.planned_events()  # raises NotPrivate for unsupported settings

    def _check_plan(self, key: tuple) -> None:
        """Under DP: ``key`` is in the run's plan and no later request of the plan was answered."""
        plan = planned_requests(self.exp)
        if key not in plan:
            raise P.OutOfPlan(f"request (round {key[0]}, split {key[1]!r}, want {key[2]!r}) is not "
                              f"in this experiment's plan of {len(plan)} requests")
        done = [plan.index(k) for k in self.answered_keys() if k in plan]
        if done and plan.index(key) < max(done):
            raise P.OutOfPlan(f"request (round {key[0]}, split {key[1]!r}, want {key[2]!r}) comes "
                              "after a later request of the plan was answered")

    def _register_run(self) -> None:
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
            self.ledger.register_run(self.fingerprint, planned, {"train": n.train, "val": n.val, "test": n.test},
                                     "this run's planned releases")
        number = runs.register(self.fingerprint)
        log.info("run %d of at most %d: experiment %s", number, self.cfg.max_runs,
                 self.fingerprint[:12])

    def answered_keys(self) -> list[tuple]:
        """Under DP: the (round, split, want) keys of this experiment answered so far (from the
        ledger's journal, shared by every service and process of the state_dir), sorted."""
        return self.ledger.reserved_keys(self.fingerprint) if self.dp else []


def _sanitised(r: "M.Release") -> "M.Release":
    """Non-finite entries of a DP release become 0 (a crafted model must not turn NaN into an
    error, which would answer a question about the data); the noise is already added."""
    def fix(d):
        return None if d is None else {k: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for k, v in d.items()}
    metrics = {k: (0.0 if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.metrics.items()}
    return M.Release(metrics=metrics, adapter_gradient=fix(r.adapter_gradient), head_gradient=fix(r.head_gradient),
                     update=fix(r.update), head=fix(r.head), cond_gradient=fix(r.cond_gradient))
