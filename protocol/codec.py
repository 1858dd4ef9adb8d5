"""Adapter/head state dicts to and from Flower ``ArrayRecord``, with exact contract checks.

A received record is accepted only if its keys are exactly the expected keys, every array has the
expected shape and dtype (checked both on the record's metadata and on the decoded array), and all
values are finite. Anything else raises :class:`PayloadError` naming the key and the problem;
nothing is loaded into a model before the whole record has passed.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from .model import TensorSpec

__all__ = ["PayloadError", "payload_digest", "payload_nbytes", "record_to_state", "state_to_record"]


class PayloadError(ValueError):
    """A message payload violates the agreed contract (keys, shapes, dtypes, finiteness, size)."""


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Encode a state dict (name → tensor) as an ``ArrayRecord``.

    Raises:
        PayloadError: a tensor contains NaN or infinite values (never send those).
    """
    clean = {}
    for k, v in state.items():
        t = v.detach().cpu()
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PayloadError(f"refusing to encode {k!r}: contains NaN or infinite values")
        clean[k] = t.contiguous()
    return ArrayRecord(clean)


def record_to_state(record: ArrayRecord, expected: Mapping[str, TensorSpec],
                    what: str = "payload") -> dict[str, torch.Tensor]:
    """Decode and check an ``ArrayRecord`` against the expected key → (shape, dtype) contract.

    Args:
        record: received record.
        expected: the receiver's own contract (built from its own model, never from the peer).
        what: name used in error messages (e.g. ``"adapter"``).

    Returns:
        name → tensor (CPU), with exactly the expected keys, shapes and dtypes.

    Raises:
        PayloadError: wrong type, missing or unexpected keys, shape or dtype mismatch (declared
            or actual), undecodable bytes, or non-finite values.
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"{what}: expected an ArrayRecord, got {type(record).__name__}")
    keys = set(record.keys())
    want = set(expected)
    if keys != want:
        missing = sorted(want - keys)[:5]
        extra = sorted(keys - want)[:5]
        raise PayloadError(f"{what}: key mismatch; missing {missing}, unexpected {extra}")
    out: dict[str, torch.Tensor] = {}
    for k, spec in expected.items():
        arr = record[k]
        if tuple(arr.shape) != spec.shape or arr.dtype != spec.dtype:
            raise PayloadError(
                f"{what}[{k!r}]: declared shape {tuple(arr.shape)} dtype {arr.dtype}, "
                f"expected shape {spec.shape} dtype {spec.dtype}"
            )
        try:
            nd = arr.numpy()
        except Exception as err:  # truncated or malformed buffer
            raise PayloadError(f"{what}[{k!r}]: cannot decode array bytes: {err}") from None
        if tuple(nd.shape) != spec.shape or str(nd.dtype) != spec.dtype:
            raise PayloadError(
                f"{what}[{k!r}]: decoded shape {nd.shape} dtype {nd.dtype} contradicts its header"
            )
        if nd.dtype.kind == "f" and not np.isfinite(nd).all():
            raise PayloadError(f"{what}[{k!r}]: contains NaN or infinite values")
        out[k] = torch.from_numpy(np.array(nd, copy=True))
    return out


def payload_nbytes(content: RecordDict) -> int:
    """Bytes of a message's records as Flower counts them (array buffers + config values).

    Excludes Flower's own envelope (metadata, protobuf framing), which is small and constant.
    """
    return int(sum(rec.count_bytes() for rec in content.values()))


def payload_digest(content: RecordDict) -> dict:
    """An audit summary of a message's records: what crossed, without the values.

    Returns ``{"records": {name: {"kind", "keys", "bytes"}}, "bytes": int, "sha256": str}``;
    ``keys`` lists a ConfigRecord's keys, or an ArrayRecord's array names. The SHA-256 covers
    record names, array names, dtypes, shapes and bytes, and config keys and values, in order,
    so two logs of the same message agree.
    """
    import hashlib
    import json

    h = hashlib.sha256()
    records = {}
    for name in sorted(content.keys()):
        rec = content[name]
        h.update(name.encode())
        if isinstance(rec, ArrayRecord):
            for key in rec.keys():
                arr = rec[key]
                h.update(f"{key}|{arr.dtype}|{tuple(arr.shape)}".encode())
                h.update(arr.data)
        else:
            h.update(json.dumps({k: rec[k] for k in rec.keys()}, sort_keys=True, default=str).encode())
        records[name] = {"kind": type(rec).__name__, "keys": list(rec.keys()), "bytes": int(rec.count_bytes())}
    return {"records": records, "bytes": payload_nbytes(content), "sha256": h.hexdigest()}
