"""The payload policy, declared in one place: what may cross, per message type and direction.

Every message is checked against :data:`POLICY` twice: by the sender before it leaves
(:func:`protocol.messages.make_request`, :func:`protocol.messages.make_reply`) and by the receiver
on receipt (:func:`protocol.messages.parse_request`, :func:`protocol.messages.parse_reply`), with
the same function, :func:`enforce`. A row of the table is a Flower message type (``train`` /
``evaluate``) × a direction (``request`` / ``reply``); it says which :class:`RoundRequest`\\ s the
row admits and which records the message holds, each a :class:`RecordRule`:

* its name and kind (``arrays``: an ``ArrayRecord``; ``config``: a ``ConfigRecord`` whose keys are
  the fields of a schema; ``json``: a ``ConfigRecord {"json": str}`` holding a schema as JSON);
* when it is present (a condition on the request; absent otherwise, and then refused);
* for ``arrays``, the tensor contract it must match exactly (``adapter``: the LoRA adapter's peft
  keys; ``head``: ``weight`` (C, D), ``bias`` (C,); ``update``: one ΔW (d_out, d_in) per LoRA
  target module; ``cond_adapter``: FairNet's conditional LoRA, ``<module>.cond_A.weight`` /
  ``cond_B.weight``; ``detector``: FairNet's bias detector with its ``threshold`` τ). Its byte limit is derived from the contract: per array the exact data bytes of
  the declared shape and dtype plus at most :data:`MAX_NPY_HEADER_BYTES` of ``.npy`` header;
* for ``config`` / ``json``, a pydantic schema (unknown keys refused, strict types, finite
  numbers only) and a byte cap.

The message's byte limit is the sum of its records' limits. On the auditor's outbound path
:func:`enforce` also refuses a report whose total ``n`` or any per-group ``n`` is below
``min_group_size``: nothing crosses but a declared signal (adapter-shaped gradient, per-module
update) and aggregate metrics over groups of at least that size.

Every refusal is a :class:`protocol.codec.PayloadError` naming the message, the record, the key
and what was expected versus what was found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .codec import MAX_NPY_HEADER_BYTES, PayloadError, check_keys, record_to_state
from .methods import METHODS
from .metrics import PER_GROUP_KEYS, REPORT_KEYS
from .model import TensorSpec, state_spec
from .privacy import PrivacyStatus

__all__ = [
    "EVALUATE",
    "MAX_CONFIG_BYTES",
    "MAX_GROUPS",
    "MAX_NPY_HEADER_BYTES",
    "MAX_PRIVACY_BYTES",
    "MAX_REPORT_BYTES",
    "MAX_SIGNAL_METRICS_BYTES",
    "MESSAGE_TYPES",
    "POLICY",
    "PROTOCOL_VERSION",
    "REPLY",
    "REQUEST",
    "TRAIN",
    "FairnessReport",
    "GroupStats",
    "MessagePolicy",
    "RecordRule",
    "RoundRequest",
    "SignalMetrics",
    "array_record_limit",
    "check_min_group_size",
    "declared_records",
    "enforce",
    "head_spec_from_state",
    "message_limit",
    "message_policy",
    "parse_config_record",
    "read_json_record",
    "record_nbytes",
    "sends_gated",
    "sends_head",
    "update_spec_from_adapter",
]

PROTOCOL_VERSION = 5
EVALUATE = "evaluate"
TRAIN = "train"
#: The Flower message types of the protocol; any other is refused.
MESSAGE_TYPES = (EVALUATE, TRAIN)
REQUEST = "request"
REPLY = "reply"

#: Cap on the UTF-8 bytes of a ``report`` JSON string.
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


# -- schemas of the non-tensor records ---------------------------------------------------------


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
    (:func:`protocol.tune.admit`). Absent: the auditor's own experiment.
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


# -- the table ----------------------------------------------------------------------------------

Kind = Literal["arrays", "config", "json"]
Contract = Literal["adapter", "head", "update", "cond_adapter", "detector"]


@dataclass(frozen=True)
class RecordRule:
    """One declared record of a message.

    ``when`` describes the condition under which the record is present (``present`` evaluates
    it on the request); ``contract`` names the tensor contract of an ``arrays`` record;
    ``schema`` and ``max_bytes`` apply to ``config`` / ``json`` records.
    """

    name: str
    kind: Kind
    when: str
    present: Callable[[RoundRequest], bool] = field(repr=False)
    contract: Contract | None = None
    schema: type[BaseModel] | None = None
    max_bytes: int | None = None

    @property
    def record_type(self) -> type:
        """The Flower record class of this record."""
        return ArrayRecord if self.kind == "arrays" else ConfigRecord


@dataclass(frozen=True)
class MessagePolicy:
    """One row of :data:`POLICY`: the requests it admits and the records of the message."""

    message_type: str
    direction: str
    admits: str
    admit: Callable[[RoundRequest], bool] = field(repr=False)
    records: tuple[RecordRule, ...]


def _always(req: RoundRequest) -> bool:
    return True


def _evaluates(req: RoundRequest) -> bool:
    return req.split != "none"


def _crosses(req: RoundRequest, what: str) -> bool:
    """Whether the method table's row of ``req.stage`` releases ``what`` (unknown method: no)."""
    spec = METHODS.get(req.stage)
    return spec is not None and what in spec.crosses


