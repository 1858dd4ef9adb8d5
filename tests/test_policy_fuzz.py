"""Fuzzing the declared payload policy (protocol.policy) through the codecs and the auditor.

Valid requests and replies are built from the demo's tiny ViT contracts (adapter, head, update),
then mutated: records dropped, added, renamed or of the wrong kind; array keys dropped, added,
renamed; shapes, dtypes, serialisation and byte order changed; ``.npy`` bytes truncated,
extended or overwritten; NaN/Inf injected; ConfigRecord values of the wrong type; unknown or
missing config keys; other protocol versions; oversized, truncated, deeply nested or garbage JSON;
reports with extra keys, per-example fields or groups under ``min_group_size``; unknown message
types. Every mutation must be refused with a :class:`PayloadError` whose message names what is
wrong (never another exception type); mutations that change nothing semantically (Fortran order)
must decode to the original exactly; valid messages round-trip exactly. The auditor's handler is
fuzzed through its public ``AuditorService.handle``: every malformed request gets a clear error
and afterwards a valid request gets the same reply (same payload digest) as a fresh service.
"""

from __future__ import annotations

import functools
import json
import math
import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fairsplit.protocol.codec import MAX_NPY_HEADER_BYTES, PayloadError, payload_digest, record_to_state, state_to_record
from fairsplit.protocol.config import experiment_fingerprint
from fairsplit.protocol.messages import (
    EVALUATE,
    MAX_REPORT_BYTES,
    PROTOCOL_VERSION,
    TRAIN,
    RoundRequest,
    make_reply,
    make_request,
    message_type_for,
    parse_reply,
    parse_request,
)
from fairsplit.protocol.metrics import fairness_report
from fairsplit.protocol.model import TensorSpec, adapter_state, build_model, head_state, state_spec, update_spec
from fairsplit.protocol.policy import (
    MAX_CONFIG_BYTES,
    MAX_PRIVACY_BYTES,
    MAX_SIGNAL_METRICS_BYTES,
    POLICY,
    REPLY,
    REQUEST,
    array_record_limit,
    declared_records,
    message_limit,
    refit_basis_spec,
    update_spec_from_adapter,
)

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: (split, want) combinations a request may have; (none, none) is admitted by no message type.
COMBOS = [("val", "none"), ("test", "none"), ("none", "signal"), ("val", "signal"),
          ("none", "unlearning_update"), ("test", "unlearning_update")]


# ------------------------------------------------------------------------------------------
# fixtures: the demo's tiny ViT contracts, built once
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fairsplit.deploy.demo import demo_run_file

    old, threads = os.environ.get("FAIRSPLIT_CACHE"), torch.get_num_threads()
    os.environ["FAIRSPLIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(1)  # the machine's cores are shared; one thread is plenty for the tiny ViT
    run = demo_run_file()
    model = build_model(run.experiment)
    adapter, head = adapter_state(model), head_state(model)
    yield _Demo({
        "run": run,
        "adapter": adapter,
        "head": head,
        "adapter_spec": state_spec(adapter),
        "head_spec": state_spec(head),
        "update_spec": update_spec(model),
        "fingerprint": experiment_fingerprint(run.experiment),
    })
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("FAIRSPLIT_CACHE", None)
    else:
        os.environ["FAIRSPLIT_CACHE"] = old


class _Demo(dict):
    """The demo's contracts; a short repr keeps hypothesis' falsifying examples readable."""

    def __repr__(self) -> str:
        return "<demo contracts>"


def _random_state(spec, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s.shape, generator=g, dtype=torch.float64) * scale).to(getattr(torch, s.dtype))
            for k, s in spec.items()}


def _req(split="val", want="none", round_=1, method="erm", fp="ab" * 32, protocol=PROTOCOL_VERSION):
    return RoundRequest(round=round_, split=split, want=want, method=method, fingerprint=fp,
                        protocol=protocol)


