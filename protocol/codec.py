"""Adapter/head state dicts to and from Flower ``ArrayRecord``, with exact contract checks.

A received record is accepted only if its keys are exactly the expected keys, every array has the
expected shape and dtype (checked both on the record's metadata and on the decoded array), and all
values are finite. Anything else raises :class:`PayloadError` naming the key and the problem;
nothing is loaded into a model before the whole record has passed. Array bytes are parsed as
``.npy`` (header read without unpickling, data taken with ``np.frombuffer``): the header must agree
with the declared shape and dtype and the data must be exactly as long as they say.

Which records a message may hold, and their byte limits, are declared in :mod:`protocol.policy`.
"""

from __future__ import annotations

import io
import math
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from .model import TensorSpec

__all__ = [
    "MAX_NPY_HEADER_BYTES",
    "NPY_STYPE",
    "PayloadError",
    "check_keys",
    "payload_digest",
    "payload_nbytes",
    "record_to_state",
    "state_to_record",
]


class PayloadError(ValueError):
    """A message payload violates the agreed contract (keys, shapes, dtypes, finiteness, size)."""


#: Serialisation of every array that crosses (Flower's ``Array.stype`` for ``.npy`` bytes).
NPY_STYPE = "numpy.ndarray"
#: Most bytes of ``.npy`` header (magic, version, length, header dict) allowed before an array's
#: data; NumPy writes 128 for the shapes of an adapter or head.
MAX_NPY_HEADER_BYTES = 1024


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Encode a state dict (name → tensor) as an ``ArrayRecord`` (``.npy`` bytes, C order).

    Raises:
        PayloadError: a key that is not a string, a value that is not a tensor, a tensor NumPy
            cannot represent (e.g. bfloat16), or NaN/infinite values (never send those).
    """
    arrays = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise PayloadError(f"refusing to encode key {k!r}: keys must be strings")
        if not isinstance(v, torch.Tensor):
            raise PayloadError(f"refusing to encode {k!r}: expected a torch.Tensor, got {type(v).__name__}")
        t = v.detach().cpu().contiguous()
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            raise PayloadError(f"refusing to encode {k!r}: contains NaN or infinite values")
        try:
            arrays[k] = Array(t)
        except (TypeError, RuntimeError, ValueError) as err:
            raise PayloadError(f"refusing to encode {k!r} ({t.dtype}): {err}") from None
    return ArrayRecord(arrays)


def _declared(arr: Array) -> tuple[tuple[int, ...] | None, str | None]:
    shape = getattr(arr, "shape", None)
    try:
        shape = tuple(int(d) for d in shape) if all(isinstance(d, int) for d in shape) else None
    except TypeError:
        shape = None
    dtype = getattr(arr, "dtype", None)
    return shape, dtype if isinstance(dtype, str) else None


def _decode_array(arr: Array, spec: TensorSpec, label: str) -> np.ndarray:
    """One array of a record → a C-ordered NumPy array matching ``spec`` exactly.

    The ``.npy`` header is parsed without unpickling; its shape and dtype must equal the declared
    ones, and the bytes after it must be exactly ``prod(shape) * itemsize`` (truncated or
    extended buffers are refused).
    """
    if not isinstance(arr, Array):
        raise PayloadError(f"{label}: expected a flwr Array, got {type(arr).__name__}")
    shape, dtype = _declared(arr)
    if shape != spec.shape or dtype != spec.dtype:
        raise PayloadError(
            f"{label}: declared shape {shape if shape is not None else getattr(arr, 'shape', None)} "
            f"dtype {dtype if dtype is not None else getattr(arr, 'dtype', None)}, "
            f"expected shape {spec.shape} dtype {spec.dtype}"
        )
    if arr.stype != NPY_STYPE:
        raise PayloadError(f"{label}: serialisation {arr.stype!r}, expected {NPY_STYPE!r}")
    data = arr.data
    if not isinstance(data, (bytes, bytearray)):
        raise PayloadError(f"{label}: data must be bytes, got {type(data).__name__}")
    try:
        want = np.dtype(spec.dtype)
    except TypeError:
        raise PayloadError(f"{label}: contract dtype {spec.dtype!r} is not a NumPy dtype") from None
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            h_shape, fortran, h_dtype = np.lib.format.read_array_header_1_0(
                buf, max_header_size=MAX_NPY_HEADER_BYTES)
        elif version == (2, 0):
            h_shape, fortran, h_dtype = np.lib.format.read_array_header_2_0(
                buf, max_header_size=MAX_NPY_HEADER_BYTES)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as err:  # truncated, malformed or oversized header
        raise PayloadError(f"{label}: cannot decode array bytes: {err}") from None
    if tuple(h_shape) != spec.shape or h_dtype != want:
        raise PayloadError(
            f"{label}: decoded shape {tuple(h_shape)} dtype {h_dtype} contradicts its header "
            f"(shape {spec.shape} dtype {spec.dtype})"
        )
    offset = buf.tell()
    count = math.prod(spec.shape)
    expected, got = count * want.itemsize, len(data) - offset
    if got != expected:
        state = "truncated" if got < expected else "extended"
        raise PayloadError(f"{label}: {state} array bytes: {got} data bytes after the header, "
                           f"expected {expected} for shape {spec.shape} dtype {spec.dtype}")
    nd = np.frombuffer(data, dtype=want, count=count, offset=offset)
    return np.array(nd.reshape(spec.shape, order="F" if fortran else "C"), order="C", copy=True)


def check_keys(record: ArrayRecord, expected: Mapping[str, TensorSpec], what: str = "payload") -> None:
    """Check that ``record`` is an ``ArrayRecord`` with exactly the contract's keys.

    Raises:
        PayloadError: another type, or missing/unexpected keys (up to five of each named).
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"{what}: expected an ArrayRecord, got {type(record).__name__}")
    keys = set(record.keys())
    want = set(expected)
    if keys != want:
        missing = sorted(want - keys)[:5]
        extra = sorted(keys - want)[:5]
        raise PayloadError(f"{what}: key mismatch; missing {missing}, unexpected {extra}")


