"""Evaluation-only messages: a request for a report alone (``want = "none"``) and its reply,
built and checked with the same policy as every round's messages (:mod:`protocol.messages`).
"""

from __future__ import annotations

from typing import Mapping

import torch
from flwr.app import RecordDict
from pydantic import ValidationError

from .codec import PayloadError
from .messages import make_reply, make_request, parse_reply, parse_request
from .model import TensorSpec
from .policy import PROTOCOL_VERSION, RoundRequest

__all__ = ["make_evaluate_reply", "make_evaluate_request", "parse_evaluate_reply", "parse_evaluate_request"]

_EVAL_REQ = dict(round=0, split="val", want="none", method="erm", fingerprint="0" * 64,
                 protocol=PROTOCOL_VERSION)


def make_evaluate_request(adapter: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor],
                          round_: int, split: str, fingerprint: str, method: str = "erm") -> RecordDict:
    """An evaluation-only request (``want="none"``, ``split`` ``val`` or ``test``).

    Raises:
        PayloadError: as :func:`make_request`, or request fields outside :class:`RoundRequest`.
    """
    try:
        req = RoundRequest(round=round_, split=split, want="none", method=method,
                           fingerprint=fingerprint, protocol=PROTOCOL_VERSION)
    except ValidationError as err:
        raise PayloadError(f"refusing to send request: {err.errors()[0]['msg']}") from None
    return make_request(adapter, head, req)


def parse_evaluate_request(content: RecordDict, adapter_spec: Mapping[str, TensorSpec],
                           head_spec: Mapping[str, TensorSpec]):
    """:func:`parse_request` for an evaluation-only request; refuses any other kind.

    Returns:
        ``(adapter, head, req)`` as :func:`parse_request`, ``head`` never ``None``.

    Raises:
        PayloadError: as :func:`parse_request`, or a request that is not evaluation-only.
    """
    adapter, head, req = parse_request(content, adapter_spec, head_spec)
    if req.want != "none" or head is None:
        raise PayloadError("not an evaluation-only request")
    return adapter, head, req


def make_evaluate_reply(report: dict, min_group_size: int | None = None) -> RecordDict:
    """A reply carrying only a report (to an evaluation-only request).

    Raises:
        PayloadError: as :func:`make_reply`.
    """
    return make_reply(RoundRequest(**_EVAL_REQ), report=report, min_group_size=min_group_size)


def parse_evaluate_reply(content: RecordDict) -> dict:
    """Validate a report-only reply and return the report.

    Raises:
        PayloadError: as :func:`parse_reply`.
    """
    return parse_reply(content, RoundRequest(**_EVAL_REQ)).report