@functools.lru_cache(maxsize=None)
def _cached_report(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return json.dumps(fairness_report(rng.integers(0, 2, n), rng.random(n),
                                      np.array(["female", "male", "other"])[rng.integers(0, 3, n)],
                                      min_group_size=10))


def _report(seed: int = 0, n: int = 120) -> dict:
    """A real fairness report over three groups (fairlearn is slow: computed once per seed)."""
    return json.loads(_cached_report(seed % 4, n))


def _metrics() -> dict:
    return {"n": 64, "objective": 0.25, "sensitive_accuracy": 0.6, "signal_norm": 1.5}


def _build_request(demo, split, want, seed=0):
    req = _req(split, want, method=demo["run"].experiment.method.name, fp=demo["fingerprint"])
    adapter = _random_state(demo["adapter_spec"], seed)
    head = _random_state(demo["head_spec"], seed + 1) if split != "none" else None
    return req, adapter, head, make_request(adapter, head, req)


def _build_reply(demo, split, want, seed=0):
    req = _req(split, want)
    report = _report(seed) if split != "none" else None
    signal = _random_state(demo["adapter_spec"], seed) if want == "signal" else None
    update = _random_state(demo["update_spec"], seed) if want == "unlearning_update" else None
    metrics = _metrics() if want != "none" else None
    content = make_reply(req, report=report, signal=signal, update=update, signal_metrics=metrics,
                         adapter_spec=demo["adapter_spec"], update_spec=demo["update_spec"],
                         min_group_size=10)
    return req, {"report": report, "signal": signal, "update": update, "signal_metrics": metrics}, content


def _parse_req(demo, content, message_type=None):
    return parse_request(content, demo["adapter_spec"], demo["head_spec"], message_type=message_type)


def _parse_rep(demo, content, req, message_type=None):
    return parse_reply(content, req, demo["adapter_spec"], demo["update_spec"], message_type=message_type)


def _refused(fn, *fragments: str | tuple[str, ...]) -> str:
    """``fn()`` must raise PayloadError (any other exception fails the test) whose message
    contains every fragment (a tuple: at least one of its alternatives)."""
    with pytest.raises(PayloadError) as info:
        fn()
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    for f in fragments:
        alternatives = f if isinstance(f, tuple) else (f,)
        assert any(a in msg for a in alternatives), f"none of {alternatives!r} in {msg!r}"
    return msg


def _npy(nd: np.ndarray) -> bytes:
    return Array(nd).data


# ------------------------------------------------------------------------------------------
# the declared table itself
# ------------------------------------------------------------------------------------------


def test_policy_table_declares_every_message_type_and_direction():
    assert set(POLICY) == {(t, d) for t in (TRAIN, EVALUATE) for d in (REQUEST, REPLY)}
    rec = {k: {r.name: (r.kind, r.contract) for r in p.records} for k, p in POLICY.items()}
    assert rec[(EVALUATE, REQUEST)] == {
        "adapter": ("arrays", "adapter"), "head": ("arrays", "head"), "config": ("config", None),
        "cond_adapter": ("arrays", "cond_adapter"), "detector": ("arrays", "detector")}
    assert rec[(TRAIN, REQUEST)] == {**rec[(EVALUATE, REQUEST)], "refit_basis": ("arrays", "refit_basis")}
    assert rec[(EVALUATE, REPLY)] == {"report": ("json", None), "privacy": ("json", None)}
    assert rec[(TRAIN, REPLY)] == {"report": ("json", None), "signal": ("arrays", "adapter"),
                                   "head_signal": ("arrays", "head"), "update": ("arrays", "update"),
                                   "head": ("arrays", "head"), "signal_metrics": ("json", None),
                                   "privacy": ("json", None), "cond_signal": ("arrays", "cond_adapter")}
    # FairNet (a gated method): the gated model goes with every request; its signal is φ_c's only
    fn = _req("none", "signal").model_copy(update={"method": "fairnet", "stage": "fairnet"})
    assert set(declared_records(TRAIN, REQUEST, fn)) == {"adapter", "head", "cond_adapter", "detector", "config"}
    assert set(declared_records(TRAIN, REPLY, fn)) == {"cond_signal", "signal_metrics", "privacy"}
    tau = _req("none", "threshold").model_copy(update={"method": "fairnet_local", "stage": "fairnet_local"})
    assert set(declared_records(TRAIN, REPLY, tau)) == {"signal_metrics", "privacy"}
    # The records each request combination declares, per direction.
    assert set(declared_records(TRAIN, REPLY, _req("none", "signal"))) == {"signal", "signal_metrics", "privacy"}
    assert set(declared_records(TRAIN, REPLY, _req("val", "unlearning_update"))) == \
        {"report", "update", "signal_metrics", "privacy"}
    assert set(declared_records(EVALUATE, REQUEST, _req("test", "none"))) == {"adapter", "head", "config"}
    assert set(declared_records(TRAIN, REQUEST, _req("none", "signal"))) == {"adapter", "config"}
    assert set(declared_records(TRAIN, REQUEST, _req("none", "head"))) == {"adapter", "head", "refit_basis", "config"}
    for mtype, req in [(EVALUATE, _req("none", "signal")), (TRAIN, _req("val", "none")),
                       (EVALUATE, _req("none", "none"))]:
        _refused(lambda: declared_records(mtype, REQUEST, req), "not admitted", mtype)
    _refused(lambda: declared_records("query", REQUEST, _req()), "unknown message type", "query")


def test_limits_are_derived_from_the_contracts(demo):
    spec = demo["adapter_spec"]
    exact = sum(math.prod(s.shape) * 4 for s in spec.values())
    assert array_record_limit(spec) == exact + len(spec) * MAX_NPY_HEADER_BYTES
    contracts = {"adapter": spec, "head": demo["head_spec"], "update": demo["update_spec"]}
    lim = message_limit(EVALUATE, REQUEST, _req(), contracts)
    assert lim == array_record_limit(spec) + array_record_limit(demo["head_spec"]) + MAX_CONFIG_BYTES
    assert message_limit(TRAIN, REPLY, _req("none", "signal"), contracts) == \
        array_record_limit(spec) + MAX_SIGNAL_METRICS_BYTES + MAX_PRIVACY_BYTES + 2 * len("json")
    # A real request fits its limit.
    _, _, _, content = _build_request(demo, "val", "none")
    assert sum(len(a.data) for n in ("adapter", "head") for a in content[n].values()) < lim


def test_a_head_refit_request_carries_the_developers_refit_basis_and_nothing_else_does(demo):
    """The refit basis goes exactly with a head refit, in the contract's shape; the auditor
    decodes it for the method and refuses one of another shape; the sender refuses non-finite
    entries (the receiver's codec check of every array record is fuzzed below)."""
    req = _req("none", "head", method="last_layer", fp=demo["fingerprint"])
    adapter, head = _random_state(demo["adapter_spec"], 0), _random_state(demo["head_spec"], 1)
    d = demo["head_spec"]["weight"].shape[1]
    spec = refit_basis_spec(demo["head_spec"], 4)
    assert spec == {"basis": TensorSpec((d, 4), "float32"), "mean": TensorSpec((d,), "float32")}
    assert refit_basis_spec(demo["head_spec"], 10 * d)["basis"].shape == (d, d)
    basis = {"basis": torch.linalg.qr(torch.randn(d, 4))[0], "mean": torch.randn(d)}
    _refused(lambda: make_request(adapter, head, req), "refit basis")
    _refused(lambda: make_request(adapter, head, _req("val", "none"), refit_basis=basis), "refit basis")
    content = make_request(adapter, head, req, refit_basis=basis, refit_basis_spec=spec)
    got: dict = {}
    parse_request(content, demo["adapter_spec"], demo["head_spec"], refit_basis_spec=spec, refit=got)
    assert torch.equal(got["refit_basis"]["basis"], basis["basis"])
    _refused(lambda: parse_request(content, demo["adapter_spec"], demo["head_spec"]), "refit_basis")
    wide = refit_basis_spec(demo["head_spec"], 5)
    _refused(lambda: parse_request(content, demo["adapter_spec"], demo["head_spec"], refit_basis_spec=wide),
             "refit_basis")
    bad = {"basis": basis["basis"].clone(), "mean": basis["mean"]}
    bad["basis"][0, 0] = float("nan")
    _refused(lambda: make_request(adapter, head, req, refit_basis=bad, refit_basis_spec=spec), "basis", "NaN")


def test_update_contract_derived_from_adapter_equals_the_models(demo):
    assert update_spec_from_adapter(demo["adapter_spec"]) == demo["update_spec"]
    _refused(lambda: update_spec_from_adapter({"x.weight": demo["adapter_spec"][next(iter(demo["adapter_spec"]))]}),
             "'x.weight'")


# ------------------------------------------------------------------------------------------
# valid messages round-trip exactly
# ------------------------------------------------------------------------------------------


@FEW
@given(combo=st.sampled_from(COMBOS), seed=st.integers(0, 2**16), round_=st.integers(0, 10**6),
       method=st.from_regex(r"[a-z_]{1,32}", fullmatch=True), fp=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
       scale=st.sampled_from([1e-30, 1.0, 1e30]))
def test_valid_request_round_trips_exactly(demo, combo, seed, round_, method, fp, scale):
    split, want = combo
    req = _req(split, want, round_, method, fp)
    adapter = _random_state(demo["adapter_spec"], seed, scale)
    head = _random_state(demo["head_spec"], seed + 1, scale) if split != "none" else None
    content = make_request(adapter, head, req, adapter_spec=demo["adapter_spec"], head_spec=demo["head_spec"])
    a, h, r = _parse_req(demo, content, message_type=message_type_for(req))
    assert r == req
    assert set(a) == set(adapter) and all(torch.equal(a[k], adapter[k]) for k in adapter)
    if head is None:
        assert h is None
    else:
        assert all(torch.equal(h[k], head[k]) for k in head)


@st.composite
def reports(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=20), min_size=2, max_size=8, unique=True))
    frac = st.one_of(st.none(), st.floats(0, 1))
    groups = {g: {"n": draw(st.integers(10, 10**6)), "accuracy": draw(frac), "selection_rate": draw(frac),
                  "tpr": draw(frac), "fpr": draw(frac)} for g in names}
    rep = {k: draw(frac) for k in ("accuracy", "balanced_accuracy", "auc", "demographic_parity_difference",
                                   "demographic_parity_ratio", "equal_opportunity_difference",
                                   "equalized_odds_difference", "false_positive_rate_difference",
                                   "false_positive_rate_ratio", "worst_group_accuracy")}
    rep["n"] = sum(g["n"] for g in groups.values())
    rep["per_group"] = groups
    return rep


