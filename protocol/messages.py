"""The messages the parties exchange, and the payload policy both sides enforce.

One request/reply pair per round, sent by the developer's ServerApp to the auditor's ClientApp.
Flower message type: ``train`` when a fairness signal or update is asked for, else ``evaluate``.

request (developer → auditor), a ``RecordDict`` with exactly
    * ``"adapter"``: ``ArrayRecord``, the task LoRA adapter (peft state-dict keys);
    * ``"head"``: ``ArrayRecord`` (``weight`` (C, D), ``bias`` (C,)), when an evaluation is asked
      for (``split`` is ``val`` or ``test``), a head refit (``want == "head"``) or a signal of a
      method whose row crosses ``head_gradient``: the auditor needs it to score predictions;
    * ``"cond_adapter"``, ``"detector"``: ``ArrayRecord`` records, FairNet's conditional LoRA and bias
      detector (with its gate threshold τ), on every request of a gated method
      (:mod:`protocol.conditional`): the auditor evaluates the gated model;
    * ``"refit_basis"``: ``ArrayRecord`` (``basis`` (D, k), ``mean`` (D,)), with a head refit
      (``want == "head"``): the top-k principal directions and the mean of the developer's own
      training features (its data, not the auditor's), to which the auditor's private refit
      restricts the head's change;
    * ``"config"``: ``ConfigRecord`` with the fields of :class:`RoundRequest`.

reply (auditor → developer), a ``RecordDict`` with exactly the records the request asked for
    * ``"report"`` (if ``split != "none"``): ``ConfigRecord {"json": str}``, a
      :class:`FairnessReport`: aggregate metrics over groups of at least ``min_group_size``;
    * ``"signal"`` (if ``want == "signal"``): ``ArrayRecord`` with exactly the adapter's keys,
      shapes and dtypes: ∇ of the method's fairness term R w.r.t. the adapter, λ applied;
    * ``"head_signal"`` (if ``want == "signal"`` and the method crosses ``head_gradient``):
      ``ArrayRecord`` with exactly the head's keys and shapes, ∇ of R w.r.t. the head;
    * ``"cond_signal"`` (if ``want == "signal"`` and the method crosses
      ``cond_adapter_gradient``, FairNet): ∇ of the contrastive term w.r.t. the conditional LoRA
      only, exactly its keys and shapes (no ``signal`` then);
    * ``"head"`` (if ``want == "head"``): a refitted task head with the head's keys and shapes;
    * ``"update"`` (if ``want == "unlearning_update"``): ``ArrayRecord`` with one dense
      ΔW_s (d_out, d_in) per LoRA target module (key: the module's name), from the auditor's
      sensitive adapter;
    * ``"signal_metrics"`` (with ``signal`` or ``update``): ``ConfigRecord {"json": str}``, a
      :class:`SignalMetrics` (aggregates over the auditor's batch).

Nothing per-example crosses: no attributes, predictions, scores, indices, sensitive heads or
sensitive adapters of the auditor (a refitted head is a task head, trained on y). The policy
(records per message type and direction, their contracts, schemas and byte limits) is declared once, in :data:`protocol.policy.POLICY`; the sender (before
sending) and the receiver (on receipt) both check a message with :func:`protocol.policy.enforce`.
The auditor's :func:`make_reply` also refuses a report over fewer than ``min_group_size`` examples
in total or in any group. See :mod:`protocol.codec` for the tensor checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from flwr.app import ConfigRecord, RecordDict
from pydantic import BaseModel, ValidationError

from .codec import PayloadError, state_to_record
from .model import TensorSpec, state_spec
from .privacy import PrivacyStatus
from .policy import (
    EVALUATE,
    MAX_CONFIG_BYTES,
    MAX_GROUPS,
    MAX_REPORT_BYTES,
    MAX_SIGNAL_METRICS_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    REPLY,
    REQUEST,
    TRAIN,
    FairnessReport,
    GroupStats,
    RoundRequest,
    SignalMetrics,
    declared_records,
    enforce,
    sends_gated,
    sends_head,
    head_spec_from_state,
    parse_config_record,
    update_spec_from_adapter,
)

__all__ = [
    "EVALUATE",
    "MAX_GROUPS",
    "MAX_REPORT_BYTES",
    "MAX_SIGNAL_METRICS_BYTES",
    "PROTOCOL_VERSION",
    "TRAIN",
    "FairnessReport",
    "GroupStats",
    "Reply",
    "RoundRequest",
    "SignalMetrics",
    "make_reply",
    "make_request",
    "message_type_for",
    "parse_reply",
    "parse_request",
]


@dataclass
class Reply:
    """A validated reply: each field is present iff the request asked for it."""

    report: dict | None = None
    signal: dict[str, torch.Tensor] | None = None
    head_signal: dict[str, torch.Tensor] | None = None
    update: dict[str, torch.Tensor] | None = None
    head: dict[str, torch.Tensor] | None = None
    signal_metrics: dict | None = None
    privacy: dict | None = None
    cond_signal: dict[str, torch.Tensor] | None = None


def message_type_for(req: RoundRequest) -> str:
    """Flower message type of a request: ``train`` when it asks for a signal/update."""
    return TRAIN if req.want != "none" else EVALUATE


def _message_type(message_type: str | None, req: RoundRequest, what: str) -> str:
    """The message type to check against: ``req``'s own, which a given one must equal."""
    expected = message_type_for(req)
    if message_type is None:
        return expected
    if not isinstance(message_type, str) or message_type not in MESSAGE_TYPES:
        raise PayloadError(f"{what}: unknown message type {message_type!r}; declared: {list(MESSAGE_TYPES)}")
    if message_type != expected:
        raise PayloadError(f"{what}: message type {message_type!r} does not match the request "
                           f"(split={req.split!r}, want={req.want!r} is sent as {expected!r})")
    return expected


