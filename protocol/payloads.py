"""The schemas of the non-tensor records that cross (pydantic: unknown keys refused, strict
types, finite numbers only), and their byte caps: the request's ``config``
(:class:`RoundRequest`), a ``report`` (:class:`FairnessReport`), ``signal_metrics``
(:class:`SignalMetrics`). The payload policy (:mod:`protocol.policy`) says which cross when.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from flwr.app import ConfigRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .codec import PayloadError
from .contracts import record_nbytes

from .metrics import PER_GROUP_KEYS, REPORT_KEYS

__all__ = ["MAX_CONFIG_BYTES", "MAX_GROUPS", "MAX_PRIVACY_BYTES", "MAX_REPORT_BYTES", "MAX_SIGNAL_METRICS_BYTES",
           "FairnessReport", "GroupStats", "RoundRequest", "SignalMetrics", "check_min_group_size",
           "parse_config_record", "read_json_record", "short_value"]

MAX_REPORT_BYTES = 64 * 1024
#: Cap on the UTF-8 bytes of a ``signal_metrics`` JSON string.
MAX_SIGNAL_METRICS_BYTES = 4 * 1024
#: Cap on a request's ``config`` record (keys + values, UTF-8 bytes; numbers count 8); it holds
#: the experiment's JSON (a per-block LoRA placement of a 12-block ViT is about 1.5 KiB).
MAX_CONFIG_BYTES = 16 * 1024
#: Cap on the UTF-8 bytes of a ``privacy`` JSON string.
MAX_PRIVACY_BYTES = 512
#: Most sensitive groups a report may list.
MAX_GROUPS = 64

_STRICT_FINITE = ConfigDict(extra="forbid", allow_inf_nan=False)


class GroupStats(BaseModel):
    """Aggregate statistics of one sensitive group (fairlearn definitions)."""

    model_config = _STRICT_FINITE
    n: int = Field(ge=1)
    accuracy: float | None = Field(None, ge=0, le=1)
    selection_rate: float | None = Field(None, ge=0, le=1)
    tpr: float | None = Field(None, ge=0, le=1)
    fpr: float | None = Field(None, ge=0, le=1)


class FairnessReport(BaseModel):
    """The content of a ``report`` record (see :func:`protocol.metrics.fairness_report`)."""

    model_config = _STRICT_FINITE
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
    that batch, a leakage measure; ``signal_norm``: L2 norm of the returned signal (for a refitted
    head: of its change); ``lam``: the λ the auditor used, when it chooses it (the penalty's
    dual-ascent multiplier, last_layer's α chosen on validation); ``tau``: FairNet's gate
    threshold chosen on validation; ``detector_auc``: ROC AUC of the developer's bias detector
    p(x) for the auditor's minority membership on the batch (docs/methods.md says what it
    reveals).
    """

    model_config = _STRICT_FINITE
    n: int = Field(ge=1)
    objective: float
    sensitive_accuracy: float | None = Field(None, ge=0, le=1)
    signal_norm: float = Field(ge=0)
    lam: float | None = Field(None, ge=0)
    tau: float | None = Field(None, ge=0, le=1)
    detector_auc: float | None = Field(None, ge=0, le=1)


class RoundRequest(BaseModel):
    """The ``config`` record of a request.

    ``method``: the experiment's method; ``stage``: the method whose row of the method table
    governs this request (:func:`protocol.methods.request_plan`): ``method`` itself (the
    default), or last_layer's first stage for that stage's requests. ``experiment``: the
    developer's ``[experiment]`` as canonical JSON without the model's local weights path
    (:func:`protocol.config.experiment_json`), whose fingerprint is ``fingerprint``; an auditor
    with a ``[tune]`` table serves it when its search space admits it
    (:func:`protocol.trials.admit`). Absent: the auditor's own experiment.
    """

    model_config = _STRICT_FINITE
    round: int = Field(ge=0)
    split: Literal["none", "val", "test"]
    want: Literal["none", "signal", "unlearning_update", "head", "threshold"]
    method: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_\-]+$")
    stage: str | None = Field(None, min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_\-]+$")
    fingerprint: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")
    protocol: int
    experiment: str | None = Field(None, min_length=2, max_length=MAX_CONFIG_BYTES)

    @model_validator(mode="after")
    def _stage_defaults_to_method(self) -> "RoundRequest":
        if self.stage is None:
            object.__setattr__(self, "stage", self.method)
        return self