@FEW
@given(combo=st.sampled_from(COMBOS), report=reports(), seed=st.integers(0, 2**16),
       objective=st.floats(-1e300, 1e300), norm=st.floats(0, 1e300))
def test_valid_reply_round_trips_exactly(demo, combo, report, seed, objective, norm):
    split, want = combo
    req = _req(split, want)
    signal = _random_state(demo["adapter_spec"], seed) if want == "signal" else None
    update = _random_state(demo["update_spec"], seed) if want == "unlearning_update" else None
    metrics = {"n": 64, "objective": objective, "sensitive_accuracy": None, "signal_norm": norm,
               "lam": None, "tau": None, "detector_auc": None} if want != "none" else None
    content = make_reply(req, report=report if split != "none" else None, signal=signal, update=update,
                         signal_metrics=metrics, adapter_spec=demo["adapter_spec"], min_group_size=10)
    rep = _parse_rep(demo, content, req, message_type=message_type_for(req))
    assert rep.report == (report if split != "none" else None)
    assert rep.signal_metrics == metrics
    for got, sent in ((rep.signal, signal), (rep.update, update)):
        if sent is None:
            assert got is None
        else:
            assert set(got) == set(sent) and all(torch.equal(got[k], sent[k]) for k in sent)


# ------------------------------------------------------------------------------------------
# request mutations
# ------------------------------------------------------------------------------------------