def _check_protocol(req: RoundRequest, what: str) -> None:
    if req.protocol != PROTOCOL_VERSION:
        raise PayloadError(f"{what}: config['protocol']: protocol version {req.protocol} != "
                           f"{PROTOCOL_VERSION} (the version this side speaks)")


def make_request(adapter: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor] | None,
                 req: RoundRequest, *, adapter_spec: Mapping[str, TensorSpec] | None = None,
                 head_spec: Mapping[str, TensorSpec] | None = None,
                 cond_adapter: Mapping[str, torch.Tensor] | None = None,
                 detector: Mapping[str, torch.Tensor] | None = None,
                 cond_spec: Mapping[str, TensorSpec] | None = None,
                 detector_spec: Mapping[str, TensorSpec] | None = None,
                 refit_basis: Mapping[str, torch.Tensor] | None = None,
                 refit_basis_spec: Mapping[str, TensorSpec] | None = None) -> RecordDict:
    """Build a request (developer side) and check it against the declared policy before sending.

    Args:
        adapter: the task LoRA adapter, peft key → tensor.
        head: ``{"weight": (C, D), "bias": (C,)}``, exactly when ``req.split != "none"``.
        req: the round request (its protocol must be :data:`PROTOCOL_VERSION`).
        adapter_spec / head_spec: the contracts to check against (default: the tensors' own
            keys, shapes and dtypes; the head must still be a linear head's ``weight``/``bias``).
        cond_adapter / detector: FairNet's conditional LoRA and detector, exactly for a gated
            method (:func:`protocol.policy.sends_gated`); cond_spec / detector_spec: their
            contracts (default: the tensors' own).
        refit_basis: ``{"basis": (D, k), "mean": (D,)}``, exactly with a head refit
            (``want == "head"``); refit_basis_spec: its contract (default: the tensors' own).

    Raises:
        PayloadError: non-finite or unencodable tensors, a head (or gated records, or a refit basis)
            given/missing against the request, a head that is not ``weight`` (C, D) + ``bias`` (C,), tensors outside
            the given contracts, a protocol version other than :data:`PROTOCOL_VERSION`, or a
            record over its byte limit.
    """
    what = "refusing to send request"
    if not isinstance(req, RoundRequest):
        raise PayloadError(f"{what}: req must be a RoundRequest, got {type(req).__name__}")
    _check_protocol(req, what)
    if (head is None) == sends_head(req):
        raise PayloadError("the head is sent exactly with an evaluation, a head refit, a τ choice, "
                           "a head-gradient signal request or a gated (FairNet) signal request")
    if (cond_adapter is None or detector is None) == sends_gated(req) or \
            (cond_adapter is None) != (detector is None):
        raise PayloadError("the conditional LoRA and detector are sent exactly with every request "
                           "of a gated method")
    if (refit_basis is None) == (req.want == "head"):
        raise PayloadError("the refit basis is sent exactly with a head refit request (want == 'head')")
    content = RecordDict({"adapter": state_to_record(adapter),
                          "config": ConfigRecord(req.model_dump(exclude_none=True))})
    contracts: dict[str, Any] = {"adapter": adapter_spec or state_spec(dict(adapter))}
    if head is not None:
        content["head"] = state_to_record(head)
        contracts["head"] = head_spec or head_spec_from_state(head)
    if cond_adapter is not None:
        content["cond_adapter"] = state_to_record(cond_adapter)
        content["detector"] = state_to_record(detector)
        contracts["cond_adapter"] = cond_spec or state_spec(dict(cond_adapter))
        contracts["detector"] = detector_spec or state_spec(dict(detector))
    if refit_basis is not None:
        content["refit_basis"] = state_to_record(refit_basis)
        contracts["refit_basis"] = refit_basis_spec or state_spec(dict(refit_basis))
    enforce(content, message_type_for(req), REQUEST, req, contracts, what=what)
    return content


