"""Transport framing: each ``ArrayRecord`` crosses Flower as one array instead of one per tensor.

Flower moves a message as a tree of objects and transfers every object with its own HTTP request
at every hop (ServerApp → SuperLink → SuperNode → ClientApp process and back). A LoRA adapter of
DeiT-Tiny is 96 tensors, so one request/reply pair cost about 600 requests, several seconds on
loopback (``bench/round_latency.py``). :func:`pack` turns each ``ArrayRecord`` into a single
byte array (the arrays' serialised bytes back to back) plus a ``ConfigRecord`` index (key, dtype,
shape, serialisation type and byte length of each array); :func:`unpack` restores the identical
``RecordDict``. The payload policy (:mod:`protocol.policy`), the audit digests and byte counts are
all computed on the unpacked content, so framing changes no check and no result.

Both parties apply it right at the Flower boundary: the developer's ServerApp channel and the
auditor's executor.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from .codec import PayloadError

__all__ = ["INDEX_SUFFIX", "PACKED_KEY", "pack", "unpack"]

PACKED_KEY = "__packed__"
STYPE = "fairsplit.packed"
INDEX_SUFFIX = ".__index__"
_MAX_INDEX_BYTES = 1 << 20
_MAX_ARRAYS = 4096


def pack(content: RecordDict) -> RecordDict:
    """Frame every ``ArrayRecord`` of ``content`` as one uint8 array plus a JSON index.

    Other records (``ConfigRecord``, ``MetricRecord``) pass unchanged. Returns a new RecordDict.

    Raises:
        PayloadError: a record name already ends in the index suffix.
    """
    out = RecordDict()
    for name, rec in content.items():
        if name.endswith(INDEX_SUFFIX):
            raise PayloadError(f"record name {name!r} is reserved for framing")
        if not isinstance(rec, ArrayRecord):
            out[name] = rec
            continue
        index, blobs = [], []
        for key, arr in rec.items():
            data = bytes(arr.data)
            index.append([key, arr.dtype, list(arr.shape), arr.stype, len(data)])
            blobs.append(data)
        blob = b"".join(blobs)
        out[name] = ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(blob),), stype=STYPE,
                                                   data=blob)})
        out[name + INDEX_SUFFIX] = ConfigRecord({"json": json.dumps(index)})
    return out


def _index(rec, name: str) -> list:
    if not isinstance(rec, ConfigRecord) or set(rec.keys()) != {"json"} or not isinstance(rec["json"], str):
        raise PayloadError(f"framing: {name}{INDEX_SUFFIX} must be a ConfigRecord with one 'json' string")
    if len(rec["json"]) > _MAX_INDEX_BYTES:
        raise PayloadError(f"framing: {name}{INDEX_SUFFIX} is larger than {_MAX_INDEX_BYTES} bytes")
    try:
        index = json.loads(rec["json"])
    except (json.JSONDecodeError, RecursionError) as err:
        raise PayloadError(f"framing: {name}{INDEX_SUFFIX} is not valid JSON ({err})") from None
    if not isinstance(index, list) or len(index) > _MAX_ARRAYS:
        raise PayloadError(f"framing: {name}{INDEX_SUFFIX} must be a list of at most {_MAX_ARRAYS} entries")
    for entry in index:
        ok = (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[0], str)
              and isinstance(entry[1], str) and isinstance(entry[2], list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[2])
              and isinstance(entry[3], str) and isinstance(entry[4], int)
              and not isinstance(entry[4], bool) and entry[4] >= 0)
        if not ok:
            raise PayloadError(f"framing: malformed entry in {name}{INDEX_SUFFIX}: {str(entry)[:120]}")
    keys = [e[0] for e in index]
    if len(set(keys)) != len(keys):
        raise PayloadError(f"framing: duplicate keys in {name}{INDEX_SUFFIX}")
    return index


def unpack(content: RecordDict) -> RecordDict:
    """Undo :func:`pack`. Content without framing is returned unchanged (same object).

    Raises:
        PayloadError: an index without its packed record (or the reverse), malformed index JSON,
            byte lengths that do not add up to the packed array's size.
    """
    names = list(content.keys())
    if not any(n.endswith(INDEX_SUFFIX) for n in names):
        return content
    out = RecordDict()
    for name in names:
        if name.endswith(INDEX_SUFFIX):
            base = name[: -len(INDEX_SUFFIX)]
            if base not in content:
                raise PayloadError(f"framing: index {name!r} without the record {base!r}")
            continue
        rec = content[name]
        if name + INDEX_SUFFIX not in content:
            if isinstance(rec, ArrayRecord) and PACKED_KEY in rec:
                raise PayloadError(f"framing: packed record {name!r} without its index")
            out[name] = rec
            continue
        if (not isinstance(rec, ArrayRecord) or list(rec.keys()) != [PACKED_KEY]
                or rec[PACKED_KEY].stype != STYPE or not isinstance(rec[PACKED_KEY].data, bytes)):
            raise PayloadError(f"framing: {name!r} must be an ArrayRecord with one {PACKED_KEY!r} "
                               f"array of raw bytes")
        index = _index(content[name + INDEX_SUFFIX], name)
        blob = bytes(rec[PACKED_KEY].data)
        total = sum(e[4] for e in index)
        if total != len(blob):
            raise PayloadError(f"framing: {name!r} index lists {total} bytes, the packed array "
                               f"has {len(blob)}")
        arrays, pos = {}, 0
        for key, dtype, shape, stype, length in index:
            arrays[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=blob[pos:pos + length])
            pos += length
        out[name] = ArrayRecord(arrays)
    return out