def short_value(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (for error messages)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _validation_message(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(map(str, e["loc"])) or "(root)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    got = f"; got {short_value(e['input'])}" if e["type"] not in ("missing", "json_invalid") else ""
    return f"{loc}: {e['msg']}{got}{more}"


def parse_config_record(rec: Any, schema: type[BaseModel], name: str, prefix: str = "request",
                        max_bytes: int | None = None) -> BaseModel:
    """Validate a ``ConfigRecord`` whose keys are the fields of ``schema`` (strict types).

    Raises:
        PayloadError: not a ConfigRecord, more than ``max_bytes`` (:func:`record_nbytes`),
            unknown or missing keys, wrong value types, values out of range (the message names
            the record, the key, the expectation and the value found).
    """
    if not isinstance(rec, ConfigRecord):
        raise PayloadError(f"{prefix}: record {name!r} must be a ConfigRecord, got {type(rec).__name__}")
    if max_bytes is not None and record_nbytes(rec) > max_bytes:
        raise PayloadError(f"{prefix}: record {name!r} holds {record_nbytes(rec)} bytes > limit {max_bytes} bytes")
    try:
        return schema.model_validate(dict(rec), strict=True)
    except ValidationError as err:
        raise PayloadError(f"{prefix}: {name} invalid: {_validation_message(err)}") from None


def read_json_record(rec: Any, schema: type[BaseModel], max_bytes: int, name: str,
                     prefix: str = "reply") -> dict:
    """Validate a ``ConfigRecord {"json": str}`` holding ``schema`` as JSON; return it as a dict.

    Strict JSON: unknown keys, wrong types, NaN/Infinity and values out of range are refused.
    ``name`` (the record's name) and ``prefix`` (the message) appear in error messages.

    Raises:
        PayloadError: another record type or key set, a non-string, more than ``max_bytes``
            UTF-8 bytes, malformed JSON or a schema violation.
    """
    if not isinstance(rec, ConfigRecord) or set(rec.keys()) != {"json"} or not isinstance(rec["json"], str):
        raise PayloadError(f"{prefix}: record {name!r} must hold exactly one string 'json'")
    blob = rec["json"]
    try:
        data = blob.encode("utf-8")  # bytes, not characters (group names may be non-ASCII)
    except UnicodeEncodeError:
        raise PayloadError(f"{prefix}: record {name!r}: 'json' is not valid UTF-8 text") from None
    if len(data) > max_bytes:
        raise PayloadError(f"{prefix}: {name} of {len(data)} bytes > limit {max_bytes} bytes")
    try:
        return schema.model_validate_json(data, strict=True).model_dump()
    except ValidationError as err:
        raise PayloadError(f"{prefix}: invalid {name}: {_validation_message(err)}") from None


def check_min_group_size(report: Mapping[str, Any], min_group_size: int, what: str = "report") -> None:
    """Refuse a report over fewer than ``min_group_size`` examples in total or in any group.

    Raises:
        PayloadError: naming the group(s) and their ``n``.
    """
    if report["n"] < min_group_size:
        raise PayloadError(f"{what}: total n={report['n']} < min_group_size={min_group_size}; "
                           "refusing to report over so few examples")
    small = {g: s["n"] for g, s in report["per_group"].items() if s["n"] < min_group_size}
    if small:
        names = dict(list(small.items())[:5])
        raise PayloadError(f"{what}: group(s) {names} have n < min_group_size={min_group_size}; "
                           "refusing to report metrics over them")