def _head_gradient(req: RoundRequest) -> bool:
    return req.want == "signal" and _crosses(req, "head_gradient")


def sends_head(req: RoundRequest) -> bool:
    """The developer's head goes with evaluations, head refits, τ choices, head-gradient signals
    and FairNet's signals (its minority cells are where the ERM model errs)."""
    return (req.split != "none" or req.want in ("head", "threshold") or _head_gradient(req)
            or (req.want == "signal" and sends_gated(req)))


def sends_gated(req: RoundRequest) -> bool:
    """Every request of a gated method (FairNet) carries its conditional LoRA and detector."""
    spec = METHODS.get(req.stage)
    return spec is not None and spec.gated


def _cond_gradient(req: RoundRequest) -> bool:
    return req.want == "signal" and _crosses(req, "cond_adapter_gradient")


_ADAPTER = RecordRule("adapter", "arrays", "always", _always, contract="adapter")
_HEAD = RecordRule("head", "arrays", "split != 'none' or want in ('head', 'threshold') or (want == "
                   "'signal' and the method crosses head_gradient or is gated)", sends_head, contract="head")
_COND_ADAPTER = RecordRule("cond_adapter", "arrays", "the method is gated (FairNet)", sends_gated,
                           contract="cond_adapter")
_DETECTOR = RecordRule("detector", "arrays", "the method is gated (FairNet)", sends_gated,
                       contract="detector")
_CONFIG = RecordRule("config", "config", "always", _always, schema=RoundRequest, max_bytes=MAX_CONFIG_BYTES)
_REPORT = RecordRule("report", "json", "split != 'none'", _evaluates, schema=FairnessReport,
                     max_bytes=MAX_REPORT_BYTES)
_SIGNAL = RecordRule("signal", "arrays", "want == 'signal' and the method does not cross "
                     "cond_adapter_gradient", lambda r: r.want == "signal" and not _cond_gradient(r),
                     contract="adapter")
_COND_SIGNAL = RecordRule("cond_signal", "arrays", "want == 'signal' and the method crosses "
                          "cond_adapter_gradient", _cond_gradient, contract="cond_adapter")
_HEAD_SIGNAL = RecordRule("head_signal", "arrays", "want == 'signal' and the method crosses head_gradient",
                          _head_gradient, contract="head")
_UPDATE = RecordRule("update", "arrays", "want == 'unlearning_update'",
                     lambda r: r.want == "unlearning_update", contract="update")
