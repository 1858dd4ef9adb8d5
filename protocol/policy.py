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
  ``cond_B.weight``; ``detector``: FairNet's bias detector with its ``threshold`` τ;
  ``refit_basis``: ``basis`` (D, k) and ``mean`` (D,), the developer's principal directions of
  its own training features, with which a head refit's update is restricted). Its byte limit is derived from the contract: per array the exact data bytes of
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

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from pydantic import BaseModel

from .codec import MAX_NPY_HEADER_BYTES, PayloadError, check_keys, record_to_state
from .contracts import (
    array_record_limit,
    head_spec_from_state,
    record_nbytes,
    refit_basis_spec,
    update_spec_from_adapter,
)
from .methods import METHODS
from .model import TensorSpec
from .payloads import (
    MAX_CONFIG_BYTES,
    MAX_GROUPS,
    MAX_PRIVACY_BYTES,
    MAX_REPORT_BYTES,
    MAX_SIGNAL_METRICS_BYTES,
    FairnessReport,
    GroupStats,
    RoundRequest,
    SignalMetrics,
    check_min_group_size,
    parse_config_record,
    read_json_record,
    short_value,
)
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
    "refit_basis_spec",
    "sends_gated",
    "sends_head",
    "update_spec_from_adapter",
]

PROTOCOL_VERSION = 6
EVALUATE = "evaluate"
TRAIN = "train"
#: The Flower message types of the protocol; any other is refused.
MESSAGE_TYPES = (EVALUATE, TRAIN)
REQUEST = "request"
REPLY = "reply"

#: Cap on the UTF-8 bytes of a ``report`` JSON string.
# -- the table ----------------------------------------------------------------------------------

Kind = Literal["arrays", "config", "json"]
Contract = Literal["adapter", "head", "update", "cond_adapter", "detector", "refit_basis"]


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
_REFIT_BASIS = RecordRule("refit_basis", "arrays", "want == 'head'", lambda r: r.want == "head",
                          contract="refit_basis")
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
                                    (_ADAPTER, _HEAD, _COND_ADAPTER, _DETECTOR, _REFIT_BASIS, _CONFIG)),
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
        raise PayloadError(f"unknown message type {short_value(message_type)}; declared: {list(MESSAGE_TYPES)}")
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