def parse_request(content: RecordDict, adapter_spec: Mapping[str, TensorSpec],
                  head_spec: Mapping[str, TensorSpec], *, message_type: str | None = None,
                  cond_spec: Mapping[str, TensorSpec] | None = None,
                  detector_spec: Mapping[str, TensorSpec] | None = None,
                  gated: dict | None = None,
                  refit_basis_spec: Mapping[str, TensorSpec] | None = None,
                  refit: dict | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, RoundRequest]:
    """Validate a request against the declared policy and the auditor's own contracts.

    Args:
        content: the received records.
        adapter_spec / head_spec: the auditor's own contracts (from its own model).
        message_type: the Flower message type it arrived as; when given it must be declared
            (``train`` / ``evaluate``) and equal :func:`message_type_for` of the request.
        cond_spec / detector_spec: the auditor's contracts of FairNet's records (needed when
            the request is a gated method's); gated: when given, receives the decoded
            ``cond_adapter`` and ``detector`` of such a request.
        refit_basis_spec: the auditor's contract of the refit basis (needed for a head refit
            request); refit: when given, receives the decoded ``refit_basis`` of such a request.

    Returns:
        ``(adapter, head, req)``: adapter key → tensor; head (``None`` when ``split == "none"``);
        the parsed :class:`RoundRequest`.

    Raises:
        PayloadError: not a RecordDict, a missing or malformed ``config`` (unknown keys, wrong
            value types), a protocol version mismatch, an unknown or mismatched message type,
            undeclared/missing/mistyped records, a record over its byte limit, or adapter/head
            contract violations (keys, shapes, dtypes, truncated bytes, NaN/Inf).
    """
    what = "request"
    if not isinstance(content, RecordDict):
        raise PayloadError(f"{what}: content is not a RecordDict, got {type(content).__name__}")
    if "config" not in content.keys():
        raise PayloadError(f"{what}: missing ConfigRecord 'config'")
    req = parse_config_record(content["config"], RoundRequest, "config", what, MAX_CONFIG_BYTES)
    _check_protocol(req, what)
    mtype = _message_type(message_type, req, what)
    out = enforce(content, mtype, REQUEST, req, {"adapter": adapter_spec, "head": head_spec,
                                                 "cond_adapter": cond_spec, "detector": detector_spec,
                                                 "refit_basis": refit_basis_spec},
                  what=f"{mtype} {what}")
    if gated is not None:
        gated.update({k: out[k] for k in ("cond_adapter", "detector") if k in out})
    if refit is not None and "refit_basis" in out:
        refit["refit_basis"] = out["refit_basis"]
    return out["adapter"], out.get("head"), req


