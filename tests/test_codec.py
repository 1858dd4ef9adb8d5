"""protocol.codec and protocol.messages: exact payload contracts in both directions."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fairsplit.protocol.codec import PayloadError, payload_digest, payload_nbytes, record_to_state, state_to_record
from fairsplit.protocol.evaluation import (
    make_evaluate_reply,
    make_evaluate_request,
    parse_evaluate_reply,
    parse_evaluate_request,
)
from fairsplit.protocol.messages import (
    MAX_REPORT_BYTES,
    PROTOCOL_VERSION,
    RoundRequest,
)
from fairsplit.protocol.metrics import fairness_report
from fairsplit.protocol.model import TensorSpec, state_spec

FP = "ab" * 32  # a 64-character fingerprint


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.blocks.0.attn.qkv.lora_A.weight": torch.randn(2, 8, generator=g),
        "base_model.model.blocks.0.attn.qkv.lora_B.weight": torch.randn(24, 2, generator=g),
        "half": torch.randn(3, generator=g).half(),
        "double": torch.randn(2, 2, generator=g).double(),
        "steps": torch.arange(5),
    }


def _head(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(2, 8, generator=g), "bias": torch.randn(2, generator=g)}


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# codec
# ------------------------------------------------------------------------------------------


def test_state_round_trip_is_exact():
    state = _state()
    rec = state_to_record(state)
    assert isinstance(rec, ArrayRecord)
    spec = state_spec(state)
    assert spec["half"] == TensorSpec((3,), "float16")
    assert spec["steps"] == TensorSpec((5,), "int64")
    out = record_to_state(rec, spec)
    assert set(out) == set(state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(out[k], v), k
    # The decoded tensors do not share memory with the record.
    out["steps"][0] = 99
    assert record_to_state(rec, spec)["steps"][0] == 0


def test_state_to_record_accepts_non_contiguous_and_grad_tensors():
    w = torch.randn(4, 3, requires_grad=True)
    state = {"t": w.t(), "g": w * 2}
    out = record_to_state(state_to_record(state), state_spec({k: v.detach() for k, v in state.items()}))
    assert torch.equal(out["t"], w.detach().t())
    assert torch.equal(out["g"], (w * 2).detach())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encoding_non_finite_is_refused(bad):
    state = _state()
    state["double"][1, 1] = bad
    with pytest.raises(PayloadError, match="'double'"):
        state_to_record(state)


def test_missing_key_is_named():
    state = _state()
    spec = state_spec(state)
    del state["half"]
    with pytest.raises(PayloadError, match="half") as info:
        record_to_state(state_to_record(state), spec, "adapter")
    assert "missing" in str(info.value) and "adapter" in str(info.value)


def test_extra_key_is_named():
    state = _state()
    spec = state_spec(state)
    state["sneaky_scores"] = torch.zeros(3)
    with pytest.raises(PayloadError, match="sneaky_scores") as info:
        record_to_state(state_to_record(state), spec)
    assert "unexpected" in str(info.value)


def test_wrong_shape_is_named():
    state = _state()
    spec = state_spec(state)
    state["base_model.model.blocks.0.attn.qkv.lora_A.weight"] = torch.zeros(3, 8)
    with pytest.raises(PayloadError, match=r"lora_A\.weight.*shape"):
        record_to_state(state_to_record(state), spec)


def test_wrong_dtype_is_named():
    state = _state()
    spec = state_spec(state)
    state["half"] = state["half"].float()
    with pytest.raises(PayloadError, match=r"'half'.*float32"):
        record_to_state(state_to_record(state), spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_in_received_record_are_named(bad):
    arr = np.zeros((2, 2), dtype=np.float32)
    arr[0, 1] = bad
    rec = ArrayRecord({"ok": Array(np.ones(2, np.float32)), "w": Array(arr)})
    spec = {"ok": TensorSpec((2,), "float32"), "w": TensorSpec((2, 2), "float32")}
    with pytest.raises(PayloadError, match=r"head\['w'\].*NaN or infinite"):
        record_to_state(rec, spec, "head")


def test_header_contradicting_bytes_is_refused():
    # Declared (2, 3) float32 but the bytes hold a (3, 2) array.
    arr = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray",
                data=_npy_bytes(np.zeros((3, 2), np.float32)))
    rec = ArrayRecord({"w": arr})
    with pytest.raises(PayloadError, match=r"'w'.*contradicts"):
        record_to_state(rec, {"w": TensorSpec((2, 3), "float32")})
    # Declared float32 but the bytes hold float64.
    arr = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray",
                data=_npy_bytes(np.zeros((2, 3), np.float64)))
    with pytest.raises(PayloadError, match=r"'w'.*contradicts"):
        record_to_state(ArrayRecord({"w": arr}), {"w": TensorSpec((2, 3), "float32")})


def test_truncated_bytes_are_refused():
    data = _npy_bytes(np.zeros((2, 3), np.float32))
    arr = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data[: len(data) - 7])
    with pytest.raises(PayloadError, match="'w'"):
        record_to_state(ArrayRecord({"w": arr}), {"w": TensorSpec((2, 3), "float32")})


def test_extended_bytes_are_refused():
    # np.load would ignore trailing bytes; the codec refuses them.
    data = _npy_bytes(np.zeros((2, 3), np.float32))
    arr = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data + b"\0" * 8)
    with pytest.raises(PayloadError, match=r"'w'.*extended.*32 data bytes.*expected 24"):
        record_to_state(ArrayRecord({"w": arr}), {"w": TensorSpec((2, 3), "float32")})


@pytest.mark.parametrize("stype", ["torch.Tensor", "pickle", ""])
def test_other_serialisations_are_refused(stype):
    data = _npy_bytes(np.zeros((2,), np.float32))
    arr = Array(dtype="float32", shape=(2,), stype=stype, data=data)
    with pytest.raises(PayloadError, match=r"'w'.*serialisation"):
        record_to_state(ArrayRecord({"w": arr}), {"w": TensorSpec((2,), "float32")})


def test_big_endian_and_fortran_order():
    spec = {"w": TensorSpec((2, 3), "float32")}
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    arr = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=_npy_bytes(x.astype(">f4")))
    with pytest.raises(PayloadError, match="contradicts"):
        record_to_state(ArrayRecord({"w": arr}), spec)
    out = record_to_state(ArrayRecord({"w": Array(np.asfortranarray(x))}), spec)
    assert torch.equal(out["w"], torch.from_numpy(x)) and out["w"].is_contiguous()


def test_payload_digest_of_a_malformed_record_does_not_raise():
    # Flower's count_bytes raises IndexError on an empty list; the audit of a refused request must not.
    digest = payload_digest(RecordDict({"config": ConfigRecord({"round": [], "split": "val"})}))
    assert digest["records"]["config"]["keys"] == ["round", "split"] and digest["bytes"] == 5 + 8


def test_non_array_record_is_refused():
    with pytest.raises(PayloadError, match="expected an ArrayRecord"):
        record_to_state(ConfigRecord({"w": 1}), {"w": TensorSpec((1,), "float32")})


def test_payload_nbytes_counts_array_bytes():
    small = RecordDict({"a": state_to_record({"w": torch.zeros(10)})})
    big = RecordDict({"a": state_to_record({"w": torch.zeros(1000)})})
    assert payload_nbytes(big) - payload_nbytes(small) == 990 * 4


# ------------------------------------------------------------------------------------------
# evaluate request
# ------------------------------------------------------------------------------------------


def test_evaluate_request_round_trip():
    adapter, head = _state(), _head()
    content = make_evaluate_request(adapter, head, 3, "val", FP)
    assert set(content.keys()) == {"adapter", "head", "config"}
    assert dict(content["config"]) == {"round": 3, "split": "val", "want": "none", "method": "erm",
                                       "stage": "erm", "fingerprint": FP, "protocol": PROTOCOL_VERSION}
    a, h, cfg = parse_evaluate_request(content, state_spec(adapter), state_spec(head))
    assert isinstance(cfg, RoundRequest)
    assert (cfg.round, cfg.split, cfg.want, cfg.fingerprint, cfg.protocol) == \
        (3, "val", "none", FP, PROTOCOL_VERSION)
    for k in adapter:
        assert torch.equal(a[k], adapter[k])
    for k in head:
        assert torch.equal(h[k], head[k])


def test_evaluate_request_with_extra_record_is_refused():
    adapter, head = _state(), _head()
    content = make_evaluate_request(adapter, head, 0, "test", FP)
    content["sensitive"] = ConfigRecord({"groups": "a,b"})
    with pytest.raises(PayloadError, match="sensitive"):
        parse_evaluate_request(content, state_spec(adapter), state_spec(head))


def test_evaluate_request_missing_or_mistyped_record_is_refused():
    adapter, head = _state(), _head()
    spec_a, spec_h = state_spec(adapter), state_spec(head)
    content = make_evaluate_request(adapter, head, 0, "val", FP)
    del content["head"]
    with pytest.raises(PayloadError, match="head"):
        parse_evaluate_request(content, spec_a, spec_h)
    content = make_evaluate_request(adapter, head, 0, "val", FP)
    content["head"] = ConfigRecord({"weight": 1.0})
    with pytest.raises(PayloadError, match="'head' must be a ArrayRecord"):
        parse_evaluate_request(content, spec_a, spec_h)


@pytest.mark.parametrize(
    "change",
    [
        {"split": "train"},
        {"split": "none"},  # an evaluation request must name val or test (and then sends a head)
        {"want": "everything"},
        {"want": "signal"},  # valid request, but not an evaluation-only one
        {"round": -1},
        {"fingerprint": "abc"},
        {"protocol": PROTOCOL_VERSION + 1},
        {"extra": "x"},
    ],
)
def test_evaluate_request_bad_config_is_refused(change):
    adapter, head = _state(), _head()
    content = make_evaluate_request(adapter, head, 1, "val", FP)
    cfg = dict(content["config"])
    cfg.update(change)
    content["config"] = ConfigRecord(cfg)
    with pytest.raises(PayloadError):
        parse_evaluate_request(content, state_spec(adapter), state_spec(head))


def test_evaluate_request_config_missing_key_is_refused():
    adapter, head = _state(), _head()
    content = make_evaluate_request(adapter, head, 1, "val", FP)
    cfg = dict(content["config"])
    del cfg["split"]
    content["config"] = ConfigRecord(cfg)
    with pytest.raises(PayloadError, match="split"):
        parse_evaluate_request(content, state_spec(adapter), state_spec(head))


def test_evaluate_request_adapter_contract_checked_against_receiver_spec():
    adapter, head = _state(), _head()
    theirs = dict(adapter)
    theirs["base_model.model.blocks.0.attn.qkv.lora_A.weight"] = torch.zeros(4, 8)  # rank 4, not 2
    content = make_evaluate_request(theirs, head, 1, "val", FP)
    with pytest.raises(PayloadError, match=r"adapter\[.*lora_A"):
        parse_evaluate_request(content, state_spec(adapter), state_spec(head))


def test_make_evaluate_request_refuses_nan():
    adapter = _state()
    adapter["base_model.model.blocks.0.attn.qkv.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(PayloadError, match="lora_B"):
        make_evaluate_request(adapter, _head(), 1, "val", FP)


# ------------------------------------------------------------------------------------------
# evaluate reply
# ------------------------------------------------------------------------------------------


def _report() -> dict:
    rng = np.random.default_rng(0)
    n = 120
    return fairness_report(rng.integers(0, 2, n), rng.random(n),
                           np.array(["female", "male", "other"])[rng.integers(0, 3, n)],
                           min_group_size=10)


def test_reply_contains_only_the_report_json():
    report = _report()
    content = make_evaluate_reply(report)
    assert isinstance(content, RecordDict)
    assert sorted(content.keys()) == ["privacy", "report"]  # every reply says what ε it spent
    assert json.loads(content["privacy"]["json"]) == {"dp": False, "epsilon_run": None, "epsilon_total": None,
                                                      "epsilon_budget": None, "delta": None}
    rec = content["report"]
    assert isinstance(rec, ConfigRecord)
    assert list(rec.keys()) == ["json"]
    assert isinstance(rec["json"], str)
    assert json.loads(rec["json"]) == report
    assert parse_evaluate_reply(content) == report


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.update(scores=[0.1, 0.9]),                      # per-example scores
        lambda r: r.update(indices=[1, 2]),
        lambda r: r["per_group"]["male"].update(members=[3, 4]),    # per-example inside a group
        lambda r: r.update(accuracy=1.5),                           # out of range
        lambda r: r.update(demographic_parity_difference=-0.1),
        lambda r: r.update(n=0),
        lambda r: r["per_group"]["male"].update(tpr=2.0),
        lambda r: r.update(per_group={f"g{i}": {"n": 10} for i in range(65)}),  # too many groups
        lambda r: r.pop("per_group"),
    ],
)
def test_make_reply_refuses_bad_reports(mutate):
    report = _report()
    mutate(report)
    with pytest.raises(PayloadError):
        make_evaluate_reply(report)


def test_make_reply_refuses_oversize_report():
    report = _report()
    report["per_group"] = {("g%02d" % i) + "x" * 1100: {"n": 10} for i in range(60)}
    with pytest.raises(PayloadError, match="bytes"):
        make_evaluate_reply(report)


def test_reply_size_limit_counts_bytes_not_characters():
    # 60 group names of 600 two-byte characters: about 36 000 characters but 72 000 UTF-8 bytes.
    report = _report()
    report["per_group"] = {("g%02d" % i) + "é" * 600: {"n": 10} for i in range(60)}
    with pytest.raises(PayloadError, match="bytes"):
        make_evaluate_reply(report)
    blob = json.dumps({"n": 1, "per_group": {"é" * (MAX_REPORT_BYTES // 2 + 10): {"n": 1}}},
                      ensure_ascii=False)
    assert len(blob) < MAX_REPORT_BYTES < len(blob.encode("utf-8"))
    with pytest.raises(PayloadError, match="bytes"):
        parse_evaluate_reply(_reply(blob))


_NO_DP = ConfigRecord({"json": json.dumps({"dp": False})})


def _reply(blob) -> RecordDict:
    return RecordDict({"report": ConfigRecord({"json": blob}), "privacy": _NO_DP})


def test_parse_reply_refuses_extra_records():
    content = make_evaluate_reply(_report())
    content["scores"] = ArrayRecord({"s": Array(np.zeros(3, np.float32))})
    with pytest.raises(PayloadError, match="scores"):
        parse_evaluate_reply(content)
    content = make_evaluate_reply(_report())
    content["debug"] = ConfigRecord({"x": 1})
    with pytest.raises(PayloadError, match="debug"):
        parse_evaluate_reply(content)


def test_parse_reply_refuses_missing_or_mistyped_record():
    with pytest.raises(PayloadError):
        parse_evaluate_reply(RecordDict({}))
    with pytest.raises(PayloadError, match="'report' must be a ConfigRecord"):
        parse_evaluate_reply(RecordDict({"report": ArrayRecord({"json": Array(np.zeros(1))}), "privacy": _NO_DP}))
    blob = make_evaluate_reply(_report())["report"]["json"]
    with pytest.raises(PayloadError, match="privacy"):  # a reply without its privacy record
        parse_evaluate_reply(RecordDict({"report": ConfigRecord({"json": blob})}))


def test_parse_reply_refuses_extra_keys_in_the_record():
    blob = make_evaluate_reply(_report())["report"]["json"]
    with pytest.raises(PayloadError, match="exactly one string 'json'"):
        parse_evaluate_reply(RecordDict({"report": ConfigRecord({"json": blob, "extra": "x"}), "privacy": _NO_DP}))
    with pytest.raises(PayloadError, match="exactly one string 'json'"):
        parse_evaluate_reply(RecordDict({"report": ConfigRecord({"json": 5}), "privacy": _NO_DP}))


def test_parse_reply_refuses_extra_keys_in_the_report():
    report = _report()
    report["scores"] = [0.1, 0.2]
    with pytest.raises(PayloadError, match="scores"):
        parse_evaluate_reply(_reply(json.dumps(report)))
    report = _report()
    report["per_group"]["female"]["ids"] = [1]
    with pytest.raises(PayloadError, match="ids"):
        parse_evaluate_reply(_reply(json.dumps(report)))


@pytest.mark.parametrize("blob", ["{not json", "", "[1, 2]", "null", '{"n": 5}', '{"n": 5, "per_group": {}, '])
def test_parse_reply_refuses_malformed_json(blob):
    with pytest.raises(PayloadError, match="invalid report"):
        parse_evaluate_reply(_reply(blob))


def test_parse_reply_refuses_out_of_range_and_nan():
    report = _report()
    report["auc"] = 1.2
    with pytest.raises(PayloadError):
        parse_evaluate_reply(_reply(json.dumps(report)))
    report = _report()
    report["accuracy"] = float("nan")
    blob = json.dumps(report)  # Python writes NaN, which json.loads accepts
    assert "NaN" in blob
    with pytest.raises(PayloadError):
        parse_evaluate_reply(_reply(blob))


def test_parse_reply_refuses_oversize():
    report = _report()
    blob = json.dumps(report) + " " * MAX_REPORT_BYTES  # still valid JSON
    with pytest.raises(PayloadError, match="bytes"):
        parse_evaluate_reply(_reply(blob))
    assert parse_evaluate_reply(_reply(json.dumps(report) + " " * 100)) == report


def test_payload_digest_names_records_and_changes_with_content():
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fairsplit.protocol.codec import payload_digest

    a = RecordDict({"adapter": ArrayRecord({"w": torch.ones(2, 2)}), "config": ConfigRecord({"round": 1})})
    b = RecordDict({"adapter": ArrayRecord({"w": torch.ones(2, 2)}), "config": ConfigRecord({"round": 1})})
    c = RecordDict({"adapter": ArrayRecord({"w": torch.ones(2, 2) * 2}), "config": ConfigRecord({"round": 1})})
    da, db, dc = payload_digest(a), payload_digest(b), payload_digest(c)
    assert da["sha256"] == db["sha256"] != dc["sha256"]
    assert da["records"]["adapter"] == {"kind": "ArrayRecord", "keys": ["w"], "bytes": da["records"]["adapter"]["bytes"]}
    assert da["records"]["config"]["keys"] == ["round"]
    assert da["bytes"] == sum(r["bytes"] for r in da["records"].values()) > 16
