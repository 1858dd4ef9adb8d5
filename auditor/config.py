"""The auditor's own configuration: ``[auditor]`` (its data with the sensitive attributes, its
privacy settings ``[auditor.privacy]``, its state folder) and the auditor's file,
``[experiment]`` + ``[auditor]`` (+ the ``[tune]`` search space it admits)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from fairsplit.protocol.config import ExperimentConfig, load_toml
from fairsplit.protocol.schema import FilePath, StrictModel
from fairsplit.protocol.sources import DataConfig, names_sensitive
from fairsplit.protocol.tune import TuneConfig

__all__ = ["AuditorConfig", "AuditorFile", "PrivacyConfig", "load_auditor_file"]


class PrivacyConfig(StrictModel):
    """``[auditor.privacy]``: differential privacy on everything the auditor releases (on by default).

    Every release is a Gaussian mechanism under add/remove-one adjacency, accounted with Google's
    ``dp-accounting`` (RDP) on one ledger per developer (``docs/privacy.md``):

    * reports: Gaussian noise on the per-group (label × prediction) counts of the evaluated part,
      every released rate computed from the noisy counts;
    * signals and head refits: per-example gradients clipped to L2 norm ``clip_norm`` (C),
      summed, plus N(0, σ²C²), on Poisson-subsampled batches of the auditor's training part.

    The auditor's three parts are disjoint, so a run's ε is the largest ε over its parts
    (parallel composition); each part composes over all its releases of all runs.

    ``target_epsilon``: ε each run may spend (at ``delta``); with ``calibrate`` (the default)
    the auditor calibrates the noise multiplier of each part from the run's request plan so the
    whole planned run spends exactly that on its training part, and ``report_epsilon_fraction``
    of it on each report part (val, test). Reports are the channel an adaptive developer turns
    into statistical queries: one crafted head per run, the released gap regressed over runs,
    rebuilds a population-level s-predictor from a handful of runs at ε = 1 per report
    (``bench/leakage.py: report_sq_offset``, ``docs/privacy.md``), so they spend less per run
    than the training signals. ``calibrate = false``: use ``noise_multiplier``
    (signals, refits) and ``report_noise_multiplier`` (reports, counts) as given, and the run
    spends what they imply. ``epsilon_budget``: ε the ledger may reach in total over all runs
    of this developer; a run whose planned releases would pass it is refused at its first
    request. ``enabled = false`` turns all of this off (and the one-answer-per-round rule, and
    the auditor's private randomness): for controlled studies only, the auditor logs a warning.
    """

    enabled: bool = True
    target_epsilon: float = Field(1.0, gt=0.0)
    report_epsilon_fraction: float = Field(0.2, gt=0.0, le=1.0)
    calibrate: bool = True
    epsilon_budget: float = Field(6.5, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=0.1)
    noise_multiplier: float = Field(1.0, gt=0.0)
    report_noise_multiplier: float = Field(4.0, gt=0.0)
    clip_norm: float = Field(1.0, gt=0.0)
    min_batch_size: int = Field(32, ge=1, description="smallest auditor_batch_size served under DP")

    @model_validator(mode="after")
    def _target_within_budget(self) -> "PrivacyConfig":
        if self.enabled and self.calibrate and self.target_epsilon > self.epsilon_budget:
            raise ValueError(f"target_epsilon {self.target_epsilon} exceeds epsilon_budget "
                             f"{self.epsilon_budget}")
        return self

    def part_target(self, part: str) -> float:
        """ε a run may spend on ``part`` (``"auditor_train"``, ``"auditor_val"`` or
        ``"auditor_test"``): ``target_epsilon`` on the training part, ``target_epsilon ×
        report_epsilon_fraction`` on each report part."""
        return self.target_epsilon * (1.0 if part == "auditor_train" else self.report_epsilon_fraction)


class AuditorConfig(StrictModel):
    """The auditor's own settings: its data with sensitive attributes, and its privacy floor.

    ``min_group_size`` is the smallest group over which the auditor reports aggregate metrics;
    smaller groups make the evaluation fail with a clear error instead of being reported.

    ``state_dir`` (on the auditor's machine only) is where the auditor keeps what must survive a
    restart: the privacy ledger, run registry, secret and stored replies
    (:mod:`auditor.state`), ``<state_dir>/<experiment fingerprint>/state.pt`` (its per-round
    state snapshots: adversary/classifier weights, the sensitive LoRA's A_s, the unlearning
    update ΔW_s) and ``<state_dir>/audit.jsonl`` (one line per payload received or sent). Under
    DP (the default) it is required; the launchers set one when the file names none
    (``fairsplit auditor``: one per SuperLink under the user's state directory; ``fairsplit
    run`` and the co-located runner: ``OUT/auditor``). Without DP and without it the state lives
    in the Flower run's ``context.state`` (or in memory) and no auditor-side log is written.

    ``approved_app_sha256``: the Flower App bundles (SHA-256 of the FAB) the auditor's executor
    answers; any other bundle is refused before anything is read (empty: the bundle of the
    auditor's own installed fairsplit, ``fairsplit app-hash``).

    ``privacy``: :class:`PrivacyConfig`. ``max_runs``: the most experiments (runs with distinct
    fingerprints) the auditor answers for this developer; a new one beyond it is refused.
    """

    data: DataConfig
    min_group_size: int = Field(10, ge=1)
    device: str = "cpu"
    num_threads: int | None = Field(None, ge=1)
    cache_dir: FilePath | None = None
    state_dir: FilePath | None = None
    superlink: str = "127.0.0.1:9092"
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    max_runs: int = Field(100, ge=1)
    approved_app_sha256: list[str] = Field(
        default_factory=list,
        description="SHA-256 of the Flower App bundles (FAB) the auditor executes; empty: the "
                    "app shipped with the auditor's own installed fairsplit")

    @field_validator("approved_app_sha256")
    @classmethod
    def _hex_hashes(cls, v: list[str]) -> list[str]:
        bad = [h for h in v if len(h) != 64 or any(c not in "0123456789abcdefABCDEF" for c in h)]
        if bad:
            raise ValueError(f"approved_app_sha256 entries must be 64 hex digits, got {bad}")
        return [h.lower() for h in v]

    @model_validator(mode="after")
    def _has_sensitive(self) -> "AuditorConfig":
        if not names_sensitive(self.data):
            raise ValueError("the auditor's data config must name the sensitive attribute(s)")
        return self


class AuditorFile(StrictModel):
    """An auditor's config file: ``[experiment]`` + ``[auditor]``.

    ``[tune]`` (optional, :class:`protocol.tune.TuneConfig`): the auditor also serves every
    experiment of that search space (:func:`protocol.trials.admit`), each a run of its own.
    """

    experiment: ExperimentConfig
    auditor: AuditorConfig
    tune: TuneConfig | None = None


def load_auditor_file(path: str | Path) -> AuditorFile:
    """Load an auditor config (``[experiment]`` + ``[auditor]``).

    Raises:
        protocol.config.ConfigError: naming the file and the key.
    """
    return load_toml(AuditorFile, path)
