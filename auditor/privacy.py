"""Differential privacy on everything the auditor releases: mechanisms, the ledger, the run plan.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import dp_accounting
import numpy as np
import torch
from dp_accounting.rdp import RdpAccountant

from fairsplit.protocol.fileio import FileLock, atomic_write_bytes
from fairsplit.protocol.methods import request_plan
from fairsplit.protocol.privacy import PublicRefusal, planned_requests

__all__ = [
    "PARTS",
    "AuditorSecret",
    "BudgetExceeded",
    "Ledger",
    "NoRelease",
    "NotPrivate",
    "OutOfPlan",
    "RunLimitExceeded",
    "RunRegistry",
    "RunNoise",
    "calibrate_sigma",
    "cell_violation",
    "cell_weights",
    "clipped_noisy_sum",
    "noisy_cell_stats",
    "noisy_counts",
    "per_example_grads",
    "poisson_indices",
    "run_events",
]

log = logging.getLogger(__name__)

PARTS = ("auditor_train", "auditor_val", "auditor_test")
#: RDP orders: integers (the fractional defaults below 2 often fail to converge for large q).
RDP_ORDERS = tuple(range(2, 257)) + (320, 384, 512, 768, 1024)
_LEDGER_FORMAT = 2


class BudgetExceeded(PublicRefusal):
    """A request (or a whole run's plan) would take the ledger past ``epsilon_budget``."""

    code = "E_BUDGET"


class RunLimitExceeded(PublicRefusal):
    """A new experiment beyond ``[auditor] max_runs``."""

    code = "E_RUN_LIMIT"


class OutOfPlan(PublicRefusal):
    """A request that is not the next of the run's plan (a repeat is answered from the cache)."""

    code = "E_ROUND_ORDER"


class NotPrivate(RuntimeError):
    """The method (or its settings) has no differentially private form; refused under DP."""


class _SharedJson:
    """A JSON file that several processes of one ``state_dir`` share: every access under the
    folder's lock re-reads it when another process changed it (inode, mtime, size); writes are
    atomic. Subclasses name it (:attr:`what`) and give ``_read(obj)`` and ``_dump() -> obj``.

    Raises (from every access):
        ValueError: the file is unreadable, or it was deleted while in use.
    """

    what = "file"

    def _open(self, path: Path | None, lock: FileLock | None) -> None:
        self.path = path
        self._lock = lock if lock is not None else FileLock(path.parent) if path else None
        self._stamp: tuple | None = None
        with self._locked():
            self._sync()

    def _locked(self):
        return self._lock if self._lock is not None else contextlib.nullcontext()

    def _read(self, obj: dict) -> None:
        raise NotImplementedError

    def _dump(self) -> dict:
        raise NotImplementedError

    def _changed(self) -> None:
        """Called after the file was re-read (subclasses drop caches)."""

    def _sync(self) -> None:
        if self.path is None:
            return
        stamp = _file_stamp(self.path)
        if stamp == self._stamp:
            return
        if stamp is None:  # it was there when this object last read or wrote it
            raise ValueError(f"{self.what} {self.path} was deleted while the auditor used it; restore "
                             "its latest copy (a budget or run count must not restart from 0; an "
                             "older copy is refused)")
        try:
            self._read(json.loads(self.path.read_text()))
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{self.what} {self.path} is unreadable: {err}") from None
        self._stamp = stamp
        self._changed()

    def save(self) -> None:
        """Write the file (atomically; a no-op without a path)."""
        self._changed()
        if self.path is not None:
            with self._locked():
                atomic_write_bytes(self.path, json.dumps(self._dump()).encode())
                self._stamp = _file_stamp(self.path)


class RunRegistry(_SharedJson):
    """The experiments (distinct fingerprints) the auditor has answered, and the Flower runs.

    ``max_runs`` caps the experiments: every one is a new set of queries against the auditor's
    data; a re-run of an answered experiment is not a new one (under DP it gets the stored
    replies; without DP the same deterministic answers). A renamed or re-seeded experiment has
    another fingerprint, so it is a new one. Persisted (with a path) as JSON
    ``{"fingerprints": [...], "runs": [{"run_id", "fingerprint", "time"}]}``, replaced
    atomically; every call re-reads the file when another process changed it, under ``lock``,
    so the count survives restarts and is shared by every process of one ``state_dir``.

    Raises:
        ValueError: the file is unreadable, or it was deleted while this registry used it.
    """

    what = "run registry"

    def __init__(self, max_runs: int, path: Path | None = None, lock: FileLock | None = None):
        self.max_runs = max_runs
        self.fingerprints: list[str] = []
        self.runs: list[dict] = []
        self._open(path, lock)

    def _read(self, obj: dict) -> None:
        fingerprints = [str(f) for f in obj["fingerprints"]]
        if self._stamp is not None and not set(self.fingerprints) <= set(fingerprints):
            raise ValueError("it lost experiments it held: an older copy was put in place, and the "
                             "run count must not go back")
        self.fingerprints = fingerprints
        self.runs = list(obj.get("runs", []))

    def _dump(self) -> dict:
        return {"fingerprints": self.fingerprints, "runs": self.runs}

    def __contains__(self, fingerprint: str) -> bool:
        with self._locked():
            self._sync()
            return fingerprint in self.fingerprints

    def check(self, fingerprint: str) -> None:
        """Raise RunLimitExceeded if ``fingerprint`` would be a new experiment beyond ``max_runs``."""
        with self._locked():
            self._sync()
            if fingerprint not in self.fingerprints and len(self.fingerprints) >= self.max_runs:
                raise RunLimitExceeded(f"the auditor answers at most max_runs = {self.max_runs} "
                                       f"experiments; {len(self.fingerprints)} were run")

    def register(self, fingerprint: str) -> int:
        """Count a new experiment (after :meth:`check`); returns its number (1-based)."""
        with self._locked():
            self.check(fingerprint)
            if fingerprint not in self.fingerprints:
                self.fingerprints.append(fingerprint)
                self.save()
            return self.fingerprints.index(fingerprint) + 1

    def note_run(self, run_id: int | None, fingerprint: str, at: str) -> bool:
        """Record a Flower run id with its experiment (once per run id); returns whether new."""
        if run_id is None:
            return False
        with self._locked():
            self._sync()
            if any(r["run_id"] == run_id for r in self.runs):
                return False
            self.runs.append({"run_id": int(run_id), "fingerprint": fingerprint, "time": at})
            self.save()
            return True



def _spent(events: list[dict]) -> int:
    """The total count of ledger events (it never decreases)."""
    return sum(int(e["count"]) for e in events)


def _file_stamp(path: Path) -> tuple | None:
    """(inode, mtime ns, size) of ``path``, or None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# -- the auditor's private randomness ------------------------------------------------------------


class AuditorSecret:
    """32 random bytes only the auditor holds; every random draw of its releases derives from it.

    With a ``state_dir`` the secret is ``state_dir/secret.key`` (mode 0600, written atomically
    on first use; :class:`auditor.state.PrivacyState` refuses to start when it is missing while
    releases were made); without one it lives in memory for the life of the process.

    The auditor draws only through :meth:`for_release`: every draw of one answer is keyed by the
    ledger's release number, so two distinct answers never share noise (``docs/privacy.md``).

    Raises:
        ValueError: ``secret.key`` is not 32 bytes.
    """

    def __init__(self, state_dir: Path | None):
        path = Path(state_dir) / "secret.key" if state_dir is not None else None
        if path is not None and path.is_file():
            key = path.read_bytes()
            if len(key) != 32:
                raise ValueError(f"{path} must hold 32 bytes, found {len(key)}")
        else:
            key = os.urandom(32)
            if path is not None:
                atomic_write_bytes(path, key, mode=0o600)
        self._key = key

    def seed(self, *keys) -> int:
        """A 128-bit seed for ``keys`` (str/int), unpredictable without the secret."""
        msg = json.dumps([str(k) for k in keys]).encode()
        return int.from_bytes(hashlib.blake2b(msg, key=self._key, digest_size=16).digest(), "big")

    def rng(self, *keys) -> np.random.Generator:
        """A NumPy generator for ``keys``."""
        return np.random.default_rng(self.seed(*keys))

    def generator(self, *keys) -> torch.Generator:
        """A CPU torch generator for ``keys``."""
        return torch.Generator().manual_seed(self.seed(*keys) % (2 ** 63))

    def for_release(self, release: int | str) -> "AuditorSecret":
        """The secret as one release sees it: every seed also keyed by ``release``
        (:meth:`Ledger.noise_key`: its number and nonce)."""
        return _ReleaseSecret(self, str(release))


class _ReleaseSecret(AuditorSecret):
    """:class:`AuditorSecret` bound to one release number (:meth:`AuditorSecret.for_release`)."""

    def __init__(self, parent: AuditorSecret, release: str):
        self._parent, self.release_id = parent, release

    def seed(self, *keys) -> int:
        return self._parent.seed("release", self.release_id, *keys)

    def for_release(self, release: int | str) -> "AuditorSecret":
        raise RuntimeError("a release's secret cannot open another release")


class NoRelease:
    """Stands for the secret outside an answer: any draw is a programming error, not a release."""

    def __getattr__(self, name):
        raise RuntimeError("the auditor's randomness is drawn only inside a release "
                           "(AuditorSecret.for_release with the ledger's release number)")


def poisson_indices(n: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson subsample of ``range(n)``: each index independently with probability ``q`` (sorted)."""
    return np.flatnonzero(rng.random(n) < q)


# -- mechanisms -------------------------------------------------------------------------------------


def noisy_counts(counts: Mapping[str, np.ndarray], sigma: float, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """Gaussian mechanism on per-group confusion counts: each count + N(0, σ²) (sensitivity 1).

    Args:
        counts: group → ``[tn, fp, fn, tp]`` (4,) from :func:`protocol.metrics.confusion_counts`.
        sigma: noise standard deviation in counts (= the noise multiplier, sensitivity 1).
    """
    return {g: np.asarray(c, dtype=np.float64) + rng.normal(0.0, sigma, 4) for g, c in sorted(counts.items())}


def per_example_grads(loss_fn: Callable, params: dict[str, torch.Tensor], *batch) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``loss_fn(params, *example)`` with ``torch.func.vmap(grad(...))``.

    Args:
        loss_fn: ``(params, *example) -> scalar`` for one example (no batch dimension).
        params: name → tensor (detached).
        batch: tensors with the batch on dim 0 (B, ...), or dicts of such tensors.
    Returns:
        name → (B, *param.shape).
    """
    from torch.func import grad, vmap

    with warnings.catch_warnings():  # SDPA has no batching rule on CPU yet: vmap loops it (exact)
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        return vmap(grad(loss_fn), in_dims=(None, *([0] * len(batch))))(params, *batch)


def clipped_noisy_sum(grads: dict[str, torch.Tensor], clip_norm: float, noise_multiplier: float,
                      generator: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """Σ_i clip_C(g_i) + N(0, σ²C²·I) (DP-SGD, Abadi et al. 2016, Alg. 1).

    Args:
        grads: name → (B, ...) per-example gradients; a non-finite example's gradient counts as 0.
        clip_norm: C, the per-example L2 bound over all names together.
        noise_multiplier: σ.
    Returns:
        (name → noisy sum, same shape as one example's gradient, float32 CPU; fraction of
        examples that were clipped, for the auditor's log only).
    """
    names = list(grads)
    if not names:
        return {}, 0.0
    b = next(iter(grads.values())).shape[0]
    flat = torch.cat([grads[k].reshape(b, -1).double() for k in names], 1) if b else None
    sums = {}
    clipped = 0.0
    if b:
        finite = torch.isfinite(flat).all(1)
        flat = torch.where(finite[:, None], flat, torch.zeros_like(flat))
        norms = flat.norm(dim=1)
        scale = torch.clamp(clip_norm / (norms + 1e-12), max=1.0)
        clipped = float((norms > clip_norm).double().mean())
        total = (flat * scale[:, None]).sum(0)
    offset = 0
    for k in names:
        shape = grads[k].shape[1:]
        size = int(np.prod(shape)) if len(shape) else 1
        part = total[offset:offset + size].reshape(shape) if b else torch.zeros(shape, dtype=torch.float64)
        noise = torch.normal(0.0, noise_multiplier * clip_norm, size=tuple(shape), generator=generator,
                             dtype=torch.float64)
        sums[k] = (part.cpu() + noise).float()
        offset += size
    return sums, clipped


def _cells(s: torch.Tensor, y: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Cell index g·2 + y of each example (G·2 cells)."""
    return s.long() * 2 + y.long()


def noisy_cell_stats(p: torch.Tensor, s: torch.Tensor, y: torch.Tensor, n_groups: int, sigma: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy per-(group, label) counts n_c and sums S_c = Σ_{i∈c} p_i (Gaussian, L2 sensitivity √2).

    Args:
        p: (B,) soft predictions in [0, 1] (non-finite → 0); s, y: (B,) int64.
        sigma: noise multiplier; each entry gets N(0, 2σ²).
    Returns:
        (n (2G,), S (2G,)) float64, cell c = 2g + y.
    """
    p = torch.nan_to_num(p.detach().double(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    cells = _cells(s, y, n_groups)
    k = 2 * n_groups
    n = torch.bincount(cells, minlength=k).double()
    S = torch.bincount(cells, weights=p, minlength=k).double()
    std = sigma * math.sqrt(2.0)
    n = n + torch.normal(0.0, std, size=(k,), generator=generator, dtype=torch.float64)
    S = S + torch.normal(0.0, std, size=(k,), generator=generator, dtype=torch.float64)
    return n, S


def cell_violation(S: torch.Tensor, n: torch.Tensor, statistic: str, noise_sd: float = 0.0,
                   z: float = 3.0) -> torch.Tensor:
    """fairret's NormLoss (p = 1) written on per-(group, label) sums: Σ_g |stat_g / stat − 1|.

    Args:
        S: (2G,) sums of p per cell c = 2g + y; n: (2G,) counts per cell (noisy counts allowed;
            a statistic whose denominator is ≤ 0.5 leaves its group out).
        statistic: ``demographic_parity``, ``equal_opportunity``, ``equalized_odds``,
            ``accuracy_equality`` (as :func:`auditor.methods.fairness_terms.fairness_violation`).
        noise_sd: the standard deviation of the noise on each entry of S and n. With noise, a
            group's term is max(0, |r_g − 1| − z·sd(r_g)) (sd by the delta method): a gap the
            noise alone could make gives no gradient. Without it, the sign of a pure-noise gap
            would still point the gradient along the groups' mean difference, a population-level
            s-direction with no fairness purpose (``bench/leakage.py``, ``signal_direction``).
    Returns:
        a scalar, differentiable in S; 0 when fewer than two groups are defined.
    """
    S2, n2 = S.reshape(-1, 2), n.reshape(-1, 2)  # (G, label)

    def norm_loss(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        keep = den > 0.5
        if int(keep.sum()) < 2:
            return S.sum() * 0.0
        overall = num[keep].sum() / den[keep].sum()
        r = (num[keep] / den[keep]) / overall
        gap = (r - 1).abs()
        if noise_sd > 0:
            num_k = num[keep].detach().clamp(min=1.0)
            sd = r.detach() * noise_sd * torch.sqrt(1 / num_k ** 2 + 1 / den[keep].detach() ** 2)
            gap = torch.relu(gap - z * sd)
        return gap.sum()

    if statistic == "demographic_parity":
        return norm_loss(S2.sum(1), n2.sum(1))
    if statistic == "equal_opportunity":
        return norm_loss(S2[:, 1], n2[:, 1])
    if statistic == "equalized_odds":
        both = (n2[:, 1] > 0.5) & (n2[:, 0] > 0.5)
        if int(both.sum()) < 2:
            return S.sum() * 0.0
        return (norm_loss(S2[both, 1], n2[both, 1]) + norm_loss(S2[both, 0], n2[both, 0]))
    if statistic == "accuracy_equality":
        return norm_loss(S2[:, 1] + n2[:, 0] - S2[:, 0], n2.sum(1))
    raise ValueError(f"unknown fairness statistic {statistic!r}")


def cell_weights(n: torch.Tensor, S: torch.Tensor, statistic: str, noise_sd: float = 0.0,
                 z: float = 3.0) -> tuple[torch.Tensor, float]:
    """w_c = ∂L/∂S_c at (noisy) statistics, and L there: the linearised per-example fairness term.

    With these weights Σ_i w_{c(i)}·∇p_i = ∇L when the statistics are the batch's exact ones.
    ``noise_sd``: the noise on each statistic (gaps within ``z`` sd give no gradient; see
    :func:`cell_violation`). Returns ((2G,) float64 weights, L).
    """
    S = S.detach().clone().requires_grad_(True)
    n = n.detach().clamp(min=0.0)
    S_used = torch.minimum(S.clamp(min=0.0), n)  # a sum of p in [0, 1] lies in [0, n]
    loss = cell_violation(S_used, n, statistic, noise_sd, z)
    if not loss.requires_grad:
        return torch.zeros_like(S.detach()), 0.0
    (w,) = torch.autograd.grad(loss, S)
    return torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0), float(loss.detach())


# -- accounting -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunNoise:
    """Noise multipliers of one run, per part: σ of the train part's releases (sampled Gaussian
    steps and statistics), σ of the val and of the test reports."""

    train: float
    val: float
    test: float


def _event(kind: str, sigma: float, q: float | None) -> dp_accounting.DpEvent:
    gauss = dp_accounting.GaussianDpEvent(sigma)
    return gauss if kind == "gaussian" else dp_accounting.PoissonSampledDpEvent(q, gauss)


def _epsilon(events: list[dict], delta: float) -> float:
    """ε of the composition of ``events`` (dicts with kind, sigma, q, count) at ``delta``."""
    if not events:
        return 0.0
    acc = RdpAccountant(list(RDP_ORDERS))
    acc.compose(_composed(events))
    return float(acc.get_epsilon(delta))


def run_events(exp, n_train: int, noise: RunNoise) -> list[dict]:
    """Every release a run of ``exp`` makes, as ledger events (part, kind, sigma, q, count).

    From :func:`protocol.privacy.planned_requests`: a Gaussian report event on val per
    validation request and on test per test request; for a penalty (stage) signal per round one
    sampled-Gaussian step (gradient and the next step's statistics, combined multiplier σ_train)
    plus one statistics-only release (multiplier √2·σ_train) before the first; the penalty's
    dual ascent one val report per update; last_layer's ``"stats"`` refit: two Gaussian
    releases (counts, clipped feature sums; multiplier σ_train) and one val evaluation per α > 0
    of ``dp_stats_alphas`` plus the incoming head's; its ``"sgd"`` refit: per α of ``dp_alphas``
    ``dp_refit_steps`` gradient steps (multiplier σ_train), one release of the whole training
    part's statistics at the incoming head (Gaussian, multiplier σ_train), and one val evaluation
    per α plus the incoming head's.

    Raises:
        NotPrivate: a stage without a differentially private form.
    """
    method = exp.method
    plan = request_plan(method)
    events: list[dict] = []

    def add(part, kind, sigma, q, count):
        if count:
            events.append({"part": part, "kind": kind, "sigma": float(sigma),
                           "q": None if q is None else float(q), "count": int(count)})

    reqs = planned_requests(exp)
    add("auditor_val", "gaussian", noise.val, None, sum(1 for r in reqs if r[1] == "val"))
    add("auditor_test", "gaussian", noise.test, None, sum(1 for r in reqs if r[1] == "test"))
    first = getattr(method, "first_stage", None)
    stage = first if first is not None else method
    n_signals = sum(1 for r in reqs if r[2] == "signal")
    if stage.name == "penalty":
        q = min(1.0, stage.auditor_batch_size / n_train)
        add("auditor_train", "sampled", noise.train, q, n_signals)
        add("auditor_train", "sampled", noise.train * math.sqrt(2), q, 1 if n_signals else 0)
        if stage.bound is not None:
            every = stage.dual_every or exp.eval_every
            add("auditor_val", "gaussian", noise.val, None, math.ceil(n_signals / every))
    elif stage.name != "erm":
        raise NotPrivate(f"method {stage.name!r} has no differentially private form")
    if plan.final_want == "head":
        if method.constraint == "MMF" or method.balanced:
            raise NotPrivate("last_layer under DP supports constraint EO, DI or AE without balanced")
        if method.dp_refit == "stats":  # counts and sums, once; the incoming head and each α > 0 on val
            if method.constraint not in ("EO", "DI"):
                raise NotPrivate("last_layer's statistics refit supports EO and DI (AE: dp_refit = 'sgd')")
            add("auditor_train", "gaussian", noise.train, None, 2)
            add("auditor_val", "gaussian", noise.val, None, 1 + len({a for a in method.dp_stats_alphas if a > 0}))
            return events
        q = min(1.0, method.dp_batch_size / n_train)
        add("auditor_train", "sampled", noise.train, q, method.dp_refit_steps * len(method.dp_alphas))
        add("auditor_train", "gaussian", noise.train, None, 1)
        add("auditor_val", "gaussian", noise.val, None, len(method.dp_alphas) + 1)
    return events


def part_epsilon(events: list[dict], delta: float) -> dict[str, float]:
    """ε per part of ``events``."""
    return {part: _epsilon([e for e in events if e["part"] == part], delta) for part in PARTS}


def _composed(events: list[dict]) -> dp_accounting.DpEvent:
    """The composition of ledger events as one ``dp-accounting`` event."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(_event(e["kind"], e["sigma"], e.get("q")), int(e["count"]))
        for e in events])


def calibrate_sigma(make_events: Callable[[float], list[dict]], target_epsilon: float, delta: float,
                    lo: float = 0.05, hi: float = 5000.0) -> float:
    """The smallest noise multiplier σ whose ``make_events(σ)`` spends at most ``target_epsilon``.

    ``dp_accounting.calibrate_dp_mechanism`` (Brent's method over [``lo``, ``hi``], tolerance
    1e-6 in σ; RDP accountant with :data:`RDP_ORDERS`), then moved up by that tolerance so the
    returned σ is on the private side of the target.

    Raises:
        ValueError: even σ = ``hi`` spends more than the target.
    """
    if _epsilon(make_events(hi), delta) > target_epsilon:
        raise ValueError(f"no noise multiplier up to {hi} reaches ε = {target_epsilon}")
    if _epsilon(make_events(lo), delta) <= target_epsilon:
        return lo
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: RdpAccountant(list(RDP_ORDERS)), lambda s: _composed(make_events(s)),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(lo, hi), tol=1e-6)
    return float(sigma) + 1e-6


class Ledger(_SharedJson):
    """The privacy ledger of one developer: every release of every run, composed per part, and
    the journal of the answers made.

    Events are dicts ``{"fingerprint", "part", "kind": "gaussian" | "sampled", "sigma", "q",
    "count"}``. ε of a set of events is the RDP composition (``dp-accounting``) of each part's
    events, converted at ``delta``, and the maximum over parts (the parts are disjoint).

    The journal (:meth:`reserve`) numbers every answer the auditor computes: (fingerprint,
    round, split, want), the SHA-256 of the request, and a release number that only grows.
    The release number keys all of that answer's noise (:meth:`AuditorSecret.for_release`), so a
    different request for an answered key never gets the same noise, and it is charged again.

    Persisted (when ``path`` is given) as JSON ``{"format": 2, "delta", "events": [...],
    "releases": [...], "next_release": n}`` (format 1, events only, is read), replaced atomically
    after every change; every call re-reads the file when another process changed it, under
    ``lock``, so the budget survives restarts and is shared by every process of one state_dir.

    Raises:
        ValueError: the file is unreadable or for another δ, or it was deleted while in use.
    """

    what = "privacy ledger"

    def __init__(self, delta: float, budget: float, path: Path | None = None, lock: FileLock | None = None):
        self.delta, self.budget = delta, budget
        self.events: list[dict] = []
        self.releases: list[dict] = []
        self.next_release = 0
        self.format = _LEDGER_FORMAT
        self.noise: dict[str, dict] = {}  # fingerprint → the noise multipliers its plan was charged at
        self._cache: dict[str | None, float] = {}  # fingerprint (None: all) → ε; cleared on change
        self._open(path, lock)

    def _read(self, obj: dict) -> None:
        if obj["format"] not in (1, _LEDGER_FORMAT) or float(obj["delta"]) != self.delta:
            raise ValueError(f"format {obj['format']} or delta {obj['delta']} is not "
                             f"{_LEDGER_FORMAT} and {self.delta}")
        events, releases = list(obj["events"]), list(obj.get("releases", []))
        next_release = int(obj.get("next_release", 0))
        if any(int(r["id"]) >= next_release for r in releases):
            raise ValueError("a release number at or past next_release")
        if self._stamp is not None and (  # a re-read: a ledger only grows
                int(obj["format"]) < self.format or next_release < self.next_release
                or len(releases) < len(self.releases) or _spent(events) < _spent(self.events)):
            raise ValueError("it went back (fewer releases or charges than this auditor saw): an "
                             "older copy was put in place, which would reopen answered queries")
        self.format = int(obj["format"])
        self.events, self.releases, self.next_release = events, releases, next_release
        self.noise = {str(k): dict(v) for k, v in obj.get("noise", {}).items()}

    def _dump(self) -> dict:
        return {"format": _LEDGER_FORMAT, "delta": self.delta, "events": self.events,
                "releases": self.releases, "next_release": self.next_release, "noise": self.noise}

    def _changed(self) -> None:
        self._cache.clear()

    def epsilon(self, fingerprint: str | None = None, extra: list[dict] = ()) -> float:
        """ε of the ledger (or of one experiment's events) plus ``extra``: max over parts.

        Without ``extra`` the value is cached until the ledger changes (every reply and audit
        line reads it; one RDP conversion takes tens of milliseconds).
        """
        with self._locked():
            self._sync()
            if not extra and fingerprint in self._cache:
                return self._cache[fingerprint]
            events = [e for e in self.events if fingerprint is None or e["fingerprint"] == fingerprint]
            eps = max(part_epsilon(events + list(extra), self.delta).values())
            if not extra:
                self._cache[fingerprint] = eps
            return eps

    def check(self, extra: list[dict], what: str) -> None:
        """Refuse (:class:`BudgetExceeded`) if ``extra`` would take the ledger past the budget."""
        with self._locked():
            now = self.epsilon()
            after = self.epsilon(extra=extra)
            if after > self.budget + 1e-9:
                raise BudgetExceeded(
                    f"{what} would spend the privacy budget: epsilon_budget = {self.budget:g} "
                    f"(delta = {self.delta:g}), spent {now:.3f}, after it {after:.3f}")

    def record(self, events: list[dict]) -> None:
        """Add ``events`` (identical events merge into one with the summed count) and persist."""
        if not events:
            return
        with self._locked():
            self._sync()
            for e in events:
                self._merge(e)
            self.save()

    def _merge(self, e: dict) -> None:
        key = {k: e.get(k) for k in ("fingerprint", "part", "kind", "sigma", "q")}
        same = next((x for x in self.events if all(x.get(k) == v for k, v in key.items())), None)
        if same is not None:
            same["count"] = int(same["count"]) + int(e["count"])
        else:
            self.events.append({**key, "count": int(e["count"])})

    def reserve(self, fingerprint: str, key: tuple, request_sha256: str) -> tuple[int, bool]:
        """Number the answer about to be computed for ``key`` = (round, split, want).

        Returns ``(release, charged_again)``. The request the key was first reserved with (or
        any request already reserved for it, byte for byte) keeps its release number: computing
        it again gives the same answer, so it tells nothing new. Any other request for a key that
        was reserved before gets a new number and ``charged_again = True``: the caller charges
        its releases (:meth:`check`, :meth:`record`) before the answer leaves.
        """
        with self._locked():
            self._sync()
            mine = [r for r in self.releases if r["fingerprint"] == fingerprint
                    and (r["round"], r["split"], r["want"]) == tuple(key)]
            same = next((r for r in mine if r["request"] == request_sha256), None)
            if same is not None:  # a charged reservation is paid once (:meth:`pay`)
                return int(same["id"]), bool(same.get("charged")) and not same.get("paid")
            rid = self.next_release
            self.next_release += 1
            self.releases.append({"id": rid, "nonce": os.urandom(16).hex(), "fingerprint": fingerprint,
                                  "round": int(key[0]), "split": str(key[1]), "want": str(key[2]),
                                  "request": request_sha256, "charged": bool(mine)})
            self.save()
            return rid, bool(mine)

    def noise_key(self, release_id: int) -> str:
        """What keys a release's draws (:meth:`AuditorSecret.for_release`): its number and a random
        nonce drawn when it was reserved, so that a journal rolled back to an older copy (whose
        numbers repeat) still never repeats noise.

        Raises:
            KeyError: no such release.
        """
        with self._locked():
            self._sync()
            entry = self._entry(release_id)
            return f"{entry['id']}:{entry.get('nonce', '')}"

    def _entry(self, release_id: int) -> dict:
        """The journal entry of ``release_id`` (call under the lock, synced).

        Raises:
            KeyError: no such release.
        """
        entry = next((r for r in self.releases if int(r["id"]) == int(release_id)), None)
        if entry is None:
            raise KeyError(f"no release {release_id} in the ledger's journal")
        return entry

    def register_run(self, fingerprint: str, events: list[dict], noise: dict[str, float], what: str) -> None:
        """Charge a new experiment's whole plan and keep the noise multipliers it was charged
        at (its later answers use them, whatever the config then says), in one write.

        Raises:
            BudgetExceeded: the plan would take the ledger past the budget (nothing changes).
        """
        with self._locked():
            self._sync()
            self.check(events, what)
            for e in events:
                self._merge(e)
            self.noise[fingerprint] = {k: float(v) for k, v in noise.items()}
            self.save()

    def pay(self, release_id: int, events: list[dict], what: str) -> None:
        """Charge a charged-again release's ``events`` (after :meth:`check`) and mark it paid, in
        one write.

        Raises:
            BudgetExceeded: the events would take the ledger past the budget (nothing changes).
            KeyError: no such release.
        """
        with self._locked():
            self._sync()
            entry = self._entry(release_id)
            self.check(events, what)
            for e in events:
                self._merge(e)
            entry["paid"] = True
            self.save()

    def reserved_keys(self, fingerprint: str) -> list[tuple]:
        """The (round, split, want) keys of ``fingerprint`` answered (or being answered), sorted."""
        with self._locked():
            self._sync()
            return sorted({(int(r["round"]), r["split"], r["want"]) for r in self.releases
                           if r["fingerprint"] == fingerprint})
