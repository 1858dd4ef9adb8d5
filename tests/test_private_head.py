"""last_layer's private refit from noisy sufficient statistics (auditor/methods/private_head.py):
the statistics' sensitivity, the noise, the closed form against an iterative fit of the same
objective, what a large α removes, and one release for the whole α grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairsplit.auditor import methods as M
from fairsplit.auditor import privacy as P
from fairsplit.auditor.methods import private_head as H
from fairsplit.protocol.model import build_model
from flower_helpers import tiny_run


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(2, 4), st.integers(1, 6), st.floats(0.1, 10.0), st.integers(0, 10_000),
       st.booleans())
def test_one_example_moves_the_statistics_by_at_most_the_bound(n, groups, dim, bound, seed, at_bound):
    """Add/remove one: counts move by 1 in one cell (L2 1), sums by at most C (L2), also for an
    example far outside the bound or exactly on it."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, dim, generator=g, dtype=torch.float64) * 5
    y = torch.randint(0, 2, (n,), generator=g)
    s = torch.randint(0, groups, (n,), generator=g)
    extra = torch.randn(1, dim, generator=g, dtype=torch.float64)
    extra = extra / extra.norm() * (bound if at_bound else 100 * bound)
    a = H.cell_stats(feats, y, s, groups, bound)
    b = H.cell_stats(torch.cat([feats, extra]), torch.cat([y, y[:1]]), torch.cat([s, s[:1]]), groups, bound)
    assert float((b.n - a.n).norm()) == pytest.approx(1.0)
    assert float((b.S - a.S).norm()) <= bound * (1 + 1e-9)


def test_the_noise_has_the_stated_sigma():
    zero = H.CellStats(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, 400, dtype=torch.float64), 2.5)
    noisy = H.noisy_cell_stats(zero, 1.7, torch.Generator().manual_seed(0))
    assert float(noisy.S.std()) == pytest.approx(1.7 * 2.5, rel=0.03)
    counts = torch.cat([H.noisy_cell_stats(zero, 1.7, torch.Generator().manual_seed(i)).n.flatten()
                        for i in range(400)])
    assert float(counts.std()) == pytest.approx(1.7, rel=0.05)


@pytest.mark.parametrize("constraint", ["EO", "DI"])
@pytest.mark.parametrize("alpha", [0.5, 3.0, 100.0])
def test_closed_form_equals_the_iterative_fit_of_the_same_objective(constraint, alpha):
    """(I + αQ/trQ)⁻¹w₀ minimises ‖w − w₀‖² + (α/trQ)Σ(w·d)²: L-BFGS on that objective from w₀
    reaches the same w (to 1e-6 relative: the objective is strongly convex, condition ≤ 1 + α)."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(300, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (300,), generator=g)
    s = torch.randint(0, 3, (300,), generator=g)
    feats[s == 1] += 0.8
    stats = H.cell_stats(feats, y, s, 3, bound=10.0)
    w0 = torch.randn(8, generator=g, dtype=torch.float64)
    w, b = H.fair_projection(w0, 0.3, stats, constraint, alpha)
    ds, mean = H._differences(stats, constraint)
    Q = sum(torch.outer(d, d) for d in ds)
    v = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((v - w0) ** 2).sum() + alpha / torch.trace(Q) * sum((v @ d) ** 2 for d in ds)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(w, v.detach(), rtol=1e-6, atol=1e-9)
    assert b == pytest.approx(0.3 + float((w0 - w) @ mean))  # the mean logit is kept


def test_a_large_alpha_removes_the_mean_score_differences():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(400, 6, generator=g, dtype=torch.float64)
    s = torch.randint(0, 2, (400,), generator=g)
    y = torch.randint(0, 2, (400,), generator=g)
    feats[:, 0] += 2.0 * s  # a group direction the incoming head leans on
    w0 = torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0, 0.2], dtype=torch.float64)
    stats = H.cell_stats(feats, y, s, 2, bound=100.0)
    w, _ = H.fair_projection(w0, 0.0, stats, "DI", 1e8)
    for grp in range(2):
        mg = feats[s == grp].mean(0)
        assert abs(float(w @ (mg - feats.mean(0)))) < 1e-4
    assert float((w0 @ (feats[s == 1].mean(0) - feats[s == 0].mean(0))).abs()) > 1.0


def test_the_feature_bound_holds_for_the_model_features():
    run = tiny_run("erm")
    model = build_model(run.experiment)
    model.eval()
    x = torch.randn(16, 3, 32, 32) * 3
    with torch.no_grad():
        f = model.features(x)
    bound = H.feature_bound(model.backbone, f.shape[1])
    assert bound is not None and float(f.norm(dim=1).max()) <= bound + 1e-4


def test_one_release_for_the_whole_alpha_grid():
    """The plan charges two train-part Gaussian releases (counts, sums) whatever the grid, and
    one validation report per α > 0 plus the incoming head's."""
    run = tiny_run("last_layer", rounds=2)
    noise = P.RunNoise(3.0, 4.0, 5.0)

    def events(alphas):
        exp = run.experiment.model_copy(update={"method": run.experiment.method.model_copy(
            update={"dp_refit": "stats", "dp_stats_alphas": alphas})})
        return P.run_events(exp, 500, noise, M.dp_events)

    short, long_ = events([0.0, 1.0]), events([0.0, 1.0, 3.0, 10.0, 100.0, 1e4])
    train = [e for e in long_ if e["part"] == "auditor_train"]
    assert train == [e for e in short if e["part"] == "auditor_train"]
    assert sum(e["count"] for e in train) == 2 and all(e["kind"] == "gaussian" for e in train)
    val = lambda ev: sum(e["count"] for e in ev if e["part"] == "auditor_val")  # noqa: E731
    assert val(long_) - val(short) == 4
    assert math.isclose(P.epsilon(train, 1e-5), P.epsilon(
        [{"part": "auditor_train", "kind": "gaussian", "sigma": 3.0, "q": None, "count": 2}], 1e-5))


