"""FairNet in the split (``fairnet``, ``fairnet_local``): the gate is exact, the auditor's
contrastive signal is autograd of the documented loss, the developer's detector never sees s,
the payload policy admits exactly the gated records, resume, and DP refusal.
The run over real Flower is in ``test_flower_integration.py``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from flower_helpers import tiny_run

from fairsplit.auditor.service import AuditorService, AuditorShared
from fairsplit.deploy.colocated import DirectChannel, run_colocated
from fairsplit.developer.fairnet import CondStage
from fairsplit.developer.loop import AuditorError, run_experiment
from fairsplit.developer.trainer import DeveloperTrainer
from fairsplit.protocol.codec import PayloadError
from fairsplit.protocol.conditional import build_gated, contrastive_term, gate_mask, prototypes
from fairsplit.protocol.data import Dataset
from fairsplit.protocol.messages import PROTOCOL_VERSION, RoundRequest, make_request, parse_reply
from fairsplit.protocol.model import build_model, lora_modules
from fairsplit.protocol.schedule import planned_requests


def fairnet_run(method: str = "fairnet", rounds: int = 2, cond_rounds: int = 2, private: bool = False, **method_keys):
    run = tiny_run(method, rounds=rounds, private=private)
    m = run.experiment.method.model_copy(update=dict(cond_rounds=cond_rounds, detector_steps=15,
                                                      detector_examples=200, lof_neighbors=10,
                                                      cond_lr=1e-2, **method_keys))
    run.experiment.method = type(m).model_validate(m.model_dump())
    return run


def _perturbed_gated(run, seed=0):
    """A tiny model with a non-zero conditional LoRA and a random detector (and its inputs)."""
    model = build_model(run.experiment)
    model.eval()
    gated = build_gated(model, run.experiment)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in gated.cond.B:
            b.copy_(torch.randn(b.shape, generator=g) * 0.5)
        for p in gated.detector.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    return model, gated, model.prepare(images)


# -- the gate --------------------------------------------------------------------------------


def test_gate_tau_one_is_the_ungated_model_and_tau_zero_applies_the_lora_everywhere():
    run = fairnet_run()
    model, gated, batch = _perturbed_gated(run)
    with torch.no_grad():
        plain = model(batch)
        # τ = 1: exactly the task model, bit for bit
        assert torch.equal(gated(batch, tau=1.0), plain)
        # τ = 0: φ_c on every input; independently, merge W0 + (α/r)·B_c·A_c into every base weight
        everywhere = gated(batch, tau=0.0)
        merged = copy.deepcopy(model)
        for (name, mod), a, b in zip(lora_modules(merged).items(), gated.cond.A, gated.cond.B):
            mod.get_base_layer().weight.add_(gated.cond.scale * b @ a)
    with torch.no_grad():
        expected = merged(batch)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the conditional LoRA does change outputs
    torch.testing.assert_close(everywhere, expected, rtol=1e-4, atol=1e-5)


def test_gate_selects_per_example_between_the_two_outputs():
    run = fairnet_run()
    model, gated, batch = _perturbed_gated(run, seed=1)
    with torch.no_grad():
        off, on, p = gated.parts(batch)
        tau = float(p.median())
        mixed = gated(batch, tau=tau)
    flag = gate_mask(p, tau)
    assert 0 < int(flag.sum()) < len(flag)
    torch.testing.assert_close(mixed[flag], on[flag], rtol=1e-5, atol=1e-6)
    assert torch.equal(mixed[~flag], off[~flag])


# -- the auditor's contrastive signal --------------------------------------------------------


def _explicit_triplet(z, y, mu, majority, margin, lam):
    """Eq. 2 written out per anchor (the documented loss), independent of contrastive_term."""
    total = 0.0
    for i in range(len(z)):
        pos = mu[y[i], majority[y[i]]]
        d_pos = ((z[i] - pos) ** 2).sum()
        d_neg = min(((z[i] - mu[c, majority[c]]) ** 2).sum() for c in range(mu.shape[0]) if c != y[i])
        total = total + torch.clamp(d_pos - d_neg + margin, min=0.0)
    return lam * total / len(z)


@pytest.mark.parametrize("minority", ["accuracy", "size"])
def test_contrastive_signal_equals_autograd_of_the_documented_loss(tmp_path, minority):
    run = fairnet_run(lam=0.7, margin=0.5, minority=minority)
    exp = run.experiment
    service = AuditorService(exp, run.auditor)
    method = service.method
    gated = service.gated
    with torch.no_grad():  # a developer whose φ_c has moved: every term of the gradient is live
        for b in gated.cond.B:
            b.normal_(0, 0.1)
    state = RecordDict()
    req = RoundRequest(round=exp.rounds, split="none", want="signal", method="fairnet",
                       fingerprint=service.fingerprint, protocol=PROTOCOL_VERSION)
    release = method.signal(req, state)

    # the prototypes are the per-(class, group) means of the auditor's training part (φ_c off)
    train = service.data["auditor_train"]
    with torch.no_grad():
        feats = gated.hidden(service.model.prepare(train.inputs))[0]
        correct = (service.model.head(feats).argmax(-1).numpy() == np.asarray(train.y))
    y_all, s_all = np.asarray(train.y), service.train_codes
    mu, majority = state["fairnet.prototypes"]["mu"].numpy(), state["fairnet.prototypes"]["majority"].numpy()
    for c in range(2):
        for g in range(2):
            cell = (y_all == c) & (s_all == g)
            np.testing.assert_allclose(mu[c, g], feats[cell].mean(0).numpy(), rtol=1e-5, atol=1e-6)
        cells = [(y_all == c) & (s_all == g) for g in range(2)]
        if minority == "size":  # the group with most examples of the class
            assert majority[c] == np.argmax([cell.sum() for cell in cells])
        else:  # the group the ERM model classifies best within the class
            assert majority[c] == np.argmax([correct[cell].mean() for cell in cells])

    # the anchors are minority examples; the gradient is autograd of Eq. 2 at them
    inputs, y = method._minority_batch(req.round, torch.as_tensor(majority))
    z = gated.features_cond(service.model.prepare(inputs))
    loss = _explicit_triplet(z, y, torch.as_tensor(mu), torch.as_tensor(majority), 0.5, 0.7)
    params = gated.cond.params_by_key()
    grads = torch.autograd.grad(loss, list(params.values()))
    assert set(release.cond_gradient) == set(params)
    assert release.adapter_gradient is None and release.head_gradient is None
    for (k, _), g in zip(params.items(), grads):
        torch.testing.assert_close(release.cond_gradient[k], g, rtol=1e-4, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert release.metrics["objective"] == pytest.approx(float(loss), rel=1e-5)
    # and the vectorised loss is the same function
    assert float(contrastive_term(z, y, torch.as_tensor(mu), torch.as_tensor(majority), 0.5, 0.7)) == \
        pytest.approx(float(loss), rel=1e-5)


def test_prototypes_are_cell_means():
    feats = torch.arange(12.0).view(6, 2)
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    s = torch.tensor([0, 1, 1, 1, 0, 0])
    mu, counts = prototypes(feats, y, s, 2, 2)
    assert counts.tolist() == [[2, 1], [1, 2]]
    torch.testing.assert_close(mu[0, 0], feats[[0, 5]].mean(0))
    torch.testing.assert_close(mu[1, 1], feats[[2, 3]].mean(0))


# -- the developer's detector never sees s ----------------------------------------------------


class _WatchedDataset(Dataset):
    """A developer split that counts reads of the sensitive fields."""

    reads = 0

    def __getattribute__(self, name):
        if name in ("s", "attr"):
            type(self).reads += 1
        return object.__getattribute__(self, name)


def test_detector_and_conditional_training_never_read_sensitive_fields():
    run = fairnet_run("fairnet_local")
    trainer = DeveloperTrainer(run.experiment, run.developer)
    data = trainer.data
    watched = _WatchedDataset(modality=data.modality, inputs=data.inputs, y=data.y, description=data.description)
    stage = CondStage(trainer.model, run.experiment, watched, trainer.device)
    _WatchedDataset.reads = 0  # the constructor's guard checked that both are None
    stats = stage.train_detector()
    stage.train_round(None)
    assert _WatchedDataset.reads == 0
    assert 0 < stats["pseudo_minority_rate"] <= 0.2
    with pytest.raises(ValueError, match="sensitive"):
        CondStage(trainer.model, run.experiment,
                  Dataset(modality=data.modality, inputs=data.inputs, y=data.y, s=np.zeros(len(data.y))),
                  trainer.device)


def test_detector_is_a_function_of_developer_data_alone(tmp_path):
    """Two runs whose auditors hold different s (shuffled across its examples): the detector the
    developer sends is bit-identical, the conditional LoRA (trained with the auditor's signal)
    is not."""
    a = fairnet_run()
    b = fairnet_run()
    sent = {}
    for name, run in (("a", a), ("b", b)):
        shared = AuditorShared.create(run.auditor)
        if name == "b":  # the same examples, their sensitive groups shuffled (before the service reads them)
            rng = np.random.default_rng(5)
            for part in shared.load_data(run.auditor, run.experiment).values():
                object.__setattr__(part, "s", rng.permutation(np.asarray(part.s)))
        service = AuditorService(run.experiment, run.auditor, shared=shared)
        run_experiment(run.experiment, run.developer, DirectChannel(service), tmp_path / name, "colocated")
        from safetensors.torch import load_file
        sent[name] = (load_file(str(tmp_path / name / "model" / "fairnet_detector.safetensors")),
                      load_file(str(tmp_path / name / "model" / "fairnet_cond_lora.safetensors")))
    det_a, cond_a = sent["a"]
    det_b, cond_b = sent["b"]
    for k in det_a:
        if k != "threshold":  # τ is the auditor's choice on its validation part
            assert torch.equal(det_a[k], det_b[k]), k
    assert any(not torch.equal(cond_a[k], cond_b[k]) for k in cond_a)


# -- policy, plan, privacy --------------------------------------------------------------------


def test_gated_requests_carry_cond_lora_and_detector_and_replies_only_the_cond_gradient():
    run = fairnet_run()
    trainer = DeveloperTrainer(run.experiment, run.developer)
    stage = CondStage(trainer.model, run.experiment, trainer.data, trainer.device)
    req = RoundRequest(round=2, split="none", want="signal", method="fairnet", fingerprint="0" * 64,
                       protocol=PROTOCOL_VERSION)
    with pytest.raises(PayloadError, match="conditional LoRA and detector"):
        make_request(trainer.adapter(), trainer.head(), req)
    with pytest.raises(PayloadError, match="head is sent exactly"):
        make_request(trainer.adapter(), None, req, cond_adapter=stage.cond_state(),
                     detector=stage.detector_state())
    content = make_request(trainer.adapter(), trainer.head(), req, cond_adapter=stage.cond_state(),
                           detector=stage.detector_state())
    assert set(content.keys()) == {"adapter", "head", "cond_adapter", "detector", "config"}
    # a reply carrying an adapter gradient for FairNet is refused
    from fairsplit.protocol.codec import state_to_record
    from fairsplit.protocol.model import state_spec
    bad = RecordDict({"signal": state_to_record(trainer.adapter()),
                      "cond_signal": state_to_record(stage.cond_state())})
    with pytest.raises(PayloadError, match="undeclared"):
        parse_reply(bad, req, state_spec(trainer.adapter()), cond_spec=state_spec(stage.cond_state()))


def test_plan_has_erm_rounds_then_conditional_rounds_then_tau_and_test():
    run = fairnet_run(rounds=2, cond_rounds=2)
    run.experiment.eval_every = 2
    assert planned_requests(run.experiment) == [
        (2, "val", "signal"), (3, "none", "signal"), (4, "val", "none"), (4, "none", "threshold"),
        (4, "test", "none")]
    local = fairnet_run("fairnet_local", rounds=2, cond_rounds=2)
    local.experiment.eval_every = 2
    assert planned_requests(local.experiment) == [
        (2, "val", "none"), (4, "val", "none"), (4, "none", "threshold"), (4, "test", "none")]


def test_fairnet_detector_auc_is_refused_under_the_auditors_dp(tmp_path):
    run = fairnet_run("fairnet", private=True, report_detector_auc=True)
    with pytest.raises(AuditorError, match="NotPrivate"):
        run_colocated(run, tmp_path / "out")


def test_fairnet_under_dp_trains_the_conditional_lora_from_noisy_releases(tmp_path):
    """fairnet is served under DP: private prototypes, clipped noised per-example anchor
    gradients, τ from noisy reports; the run spends its plan (tests/test_privacy.py)."""
    run = fairnet_run("fairnet", private=True)
    res = run_colocated(run, tmp_path / "out")
    assert res["privacy"]["dp"] is True
    signals = [r["signal"] for r in res["per_round"] if "signal" in r]
    assert len(signals) == 2 and all(s["signal_norm"] > 0 for s in signals)
    assert res["final"]["tau"] in set(run.experiment.method.taus) | {1.0}


def test_fairnet_local_under_dp_chooses_tau_from_noisy_reports(tmp_path):
    """fairnet_local is served under DP: the τ choice spends one noisy validation report per τ
    (on the plan; tests/test_privacy.py checks the ledger), and τ is one of the grid."""
    run = fairnet_run("fairnet_local", rounds=2, cond_rounds=2, private=True)
    res = run_colocated(run, tmp_path / "out")
    assert res["privacy"]["dp"] is True
    assert res["final"]["tau"] in set(run.experiment.method.taus) | {1.0}


def test_fairnet_run_reports_the_gated_model_and_the_chosen_tau(tmp_path):
    run = fairnet_run(rounds=2, cond_rounds=2)
    res = run_colocated(run, tmp_path / "out")
    assert [r["round"] for r in res["per_round"]] == [1, 2, 3, 4]
    assert res["final"]["tau"] in set(run.experiment.method.taus) | {1.0}
    assert "detector_flag_rate" in res["per_round"][1]
    signals = [r["signal"] for r in res["per_round"] if "signal" in r]
    assert len(signals) == 2 and all(s["signal_norm"] > 0 for s in signals)
    assert all(s["detector_auc"] is None for s in signals)  # an oracle: off unless agreed
    for name in ("fairnet_cond_lora", "fairnet_detector", "head", "adapter_model"):
        assert (tmp_path / "out" / "model" / f"{name}.safetensors").exists()
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "fairnet_cond_lora.safetensors" in card and f"τ = {res['final']['tau']}" in card
    # the ERM phase is ERM: the same losses as an ERM run of the same experiment
    erm = run_colocated(tiny_run("erm", rounds=2, private=False), tmp_path / "erm")
    assert [r["train_loss"] for r in res["per_round"][:2]] == [r["train_loss"] for r in erm["per_round"]]


def test_detector_auc_is_released_only_when_the_experiment_agrees(tmp_path):
    run = fairnet_run(rounds=1, cond_rounds=1, report_detector_auc=True)
    res = run_colocated(run, tmp_path / "out")
    auc = res["per_round"][0]["signal"]["detector_auc"]
    assert auc is not None and 0.0 <= auc <= 1.0


def test_fairnet_resumes_mid_conditional_phase_to_identical_results(tmp_path):
    class Interrupted(Exception):
        pass

    run = fairnet_run("fairnet_local", rounds=2, cond_rounds=2)
    run.auditor.state_dir = str(tmp_path / "state")
    ref = run_colocated(run, tmp_path / "ref")

    def crash(row):
        if row["round"] == 3:
            raise Interrupted

    run2 = fairnet_run("fairnet_local", rounds=2, cond_rounds=2)
    run2.auditor.state_dir = str(tmp_path / "state2")
    with pytest.raises(Interrupted):
        run_colocated(run2, tmp_path / "out", on_round=crash)
    res = run_colocated(run2, tmp_path / "out", resume=True)
    assert res["metrics"] == ref["metrics"]
    assert res["final"] == ref["final"]
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "ref" / "model" / "fairnet_cond_lora.safetensors"))
    b = load_file(str(tmp_path / "out" / "model" / "fairnet_cond_lora.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bench_tables_show_fairnets_lambda_and_the_auditors_tau_per_seed():
    from fairsplit.deploy.bench import _lam_cell

    assert _lam_cell({"method": "fairnet", "lam": 0.03, "auditor_lams": [0.1, 0.3, 1.0]}) == \
        "0.03; τ on val: 0.1/0.3/1"
    assert _lam_cell({"method": "last_layer", "lam": 0.0, "auditor_lams": [1.0]}) == "α on val: 1"


def test_tau_rule_takes_the_best_wga_within_the_accuracy_tolerance_else_the_ungated_model():
    """choose_threshold on a stub gated model: the ungated scores misclassify half of group b's
    positives; φ_c fixes them but breaks two negatives of group a. The τ that gates only b's
    errors wins; a φ_c that is wrong everywhere leaves the ungated model (τ = 1)."""
    from types import SimpleNamespace

    from fairsplit.auditor.methods.fairnet import choose_threshold

    y = np.array([1] * 40 + [0] * 40 + [1] * 40 + [0] * 40)
    s = np.array(["a"] * 80 + ["b"] * 80)
    off = np.where(y == 1, 0.9, 0.1).astype(float)
    off[80:100] = 0.1  # half of b's positives wrong without φ_c
    on = off.copy()
    on[80:100] = 0.9  # φ_c fixes them ...
    on[40:42] = 0.9  # ... and breaks two of a's negatives
    p = np.zeros(160)
    p[80:100] = 0.8  # the detector flags exactly b's wrong positives
    p[40:42] = 0.6  # and a's two negatives, less surely
    gated = SimpleNamespace(score_parts=lambda *a, **k: (off, on, p))

    def method(drop):
        cfg = SimpleNamespace(taus=[0.0, 0.5, 0.7], max_accuracy_drop=drop)
        val = Dataset(modality="image", inputs=np.zeros((160, 1, 1, 3), np.uint8), y=y, s=s)
        ctx = SimpleNamespace(data={"auditor_val": val},
                              exp=SimpleNamespace(eval_batch_size=8, threshold=0.5),
                              cfg=SimpleNamespace(device="cpu", min_group_size=10),
                              gate=SimpleNamespace(dp=False))
        return SimpleNamespace(ctx=ctx, cfg=cfg)

    # τ = 0.7 gates only b's wrong positives: WGA 0.75 → 1.0 and accuracy rises
    assert choose_threshold(method(0.005), gated).metrics["tau"] == 0.7
    assert choose_threshold(method(0.005), gated).metrics["objective"] == pytest.approx(1.0)
    # if φ_c is wrong wherever it is applied (every τ < 1 loses accuracy), τ = 1 is kept
    bad = SimpleNamespace(score_parts=lambda *a, **k: (off, 1 - off, np.ones(160)))
    assert choose_threshold(method(0.005), bad).metrics["tau"] == 1.0


def test_private_anchor_gradient_without_noise_or_clipping_equals_the_exact_signal():
    """fairnet's DP signal at σ = 0, no clipping, B = the anchors: the per-example terms
    (:func:`anchor_term`, vmap) give exactly ∇_{φ_c} of Eq. 2 on the same anchors."""
    from fairsplit.auditor.methods.fairnet import anchor_term
    from fairsplit.auditor.methods.private_signal import MethodForward, noisy_param_gradient
    from fairsplit.protocol.conditional import contrastive_term

    run = fairnet_run()
    model, gated, x = _perturbed_gated(run)
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(2, 2, model.feature_dim, generator=g)
    majority = torch.tensor([0, 1])
    y = torch.tensor([0, 1] * 6)
    params = gated.cond.params_by_key()
    gated.eval()
    exact = torch.autograd.grad(contrastive_term(gated.features_cond(x), y, mu, majority, 0.5, 0.7),
                                list(params.values()))
    module = MethodForward(gated, "features_cond")
    names = {id(p): n for n, p in module.named_parameters()}
    released = {names[id(p)]: k for k, p in params.items()}
    private, clipped = noisy_param_gradient(module, released, x, anchor_term(mu, majority, 0.5, 0.7), (y,),
                                            clip_norm=1e9, sigma=0.0, b_exp=len(y),
                                            generator=torch.Generator().manual_seed(0))
    assert clipped == 0.0 and set(private) == set(params)
    scale = max(float(e.abs().max()) for e in exact)
    assert scale > 0
    for k, e in zip(params, exact):
        torch.testing.assert_close(private[k], e, rtol=1e-4, atol=1e-6 * scale)
