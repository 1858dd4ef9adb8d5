"""The method registry, the two methods that use the auditor's labels, and λ chosen on validation.

* the auditor's registry and the protocol's method table name the same methods;
* the five methods that existed before the registry give bit-identical results to the code
  before it (``tests/data/pre_registry_golden.json`` was written by commit a7a29cc's code on the
  same tiny configs);
* ``penalty``: fairret's term equals an independent formula, the signal is its gradient for the
  adapter and the head, the constraint form's λ follows dual ascent;
* ``last_layer``: the refitted head crosses with the head's contract and is the model the
  developer ends with.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from safetensors.torch import load_file

from flower_helpers import TINY_VIT
from fairsplit.auditor.methods import REGISTRY
from fairsplit.auditor.methods.fairness_terms import fairness_violation
from fairsplit.auditor.methods.last_layer import balanced_subsample
from fairsplit.auditor.service import AuditorService, ProtocolMismatch
from fairsplit.deploy.bench import choose_lam
from fairsplit.deploy.colocated import run_colocated
from fairsplit.developer.trainer import DeveloperTrainer
from fairsplit.protocol.codec import PayloadError
from fairsplit.deploy.config import RunFile
from fairsplit.protocol.config import ConfigError, ExperimentConfig, experiment_fingerprint, parse_config
from fairsplit.protocol.messages import PROTOCOL_VERSION, RoundRequest, make_request, message_type_for, parse_reply
from fairsplit.protocol.methods import METHODS
from fairsplit.protocol.model import adapter_parameters, load_adapter_state, state_spec
from fairsplit.protocol.policy import refit_basis_spec

GOLDEN = Path(__file__).parent / "data" / "pre_registry_golden.json"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))


def tiny(method: str, rounds: int = 2, **keys) -> RunFile:
    cfg = {"experiment": {"rounds": rounds, "local_steps": 3, "batch_size": 16, "lr": 3e-3, "seed": 0,
                          "model": TINY_VIT,
                          "lora": {"r": 2, "lora_alpha": 4.0}, "method": {"name": method, **keys}},
           "developer": {"data": {"kind": "synthetic", "n": 300}},
           "auditor": {"data": {"kind": "synthetic", "n": 300, "sensitive": True}, "min_group_size": 5,
                       "privacy": {"enabled": False}}}  # exact releases; DP: tests/test_privacy.py
    return parse_config(RunFile, cfg, "<test>")


def test_registry_and_method_table_name_the_same_methods():
    assert set(REGISTRY) == set(METHODS)
    for name, cls in REGISTRY.items():
        assert cls.name == name
        spec = METHODS[name]
        assert spec.config(name=name).name == name
        # what a method serves matches what its row says the developer asks for
        serves = {w for w, meth in (("signal", "signal"), ("unlearning_update", "update"), ("head", "refit_head"),
                                    ("threshold", "choose_threshold"))
                  if getattr(cls, meth) is not getattr(REGISTRY["erm"], meth)}
        if "first_stage" in spec.config.model_fields:  # composite: serves its first stage's too
            assert set(spec.wants) <= serves, name
        else:
            assert serves == set(spec.wants), name


#: Tolerance of the golden comparison. The golden file was written by one torch build on one CPU;
#: another build or CPU (other BLAS kernels, other summation orders) changes float32 results in
#: the last digits (seen: the 8th significant digit with torch 2.14.1 on another machine). A few
#: training steps of float32 sums over ~10³ terms (unit roundoff 6e-8) drift by ~1e-6 relative at
#: most, so 1e-5 holds for every build while a real change of the method (a different gradient,
#: batch or step) moves these values by far more. Counts-based metrics (accuracy) stay exact
#: unless a score lies within that drift of the threshold.
GOLDEN_REL = 1e-5


@pytest.mark.parametrize("method", ["erm", "unlearning", "adversarial", "entropy", "orthogonality"])
def test_existing_methods_are_bit_identical_to_the_pre_registry_code(method, tmp_path):
    """Equal to the pre-registry code's results, to float32 build-to-build drift (GOLDEN_REL)."""
    golden = json.loads(GOLDEN.read_text())[method]
    cfg = golden["config"]
    run = parse_config(RunFile, {**cfg, "auditor": {**cfg["auditor"], "privacy": {"enabled": False}}}, "<golden>")
    res = run_colocated(run, tmp_path / "run")
    adapter = load_file(str(tmp_path / "run" / "model" / "adapter_model.safetensors"))
    head = load_file(str(tmp_path / "run" / "model" / "head.safetensors"))

    def close(got, want):
        assert got == pytest.approx(want, rel=GOLDEN_REL, abs=1e-9)

    close({k: v for k, v in res["metrics"].items() if k != "per_group"}, golden["metrics"])
    close({k: float(v.double().pow(2).sum()) for k, v in sorted(adapter.items())}, golden["adapter_sq"])
    close({k: float(v.double().pow(2).sum()) for k, v in sorted(head.items())}, golden["head_sq"])
    close([r.get("train_loss") for r in res["per_round"]], golden["train_loss"])


