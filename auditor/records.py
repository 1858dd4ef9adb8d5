"""The one codec between Flower records and plain torch objects on the auditor's disk.

A ``RecordDict`` (array and config records) becomes ``{name: {"kind": "array" | "config",
"data": tensors | values}}``, which ``torch.save`` writes and ``torch.load(weights_only=True)``
reads back without running code. The per-round snapshots (:mod:`auditor.snapshots`) and the
stored replies (:mod:`auditor.state`) both use it.
"""

from __future__ import annotations

import io

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

__all__ = ["load_records", "records_bytes", "records_from_plain", "records_to_plain"]


def records_to_plain(content: RecordDict) -> dict:
    """``content`` as ``{name: {"kind": "array", "data": {key: tensor}} | {"kind": "config",
    "data": {key: value}}}``, in the records' order."""
    return {name: ({"kind": "array", "data": rec.to_torch_state_dict()}
                   if isinstance(rec, ArrayRecord) else {"kind": "config", "data": dict(rec)})
            for name, rec in content.items()}


def records_from_plain(obj: dict) -> RecordDict:
    """The inverse of :func:`records_to_plain`.

    Raises:
        KeyError / TypeError: ``obj`` is not of that form.
    """
    out = RecordDict()
    for name, rec in obj.items():
        out[name] = ArrayRecord(rec["data"]) if rec["kind"] == "array" else ConfigRecord(rec["data"])
    return out


def records_bytes(content: RecordDict) -> bytes:
    """``content`` serialised with ``torch.save`` (:func:`records_to_plain`)."""
    buf = io.BytesIO()
    torch.save(records_to_plain(content), buf)
    return buf.getvalue()


def load_records(data: bytes) -> RecordDict:
    """The inverse of :func:`records_bytes` (``weights_only`` loading: no code runs)."""
    return records_from_plain(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