ARRAY_MUTATIONS = ["drop_key", "add_key", "rename_key", "shape", "dtype", "declared_dtype", "declared_shape",
                   "truncate", "extend", "garbage", "header_dtype", "big_endian", "stype", "nonfinite",
                   "oversize"]


def _mutate_array_record(draw, rec: ArrayRecord, spec, name: str) -> tuple[ArrayRecord, list[str]]:
    """Apply one drawn mutation to a copy of an ArrayRecord; return it and the message fragments.

    A mutation that changes an array's byte count may be caught by the record's byte limit
    before its key is looked at; the key-level fragments then accept that message instead.
    """
    kind = draw(st.sampled_from(ARRAY_MUTATIONS))
    key = draw(st.sampled_from(sorted(spec)))
    s = spec[key]
    arrays = {k: rec[k] for k in rec.keys()}
    good = arrays[key].numpy()
    frags = [name]
    if kind == "drop_key":
        del arrays[key]
        frags += ["key mismatch", repr(key)]
    elif kind in ("add_key", "rename_key"):
        new = draw(st.text(max_size=40).filter(lambda t: t not in spec))
        if kind == "rename_key":
            arrays[new] = arrays.pop(key)
        else:
            arrays[new] = Array(np.zeros(draw(st.integers(0, 8)), np.float32))
        frags += ["key mismatch", repr(new)]
    elif kind == "shape":
        shape = draw(st.lists(st.integers(0, 6), max_size=3).map(tuple).filter(lambda t: t != s.shape))
        arrays[key] = Array(np.zeros(shape, np.float32))
        frags += [(f"[{key!r}]: declared shape", "bytes >")]
    elif kind == "dtype":
        dt = draw(st.sampled_from(["float16", "float64", "int64", "int32", "uint8", "bool", "complex64"]))
        arrays[key] = Array(good.astype(dt))
        frags += [(f"[{key!r}]: declared shape {s.shape} dtype {dt}", "bytes >")]
    elif kind == "declared_dtype":  # metadata says float64, bytes are the float32 array
        arrays[key] = Array(dtype="float64", shape=s.shape, stype="numpy.ndarray", data=arrays[key].data)
        frags += [f"[{key!r}]: declared shape", "dtype float64"]
    elif kind == "declared_shape":  # metadata lies about the shape, bytes are right
        shape = tuple(reversed(s.shape)) if len(set(s.shape)) > 1 else s.shape + (1,)
        arrays[key] = Array(dtype=s.dtype, shape=shape, stype="numpy.ndarray", data=arrays[key].data)
        frags += [f"[{key!r}]: declared shape {shape}"]
    elif kind == "truncate":
        data = arrays[key].data
        cut = draw(st.integers(0, len(data) - 1))
        arrays[key] = Array(dtype=s.dtype, shape=s.shape, stype="numpy.ndarray", data=data[:cut])
        frags += [f"[{key!r}]: "]
    elif kind == "extend":
        extra = draw(st.binary(min_size=1, max_size=64))
        arrays[key] = Array(dtype=s.dtype, shape=s.shape, stype="numpy.ndarray", data=arrays[key].data + extra)
        frags += [f"[{key!r}]: extended array bytes"]
    elif kind == "garbage":
        data = draw(st.binary(max_size=256))
        arrays[key] = Array(dtype=s.dtype, shape=s.shape, stype="numpy.ndarray", data=data)
        frags += [f"[{key!r}]: "]
    elif kind == "header_dtype":  # bytes hold float64 under a float32 declaration
        arrays[key] = Array(dtype=s.dtype, shape=s.shape, stype="numpy.ndarray", data=_npy(good.astype("float64")))
        frags += [(f"[{key!r}]: decoded shape {s.shape} dtype float64 contradicts", "bytes >")]
    elif kind == "big_endian":
        arrays[key] = Array(dtype=s.dtype, shape=s.shape, stype="numpy.ndarray", data=_npy(good.astype(">f4")))
        frags += [f"[{key!r}]: decoded shape {s.shape} dtype >f4 contradicts"]
    elif kind == "stype":
        arrays[key] = Array(dtype=s.dtype, shape=s.shape, stype=draw(st.sampled_from(["torch.Tensor", "", "pickle"])),
                            data=arrays[key].data)
        frags += [f"[{key!r}]: serialisation"]
    elif kind == "nonfinite":
        bad = good.copy()
        assume(bad.size > 0)
        idx = draw(st.integers(0, bad.size - 1))
        bad.reshape(-1)[idx] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays[key] = Array(bad)
        frags += [f"[{key!r}]: contains NaN or infinite values"]
    elif kind == "oversize":
        arrays[key] = Array(np.zeros((4096, 256), np.float32))  # 4 MiB under an unexpected shape
        frags += [f"record {name!r} holds", "bytes > limit"]
    return ArrayRecord(arrays), frags


