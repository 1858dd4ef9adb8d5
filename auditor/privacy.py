"""Differential privacy on everything the auditor releases: the one import point of its pieces.

Adjacency: add or remove one of the auditor's examples. The auditor's three parts (train, val,
test) are disjoint, so each has its own accountant and a release's ε is charged to the part it
reads (parallel composition: an individual's privacy loss is that of the part they are in).

Mechanisms (all Gaussian; ``docs/privacy.md``):

* **Reports** (:func:`noisy_counts`): per group, the confusion counts ``[tn, fp, fn, tp]`` of the
  evaluated part; each example is in one cell, so the L2 sensitivity is 1; N(0, σ²) is added to
  every count and every released rate is computed from the noisy counts
  (:func:`protocol.metrics.report_from_counts`). The same mechanism in spirit as RaCO-DP's noisy
  per-group histograms and Jagielski et al. 2019's private fairness statistics.
* **Gradients** (:func:`clipped_noisy_sum`): per-example gradients (``torch.func`` ``vmap`` /
  ``grad``, :func:`per_example_grads`) clipped to L2 norm C, summed, plus N(0, σ²C²) on every
  coordinate (DP-SGD, Abadi et al. 2016, Alg. 1), on a Poisson sample of rate q of the training
  part (privacy amplification by subsampling; Mironov, Talwar & Zhang 2019).
* **Fairness statistics** (:func:`noisy_cell_stats`): group fairness terms are not sums over
  examples, so a fairness gradient is made per-example by linearisation: the batch's per-(group,
  label) counts and sums of p are released with noise (L2 sensitivity √2), and the next step's
  per-example objective is w_{c(i)}·p_i with w = ∂L/∂S at those noisy statistics
  (:func:`cell_weights`). The statistics used at a step are the previous step's release, so each
  step's query is fixed before it runs and the step is one sampled Gaussian mechanism.

Accounting: Google's ``dp-accounting`` RDP accountant (Mironov 2017), one per part, composed over
every release of every run of the developer (:class:`Ledger`, persisted atomically).

The pieces, one module each: :mod:`auditor.mechanisms` (the Gaussian mechanisms),
:mod:`auditor.accounting` (a run's DP events, composition, calibration), :mod:`auditor.ledger`
(run registry and privacy ledger), :mod:`auditor.secret` (the auditor's randomness). This module
is their one import point (``run_events`` takes the method table's ``stage_events``:
:func:`auditor.methods.dp_events`).
"""

from __future__ import annotations

from .accounting import (
    PARTS,
    RDP_ORDERS,
    NotPrivate,
    SELECT,
    RunNoise,
    StageEvents,
    calibrate_sigma,
    dp_event,
    is_report,
    epsilon,
    part_epsilon,
    run_events,
)
from .ledger import BudgetExceeded, Ledger, OutOfPlan, RunLimitExceeded, RunRegistry
from .mechanisms import (
    cell_violation,
    cell_weights,
    clipped_noisy_sum,
    noisy_cell_stats,
    noisy_counts,
    per_example_grads,
    poisson_indices,
)
from .secret import AuditorSecret, NoRelease

__all__ = [
    "PARTS",
    "RDP_ORDERS",
    "AuditorSecret",
    "BudgetExceeded",
    "Ledger",
    "NoRelease",
    "NotPrivate",
    "OutOfPlan",
    "RunLimitExceeded",
    "RunRegistry",
    "SELECT",
    "RunNoise",
    "StageEvents",
    "calibrate_sigma",
    "cell_violation",
    "cell_weights",
    "clipped_noisy_sum",
    "dp_event",
    "is_report",
    "epsilon",
    "noisy_cell_stats",
    "noisy_counts",
    "part_epsilon",
    "per_example_grads",
    "poisson_indices",
    "run_events",
]