def test_a_key_of_another_method_is_an_error_naming_it():
    base = {"model": {"kind": "timm", "name": "x"}}
    with pytest.raises(ConfigError, match=r"method\.adversarial\.sensitive_steps: unknown key.*orthogonality"):
        parse_config(ExperimentConfig, {**base, "method": {"name": "adversarial", "sensitive_steps": 3}})
    with pytest.raises(ConfigError, match=r"method\.erm\.lam: unknown key"):
        parse_config(ExperimentConfig, {**base, "method": {"name": "erm", "lam": 1.0}})
    with pytest.raises(ConfigError, match="bench"):
        parse_config(RunFile, {"experiment": base, "developer": {"data": {"kind": "synthetic"}},
                               "auditor": {"data": {"kind": "synthetic", "sensitive": True}},
                               "bench": {"methods": {"entropy": {"sensitive_steps": 2}}}})


# -- penalty -------------------------------------------------------------------------------------


def _independent_violation(p, s, y, statistic):
    """Σ_g |stat_g / stat − 1| written out by hand (fairret's NormLoss, p = 1)."""
    def rate(mask, weight):
        return (p[mask] * weight[mask]).sum() / weight[mask].sum()

    one = torch.ones_like(p)
    yf = y.float()
    groups = sorted(set(s.tolist()))
    if statistic == "demographic_parity":
        stats = [(one, lambda m: m)]
    elif statistic == "equal_opportunity":
        stats = [(yf, lambda m: m)]
    elif statistic == "equalized_odds":
        stats = [(yf, None), (1 - yf, None)]
    total = 0.0
    for w, _ in stats:
        overall = (p * w).sum() / w.sum()
        for g in groups:
            total = total + abs(rate(s == g, w) / overall - 1)
    return total


@pytest.mark.parametrize("statistic", ["demographic_parity", "equal_opportunity", "equalized_odds"])
def test_fairret_violation_equals_an_independent_formula(statistic):
    g = torch.Generator().manual_seed(3)
    p = torch.rand(200, generator=g) * 0.98 + 0.01
    s = torch.randint(0, 3, (200,), generator=g)
    y = torch.randint(0, 2, (200,), generator=g)
    got = fairness_violation(p, s, y, 3, statistic)
    assert float(got) == pytest.approx(float(_independent_violation(p, s, y, statistic)), rel=1e-5)
    assert float(fairness_violation(torch.full_like(p, 0.3), s, y, 3, statistic)) == pytest.approx(0, abs=1e-6)
    # a group absent from the batch is left out, never NaN
    assert torch.isfinite(fairness_violation(p, s.clamp(max=1), y, 3, statistic))


def ask(service, dev, run, want, split="none", round_=0, state=None):
    req = RoundRequest(round=round_, split=split, want=want, method=run.experiment.method.name,
                       fingerprint=experiment_fingerprint(run.experiment), protocol=PROTOCOL_VERSION)
    basis = dev.feature_basis(getattr(run.experiment.method, "dp_subspace_dim", 4)) if want == "head" else None
    content = make_request(dev.adapter(), dev.head(), req, refit_basis=basis)
    return req, service.handle(message_type_for(req), content, state)