CONFIG_MUTATIONS = ["drop", "add", "wrong_type", "protocol", "bad_value", "oversize", "empty"]


def _mutate_config(draw, rec: ConfigRecord) -> tuple[ConfigRecord, list[str]]:
    cfg = dict(rec)
    kind = draw(st.sampled_from(CONFIG_MUTATIONS))
    if kind == "drop":  # 'stage' is optional: absent, it is the method itself
        key = draw(st.sampled_from(sorted(k for k in cfg if k != "stage")))
        del cfg[key]
        frags = [key, "Field required"]
    elif kind == "add":
        key = draw(st.text(max_size=30).filter(lambda t: t not in cfg))
        cfg[key] = draw(st.one_of(st.integers(), st.text(max_size=10), st.booleans()))
        frags = [key]
    elif kind == "wrong_type":
        key = draw(st.sampled_from(sorted(cfg)))
        wrong = {
            int: st.one_of(st.text(max_size=5), st.floats(allow_nan=False), st.booleans(),
                           st.lists(st.integers(), max_size=3), st.binary(max_size=4)),
            str: st.one_of(st.integers(), st.floats(), st.booleans(), st.binary(max_size=8),
                           st.lists(st.text(max_size=3), max_size=3)),
        }[type(cfg[key])]
        cfg[key] = draw(wrong)
        frags = [key]
    elif kind == "protocol":
        cfg["protocol"] = draw(st.integers().filter(lambda v: v != PROTOCOL_VERSION))
        frags = ["protocol version"]
    elif kind == "bad_value":
        key, value = draw(st.sampled_from([("split", "train"), ("want", "everything"), ("round", -1),
                                           ("fingerprint", "ab"), ("fingerprint", "AB" * 32),
                                           ("method", ""), ("method", "erm; rm -rf")]))
        cfg[key] = value
        frags = [key]
    elif kind == "oversize":
        cfg["method"] = "x" * draw(st.integers(MAX_CONFIG_BYTES, 4 * MAX_CONFIG_BYTES))
        frags = ["config", "bytes"]
    else:
        cfg = {}
        frags = ["Field required"]
    return ConfigRecord(cfg), ["config", *frags]


@st.composite
def request_mutations(draw, demo, combos=tuple(COMBOS)):
    """A valid request, then one mutation; returns (content, message-type, fragments)."""
    split, want = draw(st.sampled_from(combos))
    req, adapter, head, content = _build_request(demo, split, want, seed=draw(st.integers(0, 100)))
    mtype = message_type_for(req)
    where = draw(st.sampled_from(["records", "adapter", "head", "config", "message_type"]))
    if where == "head" and split == "none":
        where = "adapter"
    if where == "records":
        kind = draw(st.sampled_from(["drop", "add", "rename", "wrong_kind"]))
        names = sorted(content.keys())
        name = draw(st.sampled_from(names))
        if kind == "drop":
            del content[name]
            frags = [name if name != "config" else "'config'", "missing"]
        elif kind in ("add", "rename"):
            new = draw(st.text(max_size=30).filter(lambda t: t not in ("adapter", "head", "config")))
            rec = content[name] if kind == "rename" else draw(st.sampled_from(
                [ConfigRecord({"groups": "a,b"}), ArrayRecord({"s": Array(np.zeros(3, np.float32))})]))
            if kind == "rename":
                del content[name]
            content[new] = rec
            frags = [repr(new)] if not (kind == "rename" and name == "config") else ["'config'"]
        else:
            content[name] = ConfigRecord({"w": 1}) if isinstance(content[name], ArrayRecord) \
                else ArrayRecord({"w": Array(np.zeros(1, np.float32))})
            frags = [repr(name)]
    elif where in ("adapter", "head"):
        spec = demo[f"{where}_spec"]
        content[where], frags = _mutate_array_record(draw, content[where], spec, where)
    elif where == "config":
        content["config"], frags = _mutate_config(draw, content["config"])
    else:
        mtype = draw(st.one_of(st.text(max_size=20), st.sampled_from([TRAIN, EVALUATE, "query", "TRAIN"]))
                     .filter(lambda t: t != message_type_for(req)))
        frags = ["message type"]
    return content, mtype, frags


@FUZZ
@given(data=st.data())
def test_mutated_requests_are_refused_with_a_named_reason(demo, data):
    content, mtype, frags = data.draw(request_mutations(demo))
    _refused(lambda: _parse_req(demo, content, message_type=mtype), *frags)


