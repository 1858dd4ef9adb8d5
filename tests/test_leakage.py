"""Each attack family of ``bench/leakage.py`` on the tiny synthetic experiment: it works against
exact releases (so the test can fail) and is defeated at the default privacy settings.

Every release draws fresh noise (the ledger's per-release nonce keys it with the auditor's
secret), so a figure under DP is a random draw: the tests compare means over several runs of an
attack with bounds that allow for their spread (:func:`chance_auc`), and say how many runs.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def leakage():
    spec = importlib.util.spec_from_file_location("_bench_leakage", REPO / "bench" / "leakage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def references(leakage):
    with tempfile.TemporaryDirectory() as tmp:
        return leakage.references(leakage.Attacker(leakage.synthetic_run(), False, Path(tmp)))


def test_the_synthetic_inputs_carry_s_but_not_visibly(references):
    """The setting is meaningful: s is predictable from W0's features with labels, barely without."""
    assert references["probe_auc"] > 0.7
    assert references["pca_auc"] < 0.6


def test_report_differencing_targets_no_better_than_chance(leakage):
    """A crafted head selecting one known person per report, each report a run's whole test ε:
    exact counts name its s; at the default (ε = 1 per run, budget 6.5) noisy counts and the
    budget leave chance, ≤ 0.6 over 60 targets (the issue's bound)."""
    exact = leakage.run_attack("report_differencing", private=False)
    dp = leakage.run_attack("report_differencing", private=True)
    assert exact["queries"] == dp["queries"] == 60
    assert exact["value"] >= 0.7
    # ≤ 0.6 is the measured bound (bench/leakage.py); the test allows chance's spread
    # over 60 targets (P(≥ 40 of 60 right | chance) < 0.01), as the auditor's noise is fresh.
    assert dp["value"] <= 40 / 60


def test_statistical_queries_every_round_defeated(leakage, references):
    """Random-half heads with a report after every round of one run: the exact rates rebuild s
    over the validation part; at the default the mean AUC over 5 of the auditor's secrets is no
    better than the attacker's own unsupervised look (+ 0.02), or 0.55."""
    exact = leakage.run_attack("report_sq_rounds", private=False)
    assert exact["value"] > 0.7
    dp = [leakage.run_attack("report_sq_rounds", private=True)["value"] for _ in range(5)]
    assert float(np.mean(dp)) <= max(chance_auc(80, 80, 5), references["pca_auc"] + 0.02)


def test_report_statistical_queries_defeated(leakage):
    """Random-half heads mixed with the honest head's direction (``report_sq_offset``, the
    strongest report attack: it makes the released gap's magnitude linear again), one report per
    run: the exact rates rebuild s over the test part (160 people); at the default the mean AUC
    over 5 runs of the attack is within chance's spread."""
    exact = leakage.run_attack("report_sq_offset", private=False)
    assert exact["value"] > 0.7
    dp = [leakage.run_attack("report_sq_offset", private=True)["value"] for _ in range(5)]
    assert float(np.mean(dp)) <= chance_auc(80, 80, 5)


def test_error_channel_is_closed(leakage):
    """Exact: "is any auditor example NaN under this head" answered by the error; DP: never an
    error (non-finite scores count as negative), so chance."""
    exact = leakage.run_attack("error_channel", private=False)
    dp = leakage.run_attack("error_channel", private=True)
    assert exact["value"] == 1.0 and exact["distinct_replies"] == 2
    assert dp["value"] <= 0.7


def test_unlearning_update_is_refused_under_dp(leakage):
    """ΔW_s has no private form: refused at the default, so its PCA attack learns nothing."""
    exact = leakage.run_attack("update_pca", private=False)
    dp = leakage.run_attack("update_pca", private=True)
    assert exact["value"] > dp["value"] == 0.5


def test_orthogonality_signal_reveals_A_s_which_tells_no_more_than_no_release(leakage, references):
    """Crafted unit-row adapters read A_sᵀA_s out of one run's orthogonality signals, exactly
    (the release is a deterministic function of A_s; under DP of a DP-trained A_s); with A_s's
    public initialisation that resolves A_s itself. What training on s wrote into it then scores
    s no better than a direction that carries no release, exact or private (one draw each)."""
    exact = leakage.run_attack("orthogonality_recovery", private=False)
    dp = leakage.run_attack("orthogonality_recovery", private=True)
    assert exact["gram_error"] < 1e-4 and dp["gram_error"] < 1e-4
    assert exact["queries"] == dp["queries"] > 1
    bound = no_release_bound(references, 1)
    assert exact["value"] <= bound and dp["value"] <= bound


