"""The messages the parties exchange, and the payload policy both sides enforce.

One request/reply pair per round, sent by the developer's ServerApp to the auditor's ClientApp.
Flower message type: ``train`` when a fairness signal or update is asked for, else ``evaluate``.

request (developer → auditor), a ``RecordDict`` with exactly
    * ``"adapter"``: ``ArrayRecord``, the task LoRA adapter (peft state-dict keys);
    * ``"head"``: ``ArrayRecord`` (``weight`` (C, D), ``bias`` (C,)), only when an evaluation is
      asked for (``split`` is ``val`` or ``test``): the auditor needs it to score predictions;
    * ``"config"``: ``ConfigRecord`` with the fields of :class:`RoundRequest`.

reply (auditor → developer), a ``RecordDict`` with exactly the records the request asked for
    * ``"report"`` (if ``split != "none"``): ``ConfigRecord {"json": str}``, a
      :class:`FairnessReport`: aggregate metrics over groups of at least ``min_group_size``;
    * ``"signal"`` (if ``want == "signal"``): ``ArrayRecord`` with exactly the adapter's keys,
      shapes and dtypes: ∇ of the method's fairness term R w.r.t. the adapter, λ applied;
    * ``"update"`` (if ``want == "unlearning_update"``): ``ArrayRecord`` with one dense
      ΔW_s (d_out, d_in) per LoRA target module (key: the module's name), from the auditor's
      sensitive adapter;
    * ``"signal_metrics"`` (with ``signal`` or ``update``): ``ConfigRecord {"json": str}``, a
      :class:`SignalMetrics` (aggregates over the auditor's batch).

Nothing per-example crosses: no attributes, predictions, scores, indices, heads or sensitive
adapters of the auditor. Both the sender (before sending) and the receiver (on receipt) validate
against these schemas; see :mod:`protocol.codec` for the tensor checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .codec import PayloadError, record_to_state, state_to_record
from .metrics import PER_GROUP_KEYS, REPORT_KEYS
from .model import TensorSpec

__all__ = [
    "EVALUATE",
    "PROTOCOL_VERSION",
    "TRAIN",
    "FairnessReport",
    "Reply",
    "RoundRequest",
    "SignalMetrics",
    "make_evaluate_reply",
    "make_evaluate_request",
    "make_reply",
    "make_request",
    "message_type_for",
    "parse_evaluate_reply",
    "parse_evaluate_request",
    "parse_reply",
    "parse_request",
]

PROTOCOL_VERSION = 2
EVALUATE = "evaluate"
TRAIN = "train"
MAX_REPORT_BYTES = 64 * 1024
MAX_GROUPS = 64


class GroupStats(BaseModel):
    """Aggregate statistics of one sensitive group (fairlearn definitions)."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=1)
    accuracy: float | None = Field(None, ge=0, le=1)
    selection_rate: float | None = Field(None, ge=0, le=1)
    tpr: float | None = Field(None, ge=0, le=1)
    fpr: float | None = Field(None, ge=0, le=1)