_NEW_HEAD = RecordRule("head", "arrays", "want == 'head'", lambda r: r.want == "head", contract="head")
_PRIVACY = RecordRule("privacy", "json", "always", _always, schema=PrivacyStatus,
                      max_bytes=MAX_PRIVACY_BYTES)
_SIGNAL_METRICS = RecordRule("signal_metrics", "json", "want != 'none'", lambda r: r.want != "none",
                             schema=SignalMetrics, max_bytes=MAX_SIGNAL_METRICS_BYTES)

#: The declared policy: (message type, direction) → what the message may hold.
POLICY: dict[tuple[str, str], MessagePolicy] = {
    (TRAIN, REQUEST): MessagePolicy(TRAIN, REQUEST, "want != 'none'", lambda r: r.want != "none",
                                    (_ADAPTER, _HEAD, _COND_ADAPTER, _DETECTOR, _CONFIG)),
    (TRAIN, REPLY): MessagePolicy(TRAIN, REPLY, "want != 'none'", lambda r: r.want != "none",
                                  (_REPORT, _SIGNAL, _HEAD_SIGNAL, _COND_SIGNAL, _UPDATE, _NEW_HEAD,
                                   _SIGNAL_METRICS, _PRIVACY)),
    (EVALUATE, REQUEST): MessagePolicy(EVALUATE, REQUEST, "want == 'none' and split != 'none'",
                                       lambda r: r.want == "none" and r.split != "none",
                                       (_ADAPTER, _HEAD, _COND_ADAPTER, _DETECTOR, _CONFIG)),
    (EVALUATE, REPLY): MessagePolicy(EVALUATE, REPLY, "want == 'none' and split != 'none'",
                                     lambda r: r.want == "none" and r.split != "none",
                                     (_REPORT, _PRIVACY)),
}


def message_policy(message_type: Any, direction: str) -> MessagePolicy:
    """The row of :data:`POLICY` for a message type and direction (``request`` / ``reply``).

    Raises:
        PayloadError: an unknown message type or direction.
    """
    if direction not in (REQUEST, REPLY):
        raise PayloadError(f"unknown direction {direction!r}; declared: {REQUEST!r}, {REPLY!r}")
    if not isinstance(message_type, str) or message_type not in MESSAGE_TYPES:
        raise PayloadError(f"unknown message type {_short(message_type)}; declared: {list(MESSAGE_TYPES)}")
    return POLICY[(message_type, direction)]


def declared_records(message_type: str, direction: str, req: RoundRequest) -> dict[str, RecordRule]:
    """Name → rule of the records a message of this type and direction must hold for ``req``.

    Raises:
        PayloadError: an unknown message type or direction, or a request the row does not
            admit (e.g. an ``evaluate`` message asking for a signal).
    """
    pol = message_policy(message_type, direction)
    if not pol.admit(req):
        raise PayloadError(
            f"{message_type} {direction}: the request (split={req.split!r}, want={req.want!r}) is not "
            f"admitted by message type {message_type!r} (requires {pol.admits})")
    return {r.name: r for r in pol.records if r.present(req)}


# -- contracts and limits -----------------------------------------------------------------------


def array_record_limit(spec: Mapping[str, TensorSpec]) -> int:
    """Most bytes an ``ArrayRecord`` matching ``spec`` may hold (array buffers, as Flower counts).

    Per array: the exact data bytes of its shape and dtype plus :data:`MAX_NPY_HEADER_BYTES`.

    Raises:
        PayloadError: a contract dtype that is not a NumPy dtype.
    """
    import numpy as np

    total = 0
    for k, s in spec.items():
        try:
            itemsize = np.dtype(s.dtype).itemsize
        except TypeError:
            raise PayloadError(f"contract of {k!r}: dtype {s.dtype!r} is not a NumPy dtype") from None
        total += math.prod(s.shape) * itemsize + MAX_NPY_HEADER_BYTES
    return total