def _json_record(schema: type[BaseModel], value: Any, name: str) -> ConfigRecord:
    """Sender side: coerce ``value`` through ``schema`` (lax) and serialise it as JSON."""
    try:
        model = schema.model_validate(value)
    except ValidationError as err:
        e = err.errors()[0]
        raise PayloadError(f"refusing to send {name}: {'.'.join(map(str, e['loc']))}: {e['msg']}"
                           f" ({err.error_count()} error(s))") from None
    return ConfigRecord({"json": model.model_dump_json()})


def make_reply(req: RoundRequest, report: dict | None = None,
               signal: Mapping[str, torch.Tensor] | None = None,
               update: Mapping[str, torch.Tensor] | None = None,
               signal_metrics: dict | None = None,
               adapter_spec: Mapping[str, TensorSpec] | None = None, *,
               update_spec: Mapping[str, TensorSpec] | None = None,
               head_signal: Mapping[str, torch.Tensor] | None = None,
               head: Mapping[str, torch.Tensor] | None = None,
               head_spec: Mapping[str, TensorSpec] | None = None,
               min_group_size: int | None = None,
               privacy: dict | None = None,
               cond_signal: Mapping[str, torch.Tensor] | None = None,
               cond_spec: Mapping[str, TensorSpec] | None = None) -> RecordDict:
    """Build a reply (auditor side): exactly the records ``req`` asked for, each checked.

    The reply is checked with the same :func:`protocol.policy.enforce` the developer applies on
    receipt, so nothing leaves that the developer would refuse.

    Args:
        req: the request being answered.
        report: a :func:`protocol.metrics.fairness_report` dict (when ``req.split != "none"``).
        signal: adapter key → gradient, exactly the adapter's keys/shapes/dtypes.
        update: LoRA module name → ΔW (d_out, d_in).
        head_signal: ``weight`` (C, D), ``bias`` (C,) → gradient (methods whose row crosses
            ``head_gradient``); head: a refitted task head ``weight`` (C, D), ``bias`` (C,)
            (``want == "head"``); both checked against ``head_spec``.
        signal_metrics: a :class:`SignalMetrics` dict (with a signal or update).
        adapter_spec: the auditor's adapter contract (required with ``signal`` or ``update``).
        update_spec: the update contract (default: derived from ``adapter_spec`` with
            :func:`protocol.policy.update_spec_from_adapter`).
        min_group_size: when given, a report whose total ``n`` or any per-group ``n`` is below
            it is refused.
        privacy: a :class:`protocol.privacy.PrivacyStatus` dict (every reply carries one;
            default: ``{"dp": False}``).
        cond_signal: FairNet's conditional-LoRA gradient, checked against ``cond_spec``.

    Raises:
        PayloadError: a record missing or not asked for, a report/metrics outside its schema
            (unknown keys, out of range, NaN/Inf, over its byte cap), a group below
            ``min_group_size``, a signal/update whose keys/shapes/dtypes differ from the
            contract, or non-finite tensors.
    """
    what = "refusing to send reply"
    if not isinstance(req, RoundRequest):
        raise PayloadError(f"{what}: req must be a RoundRequest, got {type(req).__name__}")
    given = {"report": report, "signal": signal, "update": update, "signal_metrics": signal_metrics,
             "head_signal": head_signal, "head": head, "cond_signal": cond_signal,
             "privacy": privacy if privacy is not None else {"dp": False}}
    mtype = message_type_for(req)
    expected = declared_records(mtype, REPLY, req)
    present = {k for k, v in given.items() if v is not None}
    if present != set(expected):
        raise PayloadError(f"refusing to send records {sorted(present)}; the request asked for {sorted(expected)}")
    if signal is not None and adapter_spec is None:
        raise PayloadError("a signal can only be sent against the adapter's contract")
    if (head_signal is not None or head is not None) and head_spec is None:
        raise PayloadError("a head or head signal can only be sent against the head's contract")
    if cond_signal is not None and cond_spec is None:
        raise PayloadError("a conditional-LoRA signal can only be sent against its contract")
    if update is not None and update_spec is None:
        if adapter_spec is None:
            raise PayloadError("an update can only be sent against the module contract (adapter_spec or update_spec)")
        update_spec = update_spec_from_adapter(adapter_spec)
    out = RecordDict()
    if report is not None:
        out["report"] = _json_record(FairnessReport, report, "report")
    if signal_metrics is not None:
        out["signal_metrics"] = _json_record(SignalMetrics, signal_metrics, "signal_metrics")
    out["privacy"] = _json_record(PrivacyStatus, given["privacy"], "privacy")
    if signal is not None:
        out["signal"] = state_to_record(signal)
    if update is not None:
        out["update"] = state_to_record(update)
    if head_signal is not None:
        out["head_signal"] = state_to_record(head_signal)
    if head is not None:
        out["head"] = state_to_record(head)
    if cond_signal is not None:
        out["cond_signal"] = state_to_record(cond_signal)
    enforce(out, mtype, REPLY, req, {"adapter": adapter_spec, "update": update_spec, "head": head_spec,
                                     "cond_adapter": cond_spec},
            min_group_size=min_group_size, what=what)
    return out