def test_per_example_decoding_of_the_adversarial_signal_defeated(leakage):
    """A crafted adapter and the signal's known structure (g = Σ_i c_i J_iᵀ u, c_i's sign = s_i)
    decode every example of the exact batch; at the default (Poisson sample from the auditor's
    secret, clipped per-example terms, noise) the mean AUC over 3 draws is within chance's spread."""
    exact = leakage.run_attack("gradient_decoding", private=False)
    assert exact["value"] >= 0.95
    dp = [leakage.run_attack("gradient_decoding", private=True) for _ in range(3)]
    assert float(np.mean([r["value"] for r in dp])) <= chance_auc(dp[0]["n_pos"], dp[0]["n_neg"], 3)


@pytest.mark.parametrize("attack", ["signal_direction", "head_delta"])
def test_direction_attacks_with_crafted_heads_defeated(leakage, attack, references):
    """A zero head (every score 0.5) turns a noisy fairness term into pure group-direction
    queries; gaps within the statistics' noise give no gradient, so what comes back is noise
    (and, for the refit, the task direction): a direction no better than the attacker's own
    unsupervised look at the inputs, or a random direction on features that carry s."""
    assert _mean_auc(leakage, attack) <= no_release_bound(references, DRAWS)


def test_penalty_signal_with_an_honest_head_no_better_than_an_unsupervised_look(leakage, references):
    """With the honest head a real gap exists and the fair gradient must move along the groups'
    difference: a population-level direction DP does not hide (docs/privacy.md). At the
    default it tells no more than a direction that carries no release."""
    assert _mean_auc(leakage, "signal_direction_honest") <= no_release_bound(references, DRAWS)


def test_refit_with_an_honest_head_no_better_than_the_final_model_implies(leakage):
    """The honest refit's change h_new − h_sent is the fair head's own s-direction; the final
    model alone implies one too (the task loss's gradient at the released head on the
    developer's data). The issue's population-level bound: the change tells no more than the
    final model + 0.02 AUC.

    Both AUCs are random under DP (fresh noise per release): on this config 40 draws gave a
    per-draw difference of 0.006 ± 0.040, so a mean of 8 draws against a flat + 0.02 failed by
    chance about one run in four. The test holds the mean paired difference over 24 draws to
    0.02 plus 3.3 standard errors (exceeded with probability < 0.001 by a release meeting the
    bound). Exact releases differ by 0.064 on every draw: the test can fail."""
    exact = leakage.run_attack("head_delta_honest", private=False)
    assert exact["value"] - exact["final_model"] > 0.04
    rows = [leakage.run_attack("head_delta_honest", private=True) for _ in range(24)]
    assert all(0.5 <= r["final_model"] <= 1.0 for r in rows)
    diff = np.array([r["value"] - r["final_model"] for r in rows])
    assert diff.mean() <= 0.02 + 3.3 * diff.std(ddof=1) / math.sqrt(len(diff))


DRAWS = 4


def _mean_auc(leakage, attack: str, draws: int = DRAWS) -> float:
    """The attack's AUC under the default DP, averaged over ``draws`` runs of it. Every release
    draws fresh noise (the ledger's per-release nonce), so one run is one random draw: on this
    config single draws spread over 0.50–0.65 (signal_direction, 10 runs: mean 0.554), as
    random directions do (500 of them: 0.550 ± 0.033)."""
    return float(np.mean([leakage.run_attack(attack, private=True)["value"] for _ in range(draws)]))


def no_release_bound(references: dict, draws: int, z: float = 3.3) -> float:
    """What a direction that carries no release reaches, as a bound on the mean of ``draws``
    attack AUCs: the larger of the attacker's own PCA direction (+ 0.02) and the mean AUC of
    isotropic random directions plus ``z`` standard errors (z = 3.3: exceeded with probability
    < 0.001 by a direction that is noise)."""
    random_bound = references["random_auc_mean"] + z * references["random_auc_sd"] / math.sqrt(draws)
    return max(references["pca_auc"] + 0.02, random_bound)


def chance_auc(n_pos: int, n_neg: int, draws: int, z: float = 3.3) -> float:
    """An upper bound on the mean of ``draws`` sign-agnostic AUCs, max(AUC, 1 − AUC), of scores
    that carry no information, on ``n_pos`` + ``n_neg`` examples: AUC ≈ 0.5 + sd·Z with
    sd = √((n + 1)/(12·n_pos·n_neg)) (Hanley & McNeil 1982), so max(AUC, 1 − AUC) = 0.5 + sd·|Z|
    with E|Z| = 0.798 and sd(|Z|) = 0.603; ``z`` sds of the mean above (z = 3.3: exceeded with
    probability < 0.001 by chance)."""
    sd = math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))
    return 0.5 + sd * (0.798 + z * 0.603 / math.sqrt(draws))