@FEW
@given(seed=st.integers(0, 100))
def test_fortran_order_arrays_decode_to_the_same_values(demo, seed):
    # A semantically identical encoding (column-major .npy) is accepted and decodes exactly.
    req, adapter, head, content = _build_request(demo, "val", "none", seed)
    content["adapter"] = ArrayRecord({k: Array(np.asfortranarray(v.numpy())) for k, v in adapter.items()})
    a, _, _ = _parse_req(demo, content)
    assert all(torch.equal(a[k], adapter[k]) and a[k].is_contiguous() for k in adapter)


def arr_bytes(demo, key) -> int:
    s = demo["adapter_spec"][key]
    return math.prod(s.shape) * 4


def test_extended_bytes_within_the_record_limit_name_the_key(demo):
    req, adapter, head, content = _build_request(demo, "val", "none")
    key = sorted(adapter)[0]
    arr = content["adapter"][key]
    content["adapter"][key] = Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data + b"\0" * 4)
    _refused(lambda: _parse_req(demo, content), f"adapter[{key!r}]: extended array bytes",
             f"{arr_bytes(demo, key) + 4} data bytes", f"expected {arr_bytes(demo, key)}")


def test_header_larger_than_the_limit_is_refused(demo):
    spec = {"w": demo["head_spec"]["bias"]}
    header = b"\x93NUMPY\x01\x00" + (2000).to_bytes(2, "little") + b"{" + b" " * 1998 + b"\n"
    rec = ArrayRecord({"w": Array(dtype="float32", shape=spec["w"].shape, stype="numpy.ndarray",
                                  data=header + b"\0" * 8)})
    _refused(lambda: record_to_state(rec, spec, "head"), "head['w']", "cannot decode")


# ------------------------------------------------------------------------------------------
# encoding refusals (the sender's side)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,frag", [(np.zeros(3), "torch.Tensor"), ([1.0], "torch.Tensor"),
                                        (torch.zeros(2, dtype=torch.bfloat16), "bfloat16")])
def test_state_to_record_refuses_what_it_cannot_encode(value, frag):
    _refused(lambda: state_to_record({"w": value}), "'w'", frag)


def test_make_request_checks_the_head_and_the_given_contracts(demo):
    req = _req("val", "none")
    adapter, head = demo["adapter"], demo["head"]
    _refused(lambda: make_request(adapter, {"weight": head["weight"]}, req), "head", "keys")
    _refused(lambda: make_request(adapter, {"weight": head["weight"], "bias": torch.zeros(7)}, req), "head")
    small = dict(adapter)
    small.pop(next(iter(small)))
    _refused(lambda: make_request(small, head, req, adapter_spec=demo["adapter_spec"]), "adapter", "key mismatch")
    _refused(lambda: make_request(adapter, head, _req("val", "none", protocol=PROTOCOL_VERSION + 1)),
             "protocol version")
    _refused(lambda: make_request(adapter, head, _req("none", "none")), "head")
    _refused(lambda: make_request(adapter, None, _req("none", "none")), "not admitted")


# ------------------------------------------------------------------------------------------
# reply mutations (developer side) and the auditor's outbound checks
# ------------------------------------------------------------------------------------------