def parse_reply(content: RecordDict, req: RoundRequest,
                adapter_spec: Mapping[str, TensorSpec] | None = None,
                update_spec: Mapping[str, TensorSpec] | None = None, *,
                head_spec: Mapping[str, TensorSpec] | None = None,
                message_type: str | None = None, min_group_size: int | None = None,
                cond_spec: Mapping[str, TensorSpec] | None = None) -> Reply:
    """Validate a reply (developer side) against the declared policy and what ``req`` asked for.

    Args:
        content: the received records.
        req: the request this replies to.
        adapter_spec: the developer's adapter contract (required when a signal is asked for).
        update_spec: the developer's update contract (default: derived from ``adapter_spec``).
        head_spec: the developer's head contract (required when a head or head signal is due).
        cond_spec: the developer's conditional-LoRA contract (required for FairNet's signal).
        message_type: when given, must be declared and equal :func:`message_type_for` of ``req``.
        min_group_size: when given, a report over fewer examples in total or in any group is
            refused.

    Raises:
        PayloadError: records not asked for or missing, a record over its byte limit, schemas
            violated (unknown keys, wrong types, out of range, NaN/Inf, malformed JSON), a signal
            or update whose keys/shapes/dtypes differ from the developer's own contracts,
            truncated array bytes, non-finite values.
    """
    if not isinstance(req, RoundRequest):
        raise PayloadError(f"reply: req must be a RoundRequest, got {type(req).__name__}")
    mtype = _message_type(message_type, req, "reply")
    if update_spec is None and req.want == "unlearning_update":
        if adapter_spec is None:
            raise PayloadError("no module contract to check the update against")
        update_spec = update_spec_from_adapter(adapter_spec)
    if req.want == "signal" and adapter_spec is None:
        raise PayloadError("no adapter contract to check the signal against")
    out = enforce(content, mtype, REPLY, req, {"adapter": adapter_spec, "update": update_spec,
                                               "head": head_spec, "cond_adapter": cond_spec},
                  min_group_size=min_group_size, what=f"{mtype} reply")
    return Reply(report=out.get("report"), signal=out.get("signal"), update=out.get("update"),
                 head_signal=out.get("head_signal"), head=out.get("head"),
                 signal_metrics=out.get("signal_metrics"), privacy=out.get("privacy"),
                 cond_signal=out.get("cond_signal"))
