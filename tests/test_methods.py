"""The auditor's fairness signals equal the gradients of the stated objectives, with the right sign.

Each test asks a real :class:`AuditorService` for a signal on a tiny ViT and synthetic data, then
checks it independently: a central finite difference of the documented objective R at the largest
gradient entry, and a small descent step along −signal moving R's underlying quantity in the
direction the method needs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flower_helpers import TINY_VIT, method_table

from fairsplit.auditor.service import AuditorService, ProtocolMismatch
from fairsplit.developer.trainer import DeveloperTrainer
from fairsplit.protocol.codec import PayloadError
from fairsplit.deploy.config import RunFile
from fairsplit.protocol.config import experiment_fingerprint, parse_config
from fairsplit.protocol.messages import (
    PROTOCOL_VERSION,
    FairnessReport,
    RoundRequest,
    SignalMetrics,
    make_request,
    message_type_for,
    parse_reply,
)
from fairsplit.protocol.model import adapter_parameters, adapter_state, load_adapter_state, state_spec, update_spec

LAM = 0.7


def make_run(method: str) -> RunFile:
    cfg = {
        "experiment": {
            "rounds": 2, "local_steps": 3, "batch_size": 16, "lr": 3e-3, "seed": 0,
            "model": TINY_VIT,
            "lora": {"r": 2, "lora_alpha": 4.0},
            "method": method_table(method, lam=LAM, auditor_batch_size=32, auditor_steps=5,
                                   sensitive_steps=4),
        },
        "developer": {"data": {"kind": "synthetic", "n": 300}},
        # exact releases (the methods' maths); DP: tests/test_privacy.py
        "auditor": {"data": {"kind": "synthetic", "n": 300, "sensitive": True}, "privacy": {"enabled": False}},
    }
    return parse_config(RunFile, cfg, "<test>")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))


def trained_developer(run: RunFile) -> DeveloperTrainer:
    """A developer whose LoRA B matrices are non-zero (a few ERM steps), so every path has gradient."""
    dev = DeveloperTrainer(run.experiment, run.developer)
    dev.train_round()
    return dev


def ask(service: AuditorService, dev: DeveloperTrainer, run: RunFile, want: str, split: str = "none",
        state: RecordDict | None = None, round_: int = 0):
    req = RoundRequest(round=round_, split=split, want=want, method=run.experiment.method.name,
                       fingerprint=experiment_fingerprint(run.experiment), protocol=PROTOCOL_VERSION)
    content = make_request(dev.adapter(), dev.head() if split != "none" else None, req)
    reply = service.handle(message_type_for(req), content, state)
    return req, reply


def _objective(method, model, service, state, inputs, s):
    """The documented R, recomputed from scratch at the model's current adapter."""
    model.eval()
    if method == "orthogonality":
        a_s = state["fairsplit.sensitive_A"].to_torch_state_dict()
        params = adapter_parameters(model)
        return LAM * sum((params[f"{m}.lora_A.weight"] @ a.T).pow(2).sum() for m, a in a_s.items())
    probe = torch.nn.Linear(model.feature_dim, int(s.max()) + 1)
    probe.load_state_dict(state["fairsplit.probe"].to_torch_state_dict())
    logits = probe(model.features(model.prepare(inputs)))
    if method == "adversarial":
        return -LAM * F.cross_entropy(logits, s)
    logp = F.log_softmax(logits, -1)
    return -LAM * (-(logp.exp() * logp).sum(-1).mean())


@pytest.mark.parametrize("method", ["adversarial", "entropy", "orthogonality"])
def test_signal_is_gradient_of_objective_with_the_needed_sign(method):
    run = make_run(method)
    dev = trained_developer(run)
    service = AuditorService(run.experiment, run.auditor)
    state = RecordDict()
    req, reply = ask(service, dev, run, "signal", state=state)
    state = service.state_after(0, state)  # the auditor's state after answering round 0
    parsed = parse_reply(reply, req, state_spec(dev.adapter()))
    signal = parsed.signal
    assert set(signal) == set(dev.adapter())
    assert parsed.signal_metrics["signal_norm"] > 0

    # independent model at the developer's adapter, the auditor's round-0 batch
    model = copy.deepcopy(service.model)
    load_adapter_state(model, dev.adapter())
    batch = service.round_batch(0, run.experiment.method.auditor_batch_size)
    inputs, s = batch.inputs, batch.s
    params = adapter_parameters(model)
    key = max(signal, key=lambda k: signal[k].abs().max())
    idx = np.unravel_index(int(signal[key].abs().argmax()), tuple(signal[key].shape))
    eps = 1e-3
    with torch.no_grad():
        p = params[key]
        p[idx] += eps
        up = float(_objective(method, model, service, state, inputs, s))
        p[idx] -= 2 * eps
        down = float(_objective(method, model, service, state, inputs, s))
        p[idx] += eps
    fd = (up - down) / (2 * eps)
    assert fd == pytest.approx(float(signal[key][idx]), rel=0.05, abs=1e-4)

    # descending the signal moves the underlying quantity the way the method needs
    with torch.no_grad():
        before = float(_objective(method, model, service, state, inputs, s))
        step = 1e-2 / max(float(torch.sqrt(sum((g ** 2).sum() for g in signal.values()))), 1e-12)
        for k, g in signal.items():
            params[k] -= step * g
        after = float(_objective(method, model, service, state, inputs, s))
    assert after < before  # R decreases: adversary loss up / entropy up / overlap down
    if method == "orthogonality":
        nonzero_b = [k for k in signal if "lora_B" in k and signal[k].abs().max() > 0]
        assert nonzero_b == []  # O-LoRA term depends on A_t only