def test_the_statistics_refit_serves_a_fairer_head_under_dp(tmp_path):
    """Co-located under the default DP on the tiny config: the released head is the incoming one
    (α = 0, no change) or a projection of it with less mean-score disparity at the noisy
    statistics (objective < 1, the head moved); a tiny run carries no more than that."""
    from fairsplit.deploy.colocated import run_colocated

    run = tiny_run("last_layer", rounds=2)
    run = run.model_copy(update={"experiment": run.experiment.model_copy(update={
        "method": run.experiment.method.model_copy(update={"dp_refit": "stats"})})})
    res = run_colocated(run, tmp_path / "out")
    final = res["final"]
    assert res["privacy"]["dp"] and final["lam"] in [0.0, *run.experiment.method.dp_stats_alphas]
    if final["lam"] == 0:
        assert final["objective"] == 1.0 and final["signal_norm"] == 0.0
    else:
        assert final["objective"] < 1.0 and final["signal_norm"] > 0.0
    assert np.isfinite(res["metrics"]["accuracy"])


def test_private_refit_bench_runs_and_reports_exact_metrics(tmp_path):
    """bench/private_refit.py on the tiny config: one seed at ε = 8, rows in the results form."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "_private_refit", Path(__file__).resolve().parents[1] / "bench" / "private_refit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.measure(tiny_run("erm"), 1, [8.0], ["stats"])
    assert [r["method"] for r in rows] == ["erm", "last_layer (stats)"]
    assert all(0.0 <= r["accuracy"]["mean"] <= 1.0 for r in rows)
    assert rows[0]["seeds"][0]["chosen"] is None and rows[1]["seeds"][0]["chosen"] is not None
    bench.append_results(tmp_path / "r.json", bench.result_rows(rows, "tiny"))
    bench.append_results(tmp_path / "r.json", bench.result_rows(rows, "tiny"))  # replaced, not doubled
    import json

    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved) == 2 and set(saved[0]) == {"dataset", "epsilon", "method", "seeds", "accuracy",
                                                 "demographic_parity_difference",
                                                 "equalized_odds_difference", "worst_group_accuracy"}


def _refit_case(seed: int = 0, n: int = 240, d: int = 12):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    s = torch.randint(0, 2, (n,), generator=g)
    y = ((feats[:, 0] + 0.8 * s + 0.3 * torch.randn(n, generator=g)) > 0.4).long()
    init = {"weight": torch.randn(2, d, generator=g) * 0.1, "bias": torch.zeros(2)}
    p0 = torch.softmax(feats @ init["weight"].T + init["bias"], -1)[:, 1]
    stats0 = P.noisy_cell_stats(p0, s, y, 2, 0.0, torch.Generator().manual_seed(1))
    return feats, y, s, init, stats0


def _dp_path(feats, y, s, init, stats0, basis, sigma=1.0, alpha=1.0):
    from fairsplit.auditor.methods.private_refit import dp_refit_head

    return dp_refit_head(feats, y, s, 2, init, "equalized_odds", alpha, 20, 0.05, 0.5, sigma, 5.0, stats0,
                         np.random.default_rng(3), torch.Generator().manual_seed(4), basis)[0]


def test_the_private_refit_moves_the_head_only_within_the_developers_basis():
    """With a refit basis U the head's change lies in span(U) (noise included) and the bias
    absorbs the centring; without one, or with U = I and μ = 0, it is DP-SGD on the whole head."""
    from fairsplit.auditor.methods.private_refit import refit_subspace

    feats, y, s, init, stats0 = _refit_case()
    d = feats.shape[1]
    U = torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(5)))[0]
    mu = feats.mean(0)
    head = _dp_path(feats, y, s, init, stats0, (U, mu))
    dw = head["weight"] - init["weight"]
    assert float(dw.norm()) > 1e-3  # it moved
    assert float((dw - dw @ U @ U.T).norm()) < 1e-5 * float(dw.norm()) + 1e-6  # only within span(U)
    full = _dp_path(feats, y, s, init, stats0, None)
    ident = _dp_path(feats, y, s, init, stats0, (torch.eye(d), torch.zeros(d)))
    for k in full:
        torch.testing.assert_close(full[k], ident[k], rtol=1e-4, atol=1e-5)
    assert float(((full["weight"] - init["weight"]) - (full["weight"] - init["weight"]) @ U @ U.T).norm()) > 1e-3
    # the auditor's use of a developer's basis: orthonormal columns, zero where it spans nothing new
    padded = torch.cat([U, torch.zeros(d, 2)], 1)  # an honest basis: kept as it is, principal axes included
    torch.testing.assert_close(refit_subspace({"basis": padded, "mean": mu}, d)[0], padded, atol=1e-5, rtol=0)
    crafted = torch.cat([100 * U[:, :1], U[:, :1], torch.zeros(d, 1), U[:, 1:]], 1)
    Q, m = refit_subspace({"basis": crafted, "mean": mu}, d)
    sv = torch.linalg.svdvals(Q)
    assert sorted(sv.round(decimals=4).tolist()) == [0.0, 0.0, 1.0, 1.0, 1.0]  # rank 3, never scaled
    assert torch.allclose(Q @ Q.T, U @ U.T, atol=1e-5)  # the same span
    with pytest.raises(ValueError, match="dimension"):
        refit_subspace({"basis": U[:-1], "mean": mu[:-1]}, d)
    with pytest.raises(ValueError, match="mean's norm"):
        refit_subspace({"basis": U, "mean": torch.full((d,), 3e37)}, d)


def test_the_developers_refit_basis_is_its_features_principal_directions():
    """The basis a head-refit request carries: orthonormal columns spanning the top principal
    directions of the developer's own training features at the current adapter."""
    from fairsplit.developer.trainer import DeveloperTrainer

    run = tiny_run()
    trainer = DeveloperTrainer(run.experiment, run.developer)
    rb = trainer.feature_basis(3)
    d = trainer.head()["weight"].shape[1]
    assert rb["basis"].shape == (d, 3) and rb["mean"].shape == (d,)
    assert torch.allclose(rb["basis"].T @ rb["basis"], torch.eye(3), atol=1e-4)
    feats = torch.cat([trainer.model.features(trainer.model.prepare(trainer.data.inputs[i:i + 64])).detach()
                       for i in range(0, len(trainer.data), 64)]).double()
    cov = torch.cov((feats - feats.mean(0)).T)
    top = torch.linalg.eigh(cov).eigenvectors[:, -3:].float()
    assert torch.allclose(rb["basis"] @ rb["basis"].T, top @ top.T, atol=1e-3)  # the same subspace
    with pytest.raises(ValueError, match="k = 0"):
        trainer.feature_basis(0)
