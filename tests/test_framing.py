"""Transport framing (protocol/framing.py): exact round trip, far fewer Flower objects, and a
clear PayloadError for every malformed frame."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from hypothesis import given, settings
from hypothesis import strategies as st

from fairsplit.protocol.codec import PayloadError, payload_digest, state_to_record
from fairsplit.protocol.framing import INDEX_SUFFIX, PACKED_KEY, pack, unpack


def _content(n: int = 40) -> RecordDict:
    state = {f"base.blocks.{i}.lora_A.weight": torch.randn(2, i + 1) for i in range(n)}
    return RecordDict({"adapter": state_to_record(state), "head": state_to_record({"w": torch.ones(3)}),
                       "config": ConfigRecord({"round": 1, "want": "signal"})})


def test_round_trip_through_flower_objects_is_exact_and_compact():
    content = _content()
    packed = pack(content)
    assert len(get_all_nested_objects(packed)) <= 12 and len(get_all_nested_objects(content)) > 80
    objs = get_all_nested_objects(packed)
    back = inflate_object_from_contents(packed.object_id, {k: v.deflate() for k, v in objs.items()})
    assert payload_digest(unpack(back)) == payload_digest(content)
    assert unpack(content) is content  # unframed content passes unchanged


def _frame() -> RecordDict:
    return pack(_content(3))


def _set_index(rd: RecordDict, index) -> RecordDict:
    rd["adapter" + INDEX_SUFFIX] = ConfigRecord({"json": json.dumps(index)})
    return rd


BAD = {
    "index without record": lambda rd: RecordDict({"x" + INDEX_SUFFIX: rd["adapter" + INDEX_SUFFIX]}),
    "record without index": lambda rd: RecordDict({"adapter": rd["adapter"], "z" + INDEX_SUFFIX:
                                                   ConfigRecord({"json": "[]"})}),
    "index not json": lambda rd: (rd.__setitem__("adapter" + INDEX_SUFFIX, ConfigRecord({"json": "[1,"})), rd)[1],
    "index wrong type": lambda rd: _set_index(rd, {"a": 1}),
    "entry malformed": lambda rd: _set_index(rd, [["k", "float32", [2, -1], "numpy.ndarray", 8]]),
    "lengths do not add up": lambda rd: _set_index(rd, [["k", "float32", [1], "numpy.ndarray", 3]]),
    "duplicate keys": lambda rd: _set_index(rd, [["k", "f", [], "s", 0], ["k", "f", [], "s", 0]]),
    "packed not raw": lambda rd: (rd.__setitem__("adapter", ArrayRecord({PACKED_KEY: Array(torch.ones(2).numpy())})), rd)[1],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_frames_are_refused(case):
    with pytest.raises(PayloadError, match="framing"):
        unpack(BAD[case](_frame()))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_index_never_escapes_as_another_error(garbage):
    rd = _frame()
    rd["adapter" + INDEX_SUFFIX] = ConfigRecord({"json": garbage.decode("latin-1")})
    with pytest.raises(PayloadError):
        unpack(rd)