def test_unlearning_negation_is_exact():
    run = make_run("unlearning")
    dev = DeveloperTrainer(run.experiment, run.developer)
    service = AuditorService(run.experiment, run.auditor)
    req, reply = ask(service, dev, run, "unlearning_update")
    parsed = parse_reply(reply, req, state_spec(dev.adapter()), update_spec(dev.model))
    from peft.tuners.lora import LoraLayer

    w0 = {n: m.get_base_layer().weight.detach().clone()
          for n, m in dev.model.backbone.named_modules() if isinstance(m, LoraLayer)}
    dev.apply_unlearning(parsed.update, LAM)

    # independent: retrain the same sensitive adapter and form B_s A_s * alpha / r by hand
    from fairsplit.auditor import methods as M

    train = service.data["auditor_train"]
    model_s, _ = M.train_sensitive_adapter(run.experiment, train.inputs, service.train_codes, 2)
    scale = run.experiment.lora.lora_alpha / run.experiment.lora.r
    for name, m in dev.model.backbone.named_modules():
        if isinstance(m, LoraLayer):
            ms = dict(model_s.backbone.named_modules())[name]
            delta = ms.lora_B["default"].weight @ ms.lora_A["default"].weight * scale
            torch.testing.assert_close(m.get_base_layer().weight, w0[name] - LAM * delta,
                                       rtol=0, atol=1e-6)
            assert delta.abs().max() > 0
            # the auditor evaluates the very model the developer trains
            audited = dict(service.model.backbone.named_modules())[name].get_base_layer().weight
            torch.testing.assert_close(audited, m.get_base_layer().weight, rtol=0, atol=0)


@pytest.mark.parametrize("method,want", [("erm", "none"), ("adversarial", "signal"),
                                         ("entropy", "signal"), ("orthogonality", "signal"),
                                         ("unlearning", "unlearning_update")])
def test_reply_contains_only_the_declared_records(method, want):
    run = make_run(method)
    dev = DeveloperTrainer(run.experiment, run.developer)
    service = AuditorService(run.experiment, run.auditor)
    req, reply = ask(service, dev, run, want, split="val")
    expected = {"report", "privacy"} | ({"signal", "signal_metrics"} if want == "signal" else set()) | (
        {"update", "signal_metrics"} if want == "unlearning_update" else set())
    assert set(reply.keys()) == expected
    report = reply["report"]
    assert isinstance(report, ConfigRecord) and set(report.keys()) == {"json"}
    import json

    assert set(json.loads(report["json"])) == set(FairnessReport.model_fields)
    if want != "none":
        assert set(json.loads(reply["signal_metrics"]["json"])) == set(SignalMetrics.model_fields)
    if want == "signal":
        sig = reply["signal"]
        assert isinstance(sig, ArrayRecord)
        spec = state_spec(adapter_state(dev.model))
        assert {k: (tuple(a.shape), a.dtype) for k, a in sig.items()} == {
            k: (v.shape, v.dtype) for k, v in spec.items()}
    if want == "unlearning_update":
        spec = update_spec(dev.model)
        assert {k: tuple(a.shape) for k, a in reply["update"].items()} == {k: v.shape for k, v in spec.items()}


def test_developer_refuses_signal_with_wrong_keys_or_shapes():
    run = make_run("adversarial")
    dev = trained_developer(run)
    service = AuditorService(run.experiment, run.auditor)
    req, reply = ask(service, dev, run, "signal")
    spec = state_spec(dev.adapter())
    bad = reply["signal"].to_torch_state_dict()
    bad.pop(next(iter(bad)))
    reply["signal"] = ArrayRecord(bad)
    with pytest.raises(PayloadError, match="signal: key mismatch"):
        parse_reply(reply, req, spec)
    reply_signal = service.handle(message_type_for(req), make_request(dev.adapter(), None, req))
    wrong = {k: (v.T.contiguous() if v.ndim == 2 and v.shape[0] != v.shape[1] else v)
             for k, v in reply_signal["signal"].to_torch_state_dict().items()}
    reply_signal["signal"] = ArrayRecord(wrong)
    with pytest.raises(PayloadError, match="expected shape"):
        parse_reply(reply_signal, req, spec)


def test_auditor_refuses_other_experiment_and_method():
    run = make_run("adversarial")
    dev = DeveloperTrainer(run.experiment, run.developer)
    service = AuditorService(run.experiment, run.auditor)
    req = RoundRequest(round=0, split="none", want="signal", method="entropy",
                       fingerprint=experiment_fingerprint(run.experiment), protocol=PROTOCOL_VERSION)
    with pytest.raises(ProtocolMismatch, match="method"):
        service.handle("train", make_request(dev.adapter(), None, req))
    req = RoundRequest(round=0, split="none", want="signal", method="adversarial",
                       fingerprint="f" * 64, protocol=PROTOCOL_VERSION)
    with pytest.raises(ProtocolMismatch, match="fingerprint"):
        service.handle("train", make_request(dev.adapter(), None, req))
    assert not service.data_loaded  # refused before any of the auditor's data was read


def test_signal_is_added_to_every_local_step():
    run = make_run("adversarial")
    a = DeveloperTrainer(run.experiment, run.developer)
    b = DeveloperTrainer(run.experiment, run.developer)
    zero = {k: torch.zeros_like(v) for k, v in a.adapter().items()}
    a.train_round(zero)
    b.train_round(None)
    for k, v in a.adapter().items():  # a zero signal changes nothing
        torch.testing.assert_close(v, b.adapter()[k], rtol=0, atol=0)
    c = DeveloperTrainer(run.experiment, run.developer)
    push = {k: torch.full_like(v, 1e-2) for k, v in c.adapter().items()}
    c.train_round(push)
    assert any(not torch.equal(v, b.adapter()[k]) for k, v in c.adapter().items())