def _json_mutation(draw, blob: str, name: str, max_bytes: int) -> tuple[str, list[str]]:
    obj = json.loads(blob)
    kind = draw(st.sampled_from(["garbage", "truncate", "nan", "extra_key", "wrong_type", "oversize",
                                 "nested", "not_object", "group_extra"]))
    if kind == "garbage":
        return draw(st.text(max_size=200)), [name]
    if kind == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))], [name]
    if kind == "nan":
        key = draw(st.sampled_from(sorted(k for k, v in obj.items() if isinstance(v, float))))
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"]))
        obj[key] = "__BAD__"
        return json.dumps(obj).replace('"__BAD__"', token), [name, key, "finite"]
    if kind == "extra_key":
        key = draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in obj))
        obj[key] = draw(st.sampled_from([[0.1, 0.9], [1, 2], "x", 0]))
        return json.dumps(obj), [name, key]
    if kind == "wrong_type":
        obj["n"] = draw(st.sampled_from(["10", 10.5, True, None, [10], {"n": 1}]))
        return json.dumps(obj), [name, "n"]
    if kind == "oversize":
        return blob + " " * draw(st.integers(max_bytes, 2 * max_bytes)), [name, "bytes"]
    if kind == "nested":
        depth = draw(st.integers(300, max_bytes // 2 - 10))
        return "[" * depth + "]" * depth, [name]
    if kind == "not_object":
        return draw(st.sampled_from(["[1, 2]", "null", "5", '"report"', "true"])), [name]
    if "per_group" in obj:  # group_extra: a per-example field inside a group
        group = draw(st.sampled_from(sorted(obj["per_group"])))
        field = draw(st.sampled_from(["members", "scores", "ids", "y_pred"]))
        obj["per_group"][group][field] = [0, 1, 1]
        return json.dumps(obj), [name, field]
    obj["scores"] = [0.1]
    return json.dumps(obj), [name, "scores"]


@st.composite
def reply_mutations(draw, demo):
    split, want = draw(st.sampled_from(COMBOS))
    req, _, content = _build_reply(demo, split, want, seed=draw(st.integers(0, 50)))
    names = sorted(content.keys())
    where = draw(st.sampled_from(["records", "json", "arrays", "message_type"]))
    if where == "json":
        name = draw(st.sampled_from([n for n in names if n in ("report", "signal_metrics")]))
        limit = MAX_REPORT_BYTES if name == "report" else MAX_SIGNAL_METRICS_BYTES
        blob, frags = _json_mutation(draw, content[name]["json"], name, limit)
        if draw(st.booleans()):
            content[name] = ConfigRecord({"json": blob})
        else:  # the record's own shape: extra key, bytes instead of str
            content[name] = draw(st.sampled_from([ConfigRecord({"json": blob, "x": 1}),
                                                  ConfigRecord({"json": blob.encode()}),
                                                  ConfigRecord({"JSON": blob})]))
            frags = [name, ("exactly one string 'json'", "bytes > limit")]
    elif where == "arrays" and ("signal" in names or "update" in names):
        name = "signal" if "signal" in names else "update"
        spec = demo["adapter_spec"] if name == "signal" else demo["update_spec"]
        content[name], frags = _mutate_array_record(draw, content[name], spec, name)
    elif where == "message_type":
        mtype = draw(st.one_of(st.text(max_size=20), st.just("query")).filter(lambda t: t != message_type_for(req)))
        return content, req, mtype, ["message type"]
    else:
        kind = draw(st.sampled_from(["drop", "add", "wrong_kind"]))
        if kind == "drop":
            name = draw(st.sampled_from(names))
            del content[name]
            frags = [name, "missing"]
        elif kind == "add":
            new = draw(st.sampled_from(["scores", "sensitive", "predictions", "head", "adapter",
                                        *[n for n in ("report", "signal", "update", "signal_metrics")
                                          if n not in names]]))
            content[new] = ArrayRecord({"s": Array(np.zeros(3, np.float32))})
            frags = [repr(new), "undeclared"]
        else:
            name = draw(st.sampled_from(names))
            content[name] = ConfigRecord({"json": "{}"}) if isinstance(content[name], ArrayRecord) \
                else ArrayRecord({"json": Array(np.zeros(1, np.float32))})
            frags = [repr(name), "must be a"]
    return content, req, None, frags


@FUZZ
@given(data=st.data())
def test_mutated_replies_are_refused_with_a_named_reason(demo, data):
    content, req, mtype, frags = data.draw(reply_mutations(demo))
    _refused(lambda: _parse_rep(demo, content, req, message_type=mtype), *frags)


def test_deeply_nested_json_is_a_payload_error_not_a_recursion_error(demo):
    blob = "[" * 30000 + "]" * 30000
    req = _req("val", "none")
    _refused(lambda: parse_reply(RecordDict({"report": ConfigRecord({"json": blob}),
                                             "privacy": ConfigRecord({"json": '{"dp": false}'})}), req),
             "invalid report")


@pytest.mark.parametrize("mutate,frags", [
    (lambda r: r["per_group"]["male"].update(n=9), ["min_group_size=10", "'male'", "9"]),
    (lambda r: r.update(n=5, per_group={"a": {"n": 2}, "b": {"n": 3}}), ["total n=5", "min_group_size=10"]),
    (lambda r: r["per_group"]["male"].update(members=[3, 4]), ["members"]),
    (lambda r: r.update(scores=[0.1, 0.9]), ["scores"]),
    (lambda r: r.update(accuracy=float("nan")), ["accuracy", "finite"]),
    (lambda r: r.update(auc=float("inf")), ["auc"]),
    (lambda r: r.update(n=np.float64(120.5)), ["n"]),
])
def test_make_reply_refuses_reports_outside_the_policy(mutate, frags):
    report = _report()
    mutate(report)
    _refused(lambda: make_reply(_req("val", "none"), report=report, min_group_size=10), *frags)


def test_make_reply_min_group_size_boundary_and_default():
    report = _report()
    smallest = min(g["n"] for g in report["per_group"].values())
    assert make_reply(_req(), report=report, min_group_size=smallest)  # equal to the minimum: allowed
    _refused(lambda: make_reply(_req(), report=report, min_group_size=smallest + 1), "min_group_size")
    assert make_reply(_req(), report=report)  # no minimum given: not checked here


@pytest.mark.parametrize("case", ["nan_signal", "wrong_shape", "extra_key", "no_spec", "update_shape",
                                  "update_nan", "nan_metrics", "neg_norm", "metrics_extra", "not_asked"])
def test_make_reply_refuses_signals_outside_the_policy(demo, case):
    spec = demo["adapter_spec"]
    signal = _random_state(spec, 0)
    update = _random_state(demo["update_spec"], 0)
    metrics = _metrics()
    req, kw, frags = _req("none", "signal"), {}, ["signal"]
    key = sorted(spec)[0]
    if case == "nan_signal":
        signal[key][0, 0] = float("nan")
        frags = [repr(key), "NaN"]
    elif case == "wrong_shape":
        signal[key] = torch.zeros(3, 3)
        frags = ["signal", repr(key), "shape"]
    elif case == "extra_key":
        signal["sensitive_head.weight"] = torch.zeros(2, 2)
        frags = ["signal", "sensitive_head.weight"]
    elif case == "no_spec":
        kw = {"adapter_spec": None}
        frags = ["adapter's contract"]
    elif case in ("update_shape", "update_nan"):
        req, signal = _req("none", "unlearning_update"), None
        mod = next(k for k in sorted(update) if update[k].shape[0] != update[k].shape[1])
        if case == "update_shape":
            update[mod] = update[mod].T.contiguous()
            frags = ["update", repr(mod), "shape"]
        else:
            update[mod][1, 1] = float("inf")
            frags = [repr(mod), "NaN or infinite"]
    elif case == "nan_metrics":
        metrics["objective"] = float("nan")
        frags = ["signal_metrics", "objective"]
    elif case == "neg_norm":
        metrics["signal_norm"] = -1.0
        frags = ["signal_metrics", "signal_norm"]
    elif case == "metrics_extra":
        metrics["per_example_loss"] = [0.1]
        frags = ["signal_metrics", "per_example_loss"]
    else:  # a report the request did not ask for
        kw = {"report": _report()}
        frags = ["asked for"]
    args = dict(signal=signal if req.want == "signal" else None, update=update if req.want != "signal" else None,
                signal_metrics=metrics, adapter_spec=spec)
    args.update(kw)
    _refused(lambda: make_reply(req, **args), *frags)


def test_update_is_checked_against_the_contract_derived_from_the_adapter(demo):
    # The auditor passes only adapter_spec: the update contract follows from it.
    update = _random_state(demo["update_spec"], 0)
    req = _req("none", "unlearning_update")
    content = make_reply(req, update=update, signal_metrics=_metrics(), adapter_spec=demo["adapter_spec"])
    rep = parse_reply(content, req, demo["adapter_spec"])
    assert all(torch.equal(rep.update[k], update[k]) for k in update)
    bad = dict(update)
    bad["base_model.model.patch_embed.proj"] = torch.zeros(48, 192)  # not a LoRA target
    _refused(lambda: make_reply(req, update=bad, signal_metrics=_metrics(), adapter_spec=demo["adapter_spec"]),
             "update", "patch_embed")


# ------------------------------------------------------------------------------------------
# the auditor's handler
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auditor(demo):
    from fairsplit.auditor.service import AuditorService

    run = demo["run"]
    # exact releases: this checks that malformed requests leave no trace in the auditor's state
    cfg = run.auditor.model_copy(update={"privacy": run.auditor.privacy.model_copy(update={"enabled": False})})
    req = _req("val", "none", round_=1, method=run.experiment.method.name, fp=demo["fingerprint"])
    valid = make_request(demo["adapter"], demo["head"], req)
    reference = payload_digest(AuditorService(run.experiment, cfg).handle(EVALUATE, valid))
    return {"service": AuditorService(run.experiment, cfg), "req": req, "reference": reference}


def _valid_request(demo, auditor):
    return make_request(demo["adapter"], demo["head"], auditor["req"])


def test_handler_survives_malformed_requests_and_keeps_its_state(demo, auditor):
    from fairsplit.auditor.service import ProtocolMismatch

    service = auditor["service"]
    seen: set[str] = set()

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def fuzz(data):
        content, mtype, frags = data.draw(request_mutations(demo))
        with pytest.raises(ValueError) as info:
            service.handle(mtype, content)
        err = info.value
        assert isinstance(err, (PayloadError, ProtocolMismatch)), f"{type(err).__name__}: {err}"
        assert str(err).strip()
        seen.add(type(err).__name__)

    fuzz()
    # Well-formed requests for another experiment, method or message type: refused, named.
    run = demo["run"]
    base = auditor["req"].model_dump()
    for change, frag in [({"fingerprint": "f" * 64}, "fingerprint"), ({"method": "adversarial"}, "method")]:
        req = RoundRequest(**{**base, **change})
        with pytest.raises(ProtocolMismatch, match=frag):
            service.handle(message_type_for(req), make_request(demo["adapter"], demo["head"], req))
    with pytest.raises((ProtocolMismatch, PayloadError), match="message type"):
        service.handle("query", _valid_request(demo, auditor))
    # A config value Flower's own byte count chokes on (an empty list): still a PayloadError.
    bad = _valid_request(demo, auditor)
    bad["config"] = ConfigRecord({**dict(bad["config"]), "round": []})
    with pytest.raises(PayloadError, match="round"):
        service.handle(EVALUATE, bad)
    # ERM serves no signal: a clear refusal, not a crash.
    req = RoundRequest(**{**base, "split": "none", "want": "signal"})
    with pytest.raises(ProtocolMismatch):
        service.handle(TRAIN, make_request(demo["adapter"], None, req))
    # A valid request with another adapter is answered, and leaves nothing behind.
    other = _random_state(demo["adapter_spec"], 7, 0.05)
    service.handle(EVALUATE, make_request(other, demo["head"], auditor["req"]))
    assert "PayloadError" in seen
    # No state corrupted: the same valid request gets the same reply as from a fresh service.
    assert payload_digest(service.handle(EVALUATE, _valid_request(demo, auditor))) == auditor["reference"]
    assert run.experiment.method.name == "erm"