def record_to_state(record: ArrayRecord, expected: Mapping[str, TensorSpec],
                    what: str = "payload") -> dict[str, torch.Tensor]:
    """Decode and check an ``ArrayRecord`` against the expected key → (shape, dtype) contract.

    Args:
        record: received record.
        expected: the receiver's own contract (built from its own model, never from the peer).
        what: name used in error messages (e.g. ``"adapter"``).

    Returns:
        name → tensor (CPU, its own memory), with exactly the expected keys, shapes and dtypes.

    Raises:
        PayloadError: wrong type, missing or unexpected keys, shape or dtype mismatch (declared
            or in the ``.npy`` header), another serialisation than ``.npy``, truncated or
            extended bytes, a malformed header, or non-finite values; the message names the
            record and the key.
    """
    check_keys(record, expected, what)
    out: dict[str, torch.Tensor] = {}
    for k, spec in expected.items():
        label = f"{what}[{k!r}]"
        nd = _decode_array(record[k], spec, label)
        if nd.dtype.kind in "fc" and not np.isfinite(nd).all():
            raise PayloadError(f"{label}: contains NaN or infinite values")
        try:
            out[k] = torch.from_numpy(nd)
        except TypeError as err:  # a NumPy dtype torch lacks (e.g. uint32 on old torch)
            raise PayloadError(f"{label}: dtype {nd.dtype} has no torch equivalent: {err}") from None
    return out


def _count_bytes(rec) -> int:
    """``rec.count_bytes()``, or the same count where Flower's raises (e.g. an empty list value):
    the audit of a malformed message must not fail with another error than the message's own."""
    try:
        return int(rec.count_bytes())
    except Exception:  # noqa: BLE001 - Flower raises IndexError/ValueError on odd values
        total = 0
        for k, v in rec.items():
            total += len(k)
            for x in (v if isinstance(v, list) else [v]):
                if isinstance(x, (str, bytes)):
                    total += len(x)
                elif isinstance(x, bool):
                    total += 1
                elif isinstance(x, (int, float)):
                    total += 8
                elif isinstance(getattr(x, "data", None), (bytes, bytearray)):
                    total += len(x.data)
        return total


def payload_nbytes(content: RecordDict) -> int:
    """Bytes of a message's records as Flower counts them (array buffers + config values).

    Excludes Flower's own envelope (metadata, protobuf framing), which is small and constant.
    Never raises on a malformed record (it is used to log refused messages too).
    """
    return int(sum(_count_bytes(rec) for rec in content.values()))


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
        records[name] = {"kind": type(rec).__name__, "keys": list(rec.keys()), "bytes": _count_bytes(rec)}
    return {"records": records, "bytes": payload_nbytes(content), "sha256": h.hexdigest()}