class FairnessReport(BaseModel):
    """The content of a ``report`` record (see :func:`protocol.metrics.fairness_report`)."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=1)
    accuracy: float | None = Field(None, ge=0, le=1)
    balanced_accuracy: float | None = Field(None, ge=0, le=1)
    auc: float | None = Field(None, ge=0, le=1)
    demographic_parity_difference: float | None = Field(None, ge=0, le=1)
    demographic_parity_ratio: float | None = Field(None, ge=0, le=1)
    equal_opportunity_difference: float | None = Field(None, ge=0, le=1)
    equalized_odds_difference: float | None = Field(None, ge=0, le=1)
    false_positive_rate_difference: float | None = Field(None, ge=0, le=1)
    false_positive_rate_ratio: float | None = Field(None, ge=0, le=1)
    worst_group_accuracy: float | None = Field(None, ge=0, le=1)
    per_group: dict[str, GroupStats] = Field(max_length=MAX_GROUPS)


assert set(FairnessReport.model_fields) == set(REPORT_KEYS) | {"per_group"}
assert set(GroupStats.model_fields) == set(PER_GROUP_KEYS)


class SignalMetrics(BaseModel):
    """Aggregates the auditor may report with a signal, over its batch of ``n`` examples.

    ``objective``: the fairness term R (λ applied) at the adapter received; ``sensitive_accuracy``:
    accuracy of the auditor's sensitive predictor (adversary / classifier / sensitive adapter) on
    that batch, a leakage measure; ``signal_norm``: L2 norm of the returned signal.
    """

    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=1)
    objective: float
    sensitive_accuracy: float | None = Field(None, ge=0, le=1)
    signal_norm: float = Field(ge=0)


class RoundRequest(BaseModel):
    """The ``config`` record of a request."""

    model_config = ConfigDict(extra="forbid")
    round: int = Field(ge=0)
    split: Literal["none", "val", "test"]
    want: Literal["none", "signal", "unlearning_update"]
    method: str = Field(max_length=32)
    fingerprint: str = Field(min_length=64, max_length=64)
    protocol: int


@dataclass
class Reply:
    """A validated reply: each field is present iff the request asked for it."""

    report: dict | None = None
    signal: dict[str, torch.Tensor] | None = None
    update: dict[str, torch.Tensor] | None = None
    signal_metrics: dict | None = None


def message_type_for(req: RoundRequest) -> str:
    """Flower message type of a request: ``train`` when it asks for a signal/update."""
    return TRAIN if req.want != "none" else EVALUATE


def _exact_records(content: RecordDict, expected: dict[str, type], what: str) -> None:
    if not isinstance(content, RecordDict):
        raise PayloadError(f"{what}: content is not a RecordDict")
    names = set(content.keys())
    if names != set(expected):
        raise PayloadError(f"{what}: records {sorted(names)} differ from the declared {sorted(expected)}")
    for name, typ in expected.items():
        if not isinstance(content[name], typ):
            raise PayloadError(f"{what}: record {name!r} must be a {typ.__name__}")


def _expected_request(req: RoundRequest) -> dict[str, type]:
    exp: dict[str, type] = {"adapter": ArrayRecord, "config": ConfigRecord}
    if req.split != "none":
        exp["head"] = ArrayRecord
    return exp


def _expected_reply(req: RoundRequest) -> dict[str, type]:
    exp: dict[str, type] = {}
    if req.split != "none":
        exp["report"] = ConfigRecord
    if req.want == "signal":
        exp["signal"] = ArrayRecord
    if req.want == "unlearning_update":
        exp["update"] = ArrayRecord
    if req.want != "none":
        exp["signal_metrics"] = ConfigRecord
    return exp


def make_request(adapter: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor] | None,
                 req: RoundRequest) -> RecordDict:
    """Build a request (developer side).

    Raises:
        PayloadError: non-finite tensors, or a head given/missing against ``req.split``.
    """
    if (head is None) != (req.split == "none"):
        raise PayloadError("the head is sent exactly when an evaluation split is requested")
    content = RecordDict({"adapter": state_to_record(adapter), "config": ConfigRecord(req.model_dump())})
    if head is not None:
        content["head"] = state_to_record(head)
    return content


def parse_request(content: RecordDict, adapter_spec: Mapping[str, TensorSpec],
                  head_spec: Mapping[str, TensorSpec]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, RoundRequest]:
    """Validate a request against the auditor's own contract (auditor side).

    Raises:
        PayloadError: undeclared or missing records, a malformed config, a protocol version
            mismatch, or adapter/head contract violations.
    """
    if not isinstance(content, RecordDict) or not isinstance(content.get("config"), ConfigRecord):
        raise PayloadError("request: missing ConfigRecord 'config'")
    try:
        req = RoundRequest.model_validate(dict(content["config"]))
    except ValidationError as err:
        e = err.errors()[0]
        raise PayloadError(f"request config invalid: {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    if req.protocol != PROTOCOL_VERSION:
        raise PayloadError(f"protocol version {req.protocol} != {PROTOCOL_VERSION}")
    _exact_records(content, _expected_request(req), "request")
    adapter = record_to_state(content["adapter"], adapter_spec, "adapter")
    head = record_to_state(content["head"], head_spec, "head") if req.split != "none" else None
    return adapter, head, req


def _json_record(model: BaseModel, what: str) -> ConfigRecord:
    blob = model.model_dump_json()
    size = len(blob.encode("utf-8"))  # bytes, not characters (group names may be non-ASCII)
    if size > MAX_REPORT_BYTES:
        raise PayloadError(f"refusing to send {what} of {size} bytes > {MAX_REPORT_BYTES}")
    return ConfigRecord({"json": blob})


def _read_json_record(rec: ConfigRecord, schema: type[BaseModel], what: str) -> dict:
    if set(rec.keys()) != {"json"} or not isinstance(rec["json"], str):
        raise PayloadError(f"reply: record {what!r} must hold exactly one string 'json'")
    blob = rec["json"]
    size = len(blob.encode("utf-8"))  # bytes, not characters
    if size > MAX_REPORT_BYTES:
        raise PayloadError(f"reply: {what} of {size} bytes > {MAX_REPORT_BYTES}")
    try:
        return schema.model_validate(json.loads(blob)).model_dump()
    except (ValidationError, json.JSONDecodeError) as err:
        raise PayloadError(f"reply: invalid {what}: {err}") from None


def make_reply(req: RoundRequest, report: dict | None = None,
               signal: Mapping[str, torch.Tensor] | None = None,
               update: Mapping[str, torch.Tensor] | None = None,
               signal_metrics: dict | None = None,
               adapter_spec: Mapping[str, TensorSpec] | None = None) -> RecordDict:
    """Build a reply (auditor side): exactly the records ``req`` asked for, each validated.

    ``adapter_spec`` (required with ``signal``) is the adapter contract the signal must match.

    Raises:
        PayloadError: a record missing or not asked for, a report/metrics outside its schema,
            a signal whose keys/shapes/dtypes differ from the adapter's, non-finite values.
    """
    given = {"report": report, "signal": signal, "update": update, "signal_metrics": signal_metrics}
    expected = _expected_reply(req)
    present = {k for k, v in given.items() if v is not None}
    if present != set(expected):
        raise PayloadError(f"refusing to send records {sorted(present)}; the request asked for {sorted(expected)}")
    out = RecordDict()
    try:
        if report is not None:
            out["report"] = _json_record(FairnessReport.model_validate(report), "report")
        if signal_metrics is not None:
            out["signal_metrics"] = _json_record(SignalMetrics.model_validate(signal_metrics), "signal_metrics")
    except ValidationError as err:
        raise PayloadError(f"refusing to send: {err}") from None
    if signal is not None:
        if adapter_spec is None:
            raise PayloadError("a signal can only be sent against the adapter's contract")
        rec = state_to_record(signal)
        record_to_state(rec, adapter_spec, "signal")  # same checks the developer will apply
        out["signal"] = rec
    if update is not None:
        out["update"] = state_to_record(update)
    return out


def parse_reply(content: RecordDict, req: RoundRequest,
                adapter_spec: Mapping[str, TensorSpec] | None = None,
                update_spec: Mapping[str, TensorSpec] | None = None) -> Reply:
    """Validate a reply (developer side) against what ``req`` asked for.

    Raises:
        PayloadError: records not asked for or missing, schemas violated, a signal or update
            whose keys/shapes/dtypes differ from the developer's own adapter/modules, non-finite
            values.
    """
    _exact_records(content, _expected_reply(req), "reply")
    reply = Reply()
    if "report" in content:
        reply.report = _read_json_record(content["report"], FairnessReport, "report")
    if "signal_metrics" in content:
        reply.signal_metrics = _read_json_record(content["signal_metrics"], SignalMetrics, "signal_metrics")
    if "signal" in content:
        if adapter_spec is None:
            raise PayloadError("no adapter contract to check the signal against")
        reply.signal = record_to_state(content["signal"], adapter_spec, "signal")
    if "update" in content:
        if update_spec is None:
            raise PayloadError("no module contract to check the update against")
        reply.update = record_to_state(content["update"], update_spec, "update")
    return reply


# -- evaluation-only helpers -------------------------------------------------------------------


def make_evaluate_request(adapter: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor],
                          round_: int, split: str, fingerprint: str, method: str = "erm") -> RecordDict:
    """An evaluation-only request (``want="none"``)."""
    req = RoundRequest(round=round_, split=split, want="none", method=method,
                       fingerprint=fingerprint, protocol=PROTOCOL_VERSION)
    return make_request(adapter, head, req)


def parse_evaluate_request(content: RecordDict, adapter_spec: Mapping[str, TensorSpec],
                           head_spec: Mapping[str, TensorSpec]):
    """:func:`parse_request` for an evaluation-only request; refuses any other kind."""
    adapter, head, req = parse_request(content, adapter_spec, head_spec)
    if req.want != "none" or head is None:
        raise PayloadError("not an evaluation-only request")
    return adapter, head, req


def make_evaluate_reply(report: dict) -> RecordDict:
    """A reply carrying only a report (to an evaluation-only request)."""
    req = RoundRequest(round=0, split="val", want="none", method="erm", fingerprint="0" * 64,
                       protocol=PROTOCOL_VERSION)
    return make_reply(req, report=report)


def parse_evaluate_reply(content: RecordDict) -> dict:
    """Validate a report-only reply and return the report."""
    req = RoundRequest(round=0, split="val", want="none", method="erm", fingerprint="0" * 64,
                       protocol=PROTOCOL_VERSION)
    return parse_reply(content, req).report
