"""Differential privacy on the auditor's releases: mechanisms, ledger, plan, run limits, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fairsplit.auditor import privacy as P
from fairsplit.auditor.methods.fairness_terms import fairness_violation
from fairsplit.auditor.service import AuditorService
from fairsplit.protocol.messages import PROTOCOL_VERSION, RoundRequest, make_request, message_type_for, parse_reply
from fairsplit.protocol.methods import request_plan
from fairsplit.protocol.model import adapter_state, head_state, state_spec
from fairsplit.protocol.privacy import ERROR_CODES, PublicRefusal, public_error_text
from fairsplit.protocol.schedule import planned_requests
from flower_helpers import tiny_run


# -- mechanisms ------------------------------------------------------------------------------------


def test_noise_has_the_stated_sigma():
    """Zero gradients: the noisy sum is pure N(0, σ²C²); a chi-square test on a fixed seed."""
    sigma, clip = 1.7, 0.5
    grads = {"w": torch.zeros(3, 4000)}
    out, _ = P.clipped_noisy_sum(grads, clip, sigma, torch.Generator().manual_seed(0))
    x = out["w"].double().numpy()
    n = x.size
    chi2 = float((x ** 2).sum() / (sigma * clip) ** 2)
    lo, hi = stats.chi2.ppf([0.001, 0.999], n)
    assert lo < chi2 < hi, (chi2, lo, hi)
    assert abs(x.mean()) < 4 * sigma * clip / math.sqrt(n)
    counts = P.noisy_counts({"a": np.zeros(4), "b": np.zeros(4)}, 3.0, np.random.default_rng(0))
    assert set(counts) == {"a", "b"}
    big = np.concatenate([P.noisy_counts({"a": np.zeros(4)}, 3.0, np.random.default_rng(i))["a"]
                          for i in range(500)])
    assert abs(big.std() - 3.0) < 0.15


def test_gradients_are_clipped_per_example():
    """Each example's joint norm is clipped to C (not the batch's); small ones are kept; NaN → 0."""
    g = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4], [float("nan"), 1.0]]),
         "b": torch.tensor([[0.0], [0.0], [1.0]])}
    out, clipped = P.clipped_noisy_sum(g, 1.0, 1e-12, torch.Generator().manual_seed(0))
    # example 0: norm 5 → (0.6, 0.8); example 1: norm 0.5 kept; example 2: non-finite → 0
    assert torch.allclose(out["a"], torch.tensor([0.9, 1.2]), atol=1e-6)
    assert torch.allclose(out["b"], torch.tensor([0.0]), atol=1e-6)
    assert clipped == pytest.approx(1 / 3)


def test_per_example_grads_equal_plain_autograd():
    """vmap(grad) on the tiny ViT with peft LoRA equals one backward pass per example."""
    from torch.func import functional_call

    from fairsplit.protocol.data import load_split
    from fairsplit.protocol.model import build_model, resolve_image_size

    run = tiny_run("erm")
    model = build_model(run.experiment)
    model.eval()
    with torch.no_grad():  # a trained-looking adapter: B ≠ 0, so A's gradients are not 0 either
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    data = load_split(run.auditor.data, run.experiment, "auditor", resolve_image_size(run.experiment.model))
    x = model.prepare(data["auditor_train"].inputs[:5])
    params = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n or n.startswith("head.")}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    coef = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5])

    def loss(prm, xi, ci):
        return ci * torch.softmax(functional_call(model, {**frozen, **prm}, (xi.unsqueeze(0),)), -1)[0, 1]

    per = P.per_example_grads(loss, params, x, coef)
    named = dict(model.named_parameters())
    for i in range(5):
        for p in model.parameters():
            p.grad = None
        (coef[i] * torch.softmax(model(x[i:i + 1]), -1)[0, 1]).backward()
        for n in params:
            want = named[n].grad if named[n].grad is not None else torch.zeros_like(named[n])
            assert torch.allclose(per[n][i], want, atol=1e-6), n
    # no silently zero updates: every LoRA matrix gets a gradient
    assert all(per[n].abs().sum() > 0 for n in params if "lora_" in n)


@pytest.mark.parametrize("statistic", ["demographic_parity", "equal_opportunity", "equalized_odds",
                                       "accuracy_equality"])
def test_cell_statistics_reproduce_fairret(statistic):
    """NormLoss on per-(group, label) sums equals fairret's on the examples; the linearised
    weights give fairret's gradient (Σ_i w_c(i) ∇p_i = ∇L)."""
    g = torch.Generator().manual_seed(1)
    n_groups, b = 3, 90
    s = torch.randint(0, n_groups, (b,), generator=g)
    y = torch.randint(0, 2, (b,), generator=g)
    p = torch.rand(b, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = fairness_violation(p.float(), s, y, n_groups, statistic)
    cells = s * 2 + y
    n = torch.bincount(cells, minlength=2 * n_groups).double()
    S = torch.bincount(cells, weights=p.detach(), minlength=2 * n_groups)
    assert float(P.cell_violation(S, n, statistic)) == pytest.approx(float(ref.detach()), rel=1e-5)
    w, L = P.cell_weights(n, S, statistic)
    assert L == pytest.approx(float(ref.detach()), rel=1e-5)
    (grad_ref,) = torch.autograd.grad(fairness_violation(p, s, y, n_groups, statistic), p)
    assert torch.allclose(w[cells], grad_ref, atol=1e-8)


@pytest.mark.parametrize("groups", [2, 5])
def test_penalty_dead_zone_is_where_the_signal_stops(groups):
    """dead_zone(σ, B, G) is where the DP penalty's linearised term stops: a group gap well inside
    it gives cell_weights no gradient, one well outside does. It is 3 × the delta-method sd that
    cell_violation uses, which leaves out the overall rate's share of the group's own noise; a
    simulation of the penalty's noisy statistics (noise sd 2σ on each, 3,000 draws) finds the
    ratio's true sd at √(1 − 1/G) of it, within 10 %."""
    import math

    from fairsplit.auditor.methods.penalty import dead_zone

    sigma, batch = 2.0, 400 * groups // 2
    s = torch.arange(batch) % groups
    y = (torch.arange(batch) // groups) % 2
    p = torch.full((batch,), 0.5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(3000):
        n, S = P.noisy_cell_stats(p, s, y, groups, sigma * math.sqrt(2), g)  # sd 2σ, as the penalty's
        n2, S2 = n.reshape(groups, 2), S.reshape(groups, 2)
        ratios.append(float((S2[0, 1] / n2[0, 1]) / (S2[:, 1].sum() / n2[:, 1].sum())))
    zone = dead_zone(sigma, batch, groups)
    assert float(torch.tensor(ratios).std()) == pytest.approx(zone / 3 * math.sqrt(1 - 1 / groups), rel=0.1)
    with pytest.raises(ValueError):
        dead_zone(sigma, 0, groups)
    sigma = 0.5
    zone = dead_zone(sigma, batch, groups)
    for factor, moves in ((0.5, False), (1.5, True)):
        x = factor * zone  # group 0's label-1 rate a, the others' 1/2: r_0 = a / overall = 1 + x
        a = (1 + x) * (groups - 1) / (2 * (groups - 1 - x))
        n = torch.full((2 * groups,), batch / (2 * groups), dtype=torch.float64)
        S = n * 0.5
        S[1] = n[1] * a
        assert float((S[1] / n[1]) / (S[1::2].sum() / n[1::2].sum())) == pytest.approx(1 + x)
        w, _ = P.cell_weights(n, S, "equalized_odds", noise_sd=2 * sigma)
        assert bool(w.abs().sum() > 0) == moves, factor


# -- the ledger ------------------------------------------------------------------------------------


def test_ledger_composition_equals_dp_accounting(tmp_path):
    """Per-part RDP composition, max over the disjoint parts; merged events; persisted atomically."""
    delta = 1e-5
    ledger = P.Ledger(delta, budget=50.0, path=tmp_path / "ledger.json")
    train = [{"fingerprint": "f", "part": "auditor_train", "kind": "sampled", "sigma": 1.1, "q": 0.05, "count": 100}]
    val = [{"fingerprint": "f", "part": "auditor_val", "kind": "gaussian", "sigma": 5.0, "q": None, "count": 7}]
    ledger.record(train + val)
    ledger.record(train)  # same event again: merged to count 200
    assert len(ledger.events) == 2
    acc = RdpAccountant(list(P.RDP_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 200)
    eps_train = acc.get_epsilon(delta)
    acc = RdpAccountant(list(P.RDP_ORDERS))
    acc.compose(dp_accounting.GaussianDpEvent(5.0), 7)
    eps_val = acc.get_epsilon(delta)
    assert ledger.epsilon() == pytest.approx(max(eps_train, eps_val))
    assert P.Ledger(delta, 50.0, tmp_path / "ledger.json").epsilon() == pytest.approx(ledger.epsilon())
    with pytest.raises(P.BudgetExceeded, match="epsilon_budget = 1 .*spent"):
        P.Ledger(delta, 1.0, tmp_path / "ledger.json").check(val, "a request")


def test_calibration_hits_the_target():
    """calibrate_sigma finds the σ whose events spend the target ε (to 0.1 %)."""
    def events(sigma):
        return [{"part": "auditor_val", "kind": "gaussian", "sigma": sigma, "q": None, "count": 6}]
    sigma = P.calibrate_sigma(events, 2.0, 1e-5)
    assert P.epsilon(events(sigma), 1e-5) <= 2.0
    assert P.epsilon(events(sigma * 0.99), 1e-5) > 2.0


# -- the service under DP --------------------------------------------------------------------------


def _request(service: AuditorService, round_: int, split: str, want: str, scale: float = 1.0):
    model = service.model
    adapter = {k: v * scale for k, v in adapter_state(model).items()}
    head = head_state(model)
    plan = request_plan(service.exp.method)
    req = RoundRequest(round=round_, split=split, want=want, method=service.exp.method.name,
                       stage=plan.stage[want], fingerprint=service.fingerprint, protocol=PROTOCOL_VERSION)
    from fairsplit.protocol.policy import sends_head

    content = make_request(adapter, head if sends_head(req) else None, req,
                           adapter_spec=state_spec(adapter_state(model)), head_spec=state_spec(head))
    return req, message_type_for(req), content


def test_every_request_answered_once_in_plan_order(tmp_path):
    """A re-sent request gets the cached reply whatever adapter it carries; skipping back, or a
    request outside the plan, is refused; the reply carries ε."""
    run = tiny_run("erm", rounds=2)
    cfg = run.auditor.model_copy(update={"state_dir": tmp_path})
    service = AuditorService(run.experiment, cfg)
    assert planned_requests(run.experiment) == [(1, "val", "none"), (2, "val", "none"), (2, "test", "none")]
    req, mt, content = _request(service, 1, "val", "none")
    first = service.handle(mt, content)
    _, _, crafted = _request(service, 1, "val", "none", scale=-3.0)
    again = service.handle(mt, crafted)
    assert first["report"]["json"] == again["report"]["json"]
    rep = parse_reply(first, req, state_spec(adapter_state(service.model)),
                      head_spec=state_spec(head_state(service.model)))
    assert rep.privacy["dp"] and 0 < rep.privacy["epsilon_run"] <= run.auditor.privacy.target_epsilon + 1e-6
    _, mt, content = _request(service, 2, "test", "none")
    service.handle(mt, content)
    _, mt, content = _request(service, 2, "val", "none")
    with pytest.raises(P.OutOfPlan, match="after a later request"):
        service.handle(mt, content)
    _, mt, content = _request(service, 5, "test", "none")
    with pytest.raises(P.OutOfPlan, match="not in this experiment's plan"):
        service.handle(mt, content)
    # a restarted auditor (same state_dir) still answers the test part only once, identically
    restarted = AuditorService(run.experiment, cfg)
    _, mt, content = _request(restarted, 2, "test", "none", scale=2.0)
    assert restarted.handle(mt, content)["report"]["json"] == service.handle(mt, content)["report"]["json"]


def test_budget_and_run_limit_survive_a_restart(tmp_path):
    """The ledger and the run count persist in state_dir; over budget and over max_runs refuse
    with public reasons naming the budget, what is spent and the cap."""
    run = tiny_run("erm", rounds=1)
    privacy = run.auditor.privacy.model_copy(update={"target_epsilon": 3.0, "epsilon_budget": 4.0,
                                                     "report_epsilon_fraction": 1.0})
    cfg = run.auditor.model_copy(update={"state_dir": tmp_path, "privacy": privacy, "max_runs": 3})
    s1 = AuditorService(run.experiment, cfg)
    _, mt, content = _request(s1, 1, "val", "none")
    s1.handle(mt, content)
    spent = s1.gate.ledger.epsilon()
    assert spent == pytest.approx(3.0, abs=0.01)
    exp2 = run.experiment.model_copy(update={"seed": 7})
    s2 = AuditorService(exp2, cfg)  # a restart with a second experiment
    assert s2.gate.ledger.epsilon() == pytest.approx(spent)
    _, mt, content = _request(s2, 1, "val", "none")
    with pytest.raises(P.BudgetExceeded) as err:
        s2.handle(mt, content)
    text = public_error_text(err.value)
    assert text.startswith("E_BUDGET:") and "epsilon_budget = 4" in text and "spent 3.0" in text
    loose = cfg.model_copy(update={"privacy": privacy.model_copy(update={"epsilon_budget": 100.0}),
                                   "max_runs": 1})
    s3 = AuditorService(exp2, loose)
    _, mt, content = _request(s3, 1, "val", "none")
    with pytest.raises(P.RunLimitExceeded, match="max_runs = 1"):
        s3.handle(mt, content)


def test_report_parts_spend_their_fraction_and_have_their_own_cap(tmp_path):
    """A run spends ``report_epsilon_fraction`` of its ε on each report part, and the ledger caps
    each report part at ``epsilon_budget × report_epsilon_fraction``: report-only runs (the
    statistical-query attacker's) run out where training runs would, not later."""
    run = tiny_run("erm", rounds=1)
    privacy = run.auditor.privacy.model_copy(update={"target_epsilon": 1.0, "epsilon_budget": 4.0,
                                                     "report_epsilon_fraction": 0.25})
    cfg = run.auditor.model_copy(update={"state_dir": tmp_path, "privacy": privacy})
    service = AuditorService(run.experiment, cfg)
    _, mt, content = _request(service, 1, "val", "none")
    service.handle(mt, content)
    assert service.gate.ledger.epsilon() == pytest.approx(0.25, abs=0.01)
    noise = service.gate.noise
    assert noise.val == pytest.approx(P.calibrate_sigma(
        lambda s: P.dp_event("auditor_val", "gaussian", s, None, 1), 0.25, privacy.delta), rel=1e-4)
    ledger = P.Ledger(1e-5, 4.0, tmp_path / "other.json", report_fraction=0.25)
    train = P.dp_event("auditor_train", "gaussian", 3.0, None, 4)
    assert P.epsilon(train, 1e-5) < 4.0
    ledger.check(train, "training")  # under the training part's cap of 4
    reports = P.dp_event("auditor_test", "gaussian", 4.0, None, 4)
    assert 1.0 < P.epsilon(reports, 1e-5) < 4.0
    with pytest.raises(P.BudgetExceeded, match="auditor_test.*= 1"):
        ledger.check(reports, "reports")
    P.Ledger(1e-5, 4.0, tmp_path / "third.json", report_fraction=1.0).check(reports, "reports")
    # a method's own evaluations on val (α: only the choice leaves) count against the part's
    # whole budget, not its reports' cap
    own = P.dp_event("auditor_val", "gaussian", 4.0, None, 4, P.SELECT)
    assert not P.is_report(own[0]) and P.is_report(P.dp_event("auditor_val", "gaussian", 4.0, None, 1)[0])
    ledger.check(own, "the method's evaluations")
    with pytest.raises(P.BudgetExceeded, match="epsilon_budget = 4"):
        ledger.check(P.dp_event("auditor_val", "gaussian", 1.5, None, 4, P.SELECT), "too many evaluations")


@pytest.mark.parametrize("method", ["erm", "penalty", "last_layer", "adversarial", "entropy", "orthogonality",
                                    "fairnet_local", "fairnet"])
def test_a_run_spends_exactly_its_plan(method, tmp_path):
    """A run under the default DP (the co-located channel): the auditor answers exactly the
    planned requests, the ledger is charged the plan, its mechanisms spend exactly the planned
    events, each part spends its target ε; ε is in results.json."""
    from fairsplit.deploy.colocated import DirectChannel
    from fairsplit.developer.loop import run_experiment

    run = tiny_run(method, rounds=3)
    if method == "last_layer":
        exp = run.experiment.model_copy(update={"method": run.experiment.method.model_copy(
            update={"dp_alphas": [0.0, 1.0], "dp_refit_steps": 5})})
        run = run.model_copy(update={"experiment": exp})
    service = AuditorService(run.experiment, run.auditor.model_copy(update={"state_dir": tmp_path / "auditor"}))
    res = run_experiment(run.experiment, run.developer, DirectChannel(service), tmp_path / "out",
                         transport="colocated")
    assert service.gate.answered_keys() == sorted(planned_requests(run.experiment))

    def total(events):
        out: dict = {}
        for e in events:
            k = (e["part"], e["kind"], round(e["sigma"], 9), e["q"], e.get("use"))
            out[k] = out.get(k, 0) + e["count"]
        return out

    planned = service.gate.planned_events()
    assert total(service.gate.ledger.events) == total(planned)  # charged
    assert total(service.gate.spent) == total(planned)  # what the mechanisms recorded
    pc = run.auditor.privacy  # each part spends its target: ε on train, the fraction of it on reports
    spent_parts = {e["part"] for e in planned}
    events = service.gate.ledger.events
    per_part = P.part_epsilon(events, pc.delta)
    reports = P.part_epsilon([e for e in events if P.is_report(e)], pc.delta)
    expected = {}
    for part in spent_parts:
        own = [e for e in events if e["part"] == part and not P.is_report(e) and part != "auditor_train"]
        # the part's reports spend their target; the method's own val evaluations the rest of ε
        expected[part] = pc.target_epsilon if own else pc.part_target(part)
        assert per_part[part] == pytest.approx(expected[part], rel=2e-3)
        if part != "auditor_train":
            assert reports[part] == pytest.approx(pc.part_target(part), rel=2e-3)
    assert res["privacy"]["epsilon_run"] == pytest.approx(max(expected.values()), rel=2e-3)
    assert res["privacy"]["epsilon_total"] == pytest.approx(res["privacy"]["epsilon_run"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["privacy"]["dp"] is True


def test_a_private_refit_chooses_among_a_bounded_grid():
    """The α choice is the one outcome of last_layer's own validation evaluations that leaves: a
    grid longer than MAX_DP_CANDIDATES (with the incoming head) is refused under DP."""
    from fairsplit.auditor.methods.last_layer import MAX_DP_CANDIDATES, LastLayer
    from fairsplit.protocol.methods import method_spec

    exp = tiny_run("last_layer", rounds=2).experiment
    noise = P.RunNoise(1.0, 4.0, 4.0, 2.0)
    ok = method_spec("last_layer").config(name="last_layer", dp_alphas=[0.1 * i for i in range(MAX_DP_CANDIDATES - 1)])
    assert sum(e["count"] for e in LastLayer.dp_events(ok, exp, 100, noise) if e.get("use") == P.SELECT) == MAX_DP_CANDIDATES
    wide = method_spec("last_layer").config(name="last_layer", dp_alphas=[0.1 * i for i in range(MAX_DP_CANDIDATES)])
    with pytest.raises(P.NotPrivate, match="at most"):
        LastLayer.dp_events(wide, exp, 100, noise)


def test_non_private_methods_are_refused_under_dp(tmp_path):
    run = tiny_run("unlearning", rounds=2, private=True)
    service = AuditorService(run.experiment, run.auditor.model_copy(update={"state_dir": tmp_path / "a"}))
    _, mt, content = _request(service, 0, "none", "unlearning_update")
    with pytest.raises(P.NotPrivate):
        service.handle(mt, content)
    small = tiny_run("penalty", rounds=2)
    exp = small.experiment.model_copy(update={"method": small.experiment.method.model_copy(
        update={"auditor_batch_size": 8})})
    service = AuditorService(exp, small.auditor.model_copy(update={"state_dir": tmp_path / "b"}))
    _, mt, content = _request(service, 0, "none", "signal")
    with pytest.raises(P.NotPrivate, match="min_batch_size"):
        service.handle(mt, content)


# -- errors ----------------------------------------------------------------------------------------


def test_error_replies_carry_no_data_dependent_text():
    """Fuzz: whatever an exception's message holds (file names, values), only the fixed text of
    its class crosses; PublicRefusal texts are the only ones passed through."""
    from fairsplit.protocol.codec import PayloadError
    from fairsplit.protocol.data import DataError
    from fairsplit.protocol.metrics import SmallGroupError

    rng = np.random.default_rng(0)
    secrets = ["25_1_3_20170109150557335.jpg", "y_score contains NaN", "group 'Asian' n=7", "0.8731"]
    for cls in (PayloadError, DataError, SmallGroupError, ValueError, RuntimeError, KeyError,
                FileNotFoundError, P.NotPrivate, ZeroDivisionError):
        for _ in range(5):
            secret = secrets[rng.integers(len(secrets))] + str(rng.random())
            text = public_error_text(cls(secret))
            assert secret not in text and not any(c.isdigit() for c in text.split(":", 1)[1])
            assert text.split(":")[0] in {c for c, _ in ERROR_CODES.values()} | {"E_INTERNAL"}
    assert public_error_text(P.BudgetExceeded("budget 4")) == "E_BUDGET: budget 4"
    assert issubclass(P.OutOfPlan, PublicRefusal)


def test_nan_scores_under_dp_are_no_error(tmp_path):
    """A head that makes every score NaN gets an ordinary (noisy) report, not an error."""
    run = tiny_run("erm", rounds=1)
    service = AuditorService(run.experiment, run.auditor.model_copy(update={"state_dir": tmp_path}))
    model = service.model
    head = {k: torch.full_like(v, 1e38) for k, v in head_state(model).items()}
    head["weight"][0] = -1e38
    req = RoundRequest(round=1, split="val", want="none", method="erm", fingerprint=service.fingerprint,
                       protocol=PROTOCOL_VERSION)
    content = make_request(adapter_state(model), head, req)
    # the head really makes scores NaN: the exact path refuses to report over them
    exact = AuditorService(run.experiment, run.auditor.model_copy(update={
        "privacy": run.auditor.privacy.model_copy(update={"enabled": False})}))
    with pytest.raises(ValueError, match="NaN"):
        exact.handle("evaluate", content)
    reply = service.handle("evaluate", content)
    assert "report" in reply


def test_the_guess_bound_is_the_hypothesis_testing_bound():
    """(e^ε + δ)/(1 + e^ε): a coin flip at ε = 0, 73 % at ε = 1, rising with ε and δ; and the
    sentence shown to users carries the membership and the group (2ε) bounds."""
    from fairsplit.protocol.privacy import epsilon_meaning, guess_bound

    assert guess_bound(0.0, 0.0) == pytest.approx(0.5)
    assert guess_bound(1.0, 1e-5) == pytest.approx((math.e + 1e-5) / (1 + math.e))
    assert guess_bound(0.5, 1e-5) < guess_bound(1.0, 1e-5) < guess_bound(2.0, 1e-5) < guess_bound(2.0, 1e-3)
    assert guess_bound(1e4, 0.0) == 1.0
    with pytest.raises(ValueError, match="epsilon >= 0"):
        guess_bound(-1.0, 1e-5)
    text = epsilon_meaning(1.0, 1e-5)
    assert "at most 73 %" in text and "at most 88 %" in text and "coin flip is right 50 %" in text
