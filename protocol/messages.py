"""The messages the parties exchange, and the payload policy both sides enforce.

One message kind exists in this version, sent by the developer's ServerApp to the auditor's
ClientApp (Flower message type ``evaluate``):

request (developer → auditor), a ``RecordDict`` with exactly
    * ``"adapter"``: ``ArrayRecord``, the task LoRA adapter (peft state-dict keys);
    * ``"head"``: ``ArrayRecord``, the classification head (``weight`` (C, D), ``bias`` (C,));
    * ``"config"``: ``ConfigRecord`` ``{"round": int, "split": "val"|"test",
      "fingerprint": str, "protocol": int}``.

reply (auditor → developer), a ``RecordDict`` with exactly
    * ``"report"``: ``ConfigRecord`` ``{"json": str}``: a :class:`FairnessReport` (aggregate metrics
      over groups of at least the auditor's ``min_group_size``), at most ``MAX_REPORT_BYTES``.

Nothing per-example crosses: no attributes, predictions, scores or indices. Both the sender (before
sending) and the receiver (on receipt) validate against these schemas.
"""

from __future__ import annotations

import json
from typing import Literal, Mapping

import torch
from flwr.app import ConfigRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .codec import PayloadError, record_to_state, state_to_record
from .metrics import PER_GROUP_KEYS, REPORT_KEYS
from .model import TensorSpec

__all__ = [
    "EVALUATE",
    "PROTOCOL_VERSION",
    "EvaluateRequest",
    "FairnessReport",
    "make_evaluate_reply",
    "make_evaluate_request",
    "parse_evaluate_reply",
    "parse_evaluate_request",
]

PROTOCOL_VERSION = 1
EVALUATE = "evaluate"
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
    """The only content an evaluate reply may carry (see :func:`protocol.metrics.fairness_report`)."""

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


class EvaluateRequest(BaseModel):
    """The ``config`` record of an evaluate request."""

    model_config = ConfigDict(extra="forbid")
    round: int = Field(ge=0)
    split: Literal["val", "test"]
    fingerprint: str = Field(min_length=64, max_length=64)
    protocol: int


def _exact_records(content: RecordDict, expected: dict[str, type], what: str) -> None:
    if not isinstance(content, RecordDict):
        raise PayloadError(f"{what}: content is not a RecordDict")
    names = set(content.keys())
    if names != set(expected):
        raise PayloadError(
            f"{what}: records {sorted(names)} differ from the declared {sorted(expected)}"
        )
    for name, typ in expected.items():
        if not isinstance(content[name], typ):
            raise PayloadError(f"{what}: record {name!r} must be a {typ.__name__}")


def make_evaluate_request(adapter: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor],
                          round_: int, split: str, fingerprint: str) -> RecordDict:
    """Build an evaluate request (developer side). Raises PayloadError on non-finite tensors."""
    cfg = EvaluateRequest(round=round_, split=split, fingerprint=fingerprint, protocol=PROTOCOL_VERSION)
    return RecordDict({
        "adapter": state_to_record(adapter),
        "head": state_to_record(head),
        "config": ConfigRecord(cfg.model_dump()),
    })


def parse_evaluate_request(content: RecordDict, adapter_spec: Mapping[str, TensorSpec],
                           head_spec: Mapping[str, TensorSpec]
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], EvaluateRequest]:
    """Validate an evaluate request against the auditor's own contract (auditor side).

    Raises:
        PayloadError: undeclared or missing records, adapter/head contract violations, or a
            malformed config record.
    """
    from flwr.app import ArrayRecord

    _exact_records(content, {"adapter": ArrayRecord, "head": ArrayRecord, "config": ConfigRecord},
                   "evaluate request")
    try:
        cfg = EvaluateRequest.model_validate(dict(content["config"]))
    except ValidationError as err:
        raise PayloadError(f"evaluate request config invalid: {err.errors()[0]['loc']}: "
                           f"{err.errors()[0]['msg']}") from None
    if cfg.protocol != PROTOCOL_VERSION:
        raise PayloadError(f"protocol version {cfg.protocol} != {PROTOCOL_VERSION}")
    adapter = record_to_state(content["adapter"], adapter_spec, "adapter")
    head = record_to_state(content["head"], head_spec, "head")
    return adapter, head, cfg


def make_evaluate_reply(report: dict) -> RecordDict:
    """Build an evaluate reply (auditor side) after validating it against :class:`FairnessReport`.

    Raises:
        PayloadError: the report has undeclared keys, out-of-range values or is too large.
    """
    try:
        model = FairnessReport.model_validate(report)
    except ValidationError as err:
        raise PayloadError(f"refusing to send report: {err}") from None
    blob = model.model_dump_json()
    if len(blob) > MAX_REPORT_BYTES:
        raise PayloadError(f"refusing to send report of {len(blob)} bytes > {MAX_REPORT_BYTES}")
    return RecordDict({"report": ConfigRecord({"json": blob})})


def parse_evaluate_reply(content: RecordDict) -> dict:
    """Validate an evaluate reply (developer side) and return the report as a dict.

    Raises:
        PayloadError: undeclared records or keys, oversize, or a report that fails the schema.
    """
    _exact_records(content, {"report": ConfigRecord}, "evaluate reply")
    rec = content["report"]
    if set(rec.keys()) != {"json"} or not isinstance(rec["json"], str):
        raise PayloadError("evaluate reply: record 'report' must hold exactly one string 'json'")
    blob = rec["json"]
    if len(blob) > MAX_REPORT_BYTES:
        raise PayloadError(f"evaluate reply: report of {len(blob)} bytes > {MAX_REPORT_BYTES}")
    try:
        return FairnessReport.model_validate(json.loads(blob)).model_dump()
    except (ValidationError, json.JSONDecodeError) as err:
        raise PayloadError(f"evaluate reply: invalid report: {err}") from None