def test_penalty_signal_is_the_gradient_for_adapter_and_head():
    run = tiny("penalty", lam=0.8, statistic="equalized_odds", auditor_batch_size=64)
    dev = DeveloperTrainer(run.experiment, run.developer)
    dev.train_round()
    service = AuditorService(run.experiment, run.auditor)
    req, reply = ask(service, dev, run, "signal")
    rep = parse_reply(reply, req, state_spec(dev.adapter()), head_spec=state_spec(dev.head()))
    assert set(rep.head_signal) == {"weight", "bias"} and rep.head_signal["weight"].shape == dev.head()["weight"].shape
    assert rep.signal_metrics["lam"] == pytest.approx(0.8)

    model = copy.deepcopy(service.model)
    load_adapter_state(model, dev.adapter())
    model.head.load_state_dict(dev.head())
    b = service.round_batch(0, 64)

    def objective():
        model.eval()
        p = torch.softmax(model(model.prepare(b.inputs)).float(), -1)[:, 1]
        return float(0.8 * fairness_violation(p, b.s, b.y, 2, "equalized_odds").detach())

    eps = 1e-3
    for params, grads in ((adapter_parameters(model), rep.signal),
                          (dict(model.head.named_parameters()), rep.head_signal)):
        key = max(grads, key=lambda k: grads[k].abs().max())
        idx = np.unravel_index(int(grads[key].abs().argmax()), tuple(grads[key].shape))
        with torch.no_grad():
            params[key][idx] += eps
            up = objective()
            params[key][idx] -= 2 * eps
            down = objective()
            params[key][idx] += eps
        assert (up - down) / (2 * eps) == pytest.approx(float(grads[key][idx]), rel=0.05, abs=1e-4)
    before = objective()
    with torch.no_grad():
        for params, grads in ((adapter_parameters(model), rep.signal),
                              (dict(model.head.named_parameters()), rep.head_signal)):
            for k, gr in grads.items():
                params[k] -= 1e-2 * gr
    assert objective() < before

    # the developer refuses a penalty reply whose head signal is missing
    del reply["head_signal"]
    with pytest.raises(PayloadError, match="head_signal"):
        parse_reply(reply, req, state_spec(dev.adapter()), head_spec=state_spec(dev.head()))


def test_penalty_head_signal_reaches_the_head():
    run = tiny("penalty", lam=1.0)
    a = DeveloperTrainer(run.experiment, run.developer)
    b = DeveloperTrainer(run.experiment, run.developer)
    zero = {k: torch.zeros_like(v) for k, v in a.adapter().items()}
    a.train_round(zero, {k: torch.full_like(v, 0.5) for k, v in a.head().items()})
    b.train_round(zero, None)
    # a positive head gradient added at every step pushes every head parameter down
    for k in ("weight", "bias"):
        assert bool((a.head()[k] < b.head()[k]).all()), k


def test_penalty_constraint_form_is_projected_dual_ascent(monkeypatch):
    from fairsplit.auditor.methods import penalty as P

    run = tiny("penalty", lam=1.0, bound=0.1, dual_lr=2.0)
    service = AuditorService(run.experiment, run.auditor)
    method = service.method
    gaps = iter([0.3, 0.3, 0.0, 0.0, 0.0])
    monkeypatch.setattr(P, "validation_gap", lambda ctx, stat, round_=0: next(gaps))
    state = RecordDict()
    lams = []
    for r in range(5):
        req = RoundRequest(round=r, split="none", want="signal", method="penalty",
                           fingerprint=service.fingerprint, protocol=PROTOCOL_VERSION)
        lams.append(method.lam_for(req, state))
    assert lams == pytest.approx([1.4, 1.8, 1.6, 1.4, 1.2])  # λ += 2·(gap − 0.1), never below 0
    gaps = iter([0.0] * 20)
    assert min(method.lam_for(req.model_copy(update={"round": 5 + i}), state) for i in range(20)) == 0.0

    # dual_every = 3: one validation pass (and one λ change) every 3 rounds, λ kept in between
    run3 = tiny("penalty", lam=1.0, bound=0.1, dual_lr=2.0, dual_every=3)
    m3 = AuditorService(run3.experiment, run3.auditor).method
    calls = []
    monkeypatch.setattr(P, "validation_gap", lambda ctx, stat, round_=0: calls.append(1) or 0.3)
    state3 = RecordDict()
    lams3 = [m3.lam_for(req.model_copy(update={"round": r}), state3) for r in range(7)]
    assert lams3 == pytest.approx([1.4, 1.4, 1.4, 1.8, 1.8, 1.8, 2.2]) and len(calls) == 3