def update_spec_from_adapter(adapter_spec: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """The unlearning-update contract implied by the adapter contract.

    For every LoRA module ``M`` with ``M.lora_A.weight`` (r, d_in) and ``M.lora_B.weight``
    (d_out, r) in the adapter, the update holds ``M``: (d_out, d_in) in the adapter's dtype. Equal
    to :func:`protocol.model.update_spec` when the base weights have the adapter's dtype.

    Raises:
        PayloadError: an adapter key that is not a LoRA ``A``/``B`` weight, a module with only
            one of the two, or shapes that do not compose.
    """
    parts: dict[str, dict[str, TensorSpec]] = {}
    for key, s in adapter_spec.items():
        for tag in ("lora_A", "lora_B"):
            suffix = f".{tag}.weight"
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[tag] = s
                break
        else:
            raise PayloadError(f"adapter key {key!r} is not a LoRA A/B weight; no update contract")
    out = {}
    for module, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise PayloadError(f"adapter module {module!r} lacks lora_A or lora_B; no update contract")
        a, b = ab["lora_A"], ab["lora_B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise PayloadError(f"adapter module {module!r}: A {a.shape} and B {b.shape} do not compose")
        out[module] = TensorSpec((b.shape[0], a.shape[1]), a.dtype)
    return out


def head_spec_from_state(head: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The contract of a head the sender holds: ``weight`` (C, D) and ``bias`` (C,), one dtype.

    Raises:
        PayloadError: other keys, non-tensors, or shapes/dtypes that are not a linear head's.
    """
    if set(head) != {"weight", "bias"}:
        raise PayloadError(f"head: keys {sorted(map(str, head))} differ from the declared ['bias', 'weight']")
    w, b = head["weight"], head["bias"]
    if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise PayloadError("head: weight and bias must be tensors")
    if w.ndim != 2 or tuple(b.shape) != (w.shape[0],) or w.dtype != b.dtype:
        raise PayloadError(f"head: weight {tuple(w.shape)} {w.dtype} and bias {tuple(b.shape)} {b.dtype} "
                           "are not a linear head's (C, D) and (C,) of one dtype")
    return state_spec(dict(head))


def record_nbytes(record: Any) -> int:
    """Bytes of a record's values: array buffers; config keys and values (UTF-8, numbers 8).

    Unlike Flower's ``count_bytes`` it never raises (empty lists, odd values count 0 or their
    ``len``).
    """
    def value_bytes(v: Any) -> int:
        if isinstance(v, str):
            return len(v.encode("utf-8", "surrogatepass"))
        if isinstance(v, (bytes, bytearray)):
            return len(v)
        if isinstance(v, bool):
            return 1
        if isinstance(v, (int, float)):
            return 8
        if isinstance(v, (list, tuple)):
            return sum(value_bytes(x) for x in v)
        return 0

    if isinstance(record, ArrayRecord):
        return sum(len(a.data) if isinstance(getattr(a, "data", None), (bytes, bytearray)) else 0
                   for a in record.values())
    if isinstance(record, ConfigRecord):
        return sum(value_bytes(k) + value_bytes(v) for k, v in record.items())
    return 0


def _record_limit(rule: RecordRule, contracts: Mapping[str, Mapping[str, TensorSpec] | None]) -> int:
    if rule.kind == "arrays":
        return array_record_limit(contracts[rule.contract] or {})
    return int(rule.max_bytes) + (len("json") if rule.kind == "json" else 0)


def message_limit(message_type: str, direction: str, req: RoundRequest,
                  contracts: Mapping[str, Mapping[str, TensorSpec] | None]) -> int:
    """Most bytes (:func:`record_nbytes` summed) a message may hold: its records' limits summed.

    ``contracts`` maps ``adapter`` / ``head`` / ``update`` to the receiver's tensor contracts.

    Raises:
        PayloadError: as :func:`declared_records`, or a needed contract missing.
    """
    rules = declared_records(message_type, direction, req)
    _require_contracts(rules, contracts, f"{message_type} {direction}")
    return sum(_record_limit(r, contracts) for r in rules.values())


def _require_contracts(rules: Mapping[str, RecordRule], contracts: Mapping[str, Any], what: str) -> None:
    for rule in rules.values():
        if rule.kind == "arrays" and contracts.get(rule.contract) is None:
            raise PayloadError(f"{what}: no {rule.contract} contract to check record {rule.name!r} against")


# -- enforcement ----------------------------------------------------------------------------------


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _validation_message(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(map(str, e["loc"])) or "(root)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    got = f"; got {_short(e['input'])}" if e["type"] not in ("missing", "json_invalid") else ""
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


def enforce(content: Any, message_type: str, direction: str, req: RoundRequest,
            contracts: Mapping[str, Mapping[str, TensorSpec] | None], *,
            min_group_size: int | None = None, what: str | None = None) -> dict[str, Any]:
    """Check a message against its row of :data:`POLICY` and decode its records.

    Args:
        content: the message's records.
        message_type: ``train`` / ``evaluate``.
        direction: ``request`` / ``reply``.
        req: the round request (for a request, the one parsed from its own ``config``).
        contracts: ``adapter`` / ``head`` / ``update`` → the checker's own tensor contracts
            (needed only for the array records the message declares).
        min_group_size: when given, a report with total ``n`` or any per-group ``n`` below it is
            refused.
        what: prefix of error messages (default ``"<message type> <direction>"``).

    Returns:
        record name → decoded value: ``dict[str, torch.Tensor]`` for arrays (exactly the
        contract's keys, shapes, dtypes; finite), a schema instance for ``config``, a dict for
        ``json`` records.

    Raises:
        PayloadError: unknown message type, a request the type does not admit, missing,
            undeclared or mistyped records, a record or the message over its byte limit, or a
            record's content outside its contract/schema.
    """
    what = what or f"{message_type} {direction}"
    if not isinstance(content, RecordDict):
        raise PayloadError(f"{what}: content is not a RecordDict, got {type(content).__name__}")
    rules = declared_records(message_type, direction, req)
    names = set(content.keys())
    if names != set(rules):
        raise PayloadError(
            f"{what}: records {sorted(names)} differ from the declared {sorted(rules)} "
            f"(missing {sorted(set(rules) - names)}, undeclared {sorted(names - set(rules))[:5]})")
    for name, rule in rules.items():
        if not isinstance(content[name], rule.record_type):
            raise PayloadError(f"{what}: record {name!r} must be a {rule.record_type.__name__}, "
                               f"got {type(content[name]).__name__}")
    _require_contracts(rules, contracts, what)
    for name, rule in rules.items():  # key sets first: the most telling error for a wrong record
        if rule.kind == "arrays":
            check_keys(content[name], contracts[rule.contract], f"{what}: {name}")
    total = limit_total = 0
    for name, rule in rules.items():
        size, limit = record_nbytes(content[name]), _record_limit(rule, contracts)
        if size > limit:
            raise PayloadError(f"{what}: record {name!r} holds {size} bytes > limit {limit} bytes")
        total += size
        limit_total += limit
    if total > limit_total:  # implied by the per-record limits; stated for the message as declared
        raise PayloadError(f"{what}: {total} bytes > message limit {limit_total} bytes")
    out: dict[str, Any] = {}
    for name, rule in rules.items():
        rec = content[name]
        if rule.kind == "arrays":
            out[name] = record_to_state(rec, contracts[rule.contract], f"{what}: {name}")
        elif rule.kind == "config":
            out[name] = parse_config_record(rec, rule.schema, name, what, rule.max_bytes)
        else:
            out[name] = read_json_record(rec, rule.schema, rule.max_bytes, name, what)
    if min_group_size is not None and "report" in out:
        check_min_group_size(out["report"], min_group_size, f"{what}: report")
    return out