# -- last_layer ---------------------------------------------------------------------------------


def test_last_layer_refit_head_is_the_final_model(tmp_path):
    run = tiny("last_layer", rounds=2, constraint="DI", alphas=[0.0, 4.0], refit_steps=50)
    res = run_colocated(run, tmp_path / "run")
    assert res["final"]["lam"] in (0.0, 4.0) and res["final"]["n"] > 0
    head = load_file(str(tmp_path / "run" / "model" / "head.safetensors"))
    # the head the developer saved is the auditor's refit, not the one it trained
    dev = DeveloperTrainer(run.experiment, run.developer)
    for _ in range(run.experiment.rounds):
        dev.train_round()
    assert not torch.equal(head["weight"], dev.head()["weight"])
    assert head["weight"].shape == dev.head()["weight"].shape
    audit = [json.loads(x) for x in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    heads = [a for a in audit if a["direction"] == "received" and "head" in a["records"]]
    assert len(heads) == 1  # one head crosses, once


def test_last_layer_reduces_the_validation_gap_it_targets():
    run = tiny("last_layer", constraint="DI", alphas=[0.0], refit_steps=100, max_accuracy_drop=1.0)
    dev = DeveloperTrainer(run.experiment, run.developer)
    dev.train_round()
    service = AuditorService(run.experiment, run.auditor)
    req, reply = ask(service, dev, run, "head", round_=2)
    plain = parse_reply(reply, req, state_spec(dev.adapter()), head_spec=state_spec(dev.head())).head
    fair_run = tiny("last_layer", constraint="DI", alphas=[20.0], refit_steps=100, max_accuracy_drop=1.0)
    service2 = AuditorService(fair_run.experiment, fair_run.auditor)
    req2, reply2 = ask(service2, dev, fair_run, "head", round_=2)
    fair = parse_reply(reply2, req2, state_spec(dev.adapter()), head_spec=state_spec(dev.head())).head

    def val_dpd(svc, head):
        svc.model.head.load_state_dict(head)
        part = svc.data["auditor_val"]
        pred = svc.model.predict_scores(part.inputs) >= 0.5
        rates = [pred[part.s == g].mean() for g in np.unique(part.s)]
        return max(rates) - min(rates)

    assert val_dpd(service2, fair) < val_dpd(service, plain)


def test_head_request_is_refused_for_other_methods():
    run = tiny("adversarial", lam=0.1)
    dev = DeveloperTrainer(run.experiment, run.developer)
    service = AuditorService(run.experiment, run.auditor)
    with pytest.raises(PayloadError, match="no refit_basis contract"):  # no method of its row sends one
        ask(service, dev, run, "head", round_=2)
    req = RoundRequest(round=2, split="none", want="head", method="adversarial",
                       fingerprint=experiment_fingerprint(run.experiment), protocol=PROTOCOL_VERSION)
    content = make_request(dev.adapter(), dev.head(), req, refit_basis=dev.feature_basis(4))
    service.refit_basis_spec = refit_basis_spec(service.head_spec, 4)  # as if the contract were known
    with pytest.raises(ProtocolMismatch, match="serves no 'head'"):
        service.handle(message_type_for(req), content)
    assert not service.data_loaded  # refused before the auditor's data was read


def test_balanced_subsample_equalises_cells():
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 3, 500), (rng.random(500) < 0.2).astype(int)
    idx = balanced_subsample(s, y, seed=1)
    counts = {(g, c): int(((s[idx] == g) & (y[idx] == c)).sum()) for g in range(3) for c in range(2)}
    assert len(set(counts.values())) == 1 and min(counts.values()) > 0


# -- choosing λ on validation --------------------------------------------------------------------


def _rep(acc, dpd, eod):
    return {"accuracy": acc, "demographic_parity_difference": dpd, "equalized_odds_difference": eod}


def test_choose_lam_keeps_accuracy_and_minimises_gaps():
    erm = _rep(0.80, 0.20, 0.30)
    cands = [(0.1, _rep(0.80, 0.15, 0.25)), (1.0, _rep(0.795, 0.05, 0.06)), (10.0, _rep(0.60, 0.0, 0.0))]
    assert choose_lam(cands, erm) == 1.0  # 10 is fairest but loses 20 points
    assert choose_lam([(1.0, _rep(0.5, 0, 0)), (2.0, _rep(0.6, 0, 0))], erm) == 2.0  # none keeps it
    with pytest.raises(ValueError):
        choose_lam([], erm)


@pytest.mark.parametrize("first", [{"name": "penalty", "lam": 0.5, "auditor_batch_size": 32},
                                   {"name": "unlearning", "lam": 0.5, "auditor_batch_size": 32,
                                    "sensitive_steps": 3}])
def test_last_layer_over_another_first_stage(first, tmp_path):
    """The first stage's requests and releases are its own row's; the head refit comes last."""
    run = tiny("last_layer", rounds=2, first_stage=first, alphas=[0.0, 1.0], refit_steps=20)
    res = run_colocated(run, tmp_path / "run")
    audit = [json.loads(x) for x in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    got = [sorted(a["records"]) for a in audit if a["direction"] == "received"]
    if first["name"] == "penalty":  # signal with head gradient at round 0 and round 1, then the head
        assert got[0] == ["head_signal", "privacy", "signal", "signal_metrics"]
        assert got[1] == ["head_signal", "privacy", "report", "signal", "signal_metrics"]
    else:
        assert got[0] == ["privacy", "signal_metrics", "update"]
    assert got[-2] == ["head", "privacy", "signal_metrics"] and got[-1] == ["privacy", "report"]
    assert res["final"]["lam"] in (0.0, 1.0)
    # the auditor refuses a request whose stage is not the agreed one
    service = AuditorService(run.experiment, run.auditor)
    dev = DeveloperTrainer(run.experiment, run.developer)
    want = "signal" if first["name"] == "penalty" else "unlearning_update"
    req = RoundRequest(round=0, split="none", want=want, method="last_layer", stage="adversarial",
                       fingerprint=experiment_fingerprint(run.experiment), protocol=PROTOCOL_VERSION)
    with pytest.raises(ProtocolMismatch, match="stage"):
        service.handle("train", make_request(dev.adapter(), None, req))


def test_bench_outputs_summary_against_erm(tmp_path):
    from fairsplit.deploy.bench import REPORT_METRICS, write_outputs

    def row(method, lam, seed, acc, dpd, eod, auditor_lam=None):
        m = {k: 0.5 for k in REPORT_METRICS}
        m.update(accuracy=acc, demographic_parity_difference=dpd, equalized_odds_difference=eod)
        return {"phase": "test", "method": method, "lam": lam, "auditor_lam": auditor_lam, "seed": seed,
                "wall_time_s": 1.0, **m}

    rows = [row("erm", 0.0, s, 0.80, 0.20, 0.30) for s in range(3)]
    rows += [row("last_layer", 0.0, s, 0.801, 0.08, 0.10, auditor_lam=float(s)) for s in range(3)]
    rows += [row("penalty", 0.5, s, 0.70, 0.01, 0.01) for s in range(3)]
    rows.append({"phase": "selection", "method": "penalty", "lam": 0.5, "seed": 0,
                 **{k: 0.5 for k in REPORT_METRICS}})
    write_outputs(rows, tmp_path, "t", dataset="cfg.toml")
    md = (tmp_path / "table.md").read_text()
    assert "| last_layer | α on val: 0/1/2 | 3 |" in md and "| erm | — | 3 |" in md
    assert "| last_layer | α on val: 0/1/2 | -60% | -67% | +0.1 |" in md
    assert "Best method within 1 accuracy point of ERM: **last_layer**" in md  # penalty loses 10 points
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["method"] for r in summary] == ["erm", "last_layer", "penalty"]
    assert summary[0]["dataset"] == "cfg.toml" and summary[2]["lam"] == 0.5 and summary[0]["seeds"] == 3
    assert summary[1]["accuracy"]["mean"] == pytest.approx(0.801) and summary[1]["accuracy"]["std"] == 0.0
    assert "| penalty | 0.5 |" in (tmp_path / "selection.md").read_text()
