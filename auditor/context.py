"""What an auditor method may read, spend and release.

A method (:class:`auditor.methods.base.AuditorMethod`) is built with a :class:`MethodContext`: the
experiment, the auditor's config, the model at the received weights, the auditor's data and the
DP gate (:class:`Gate`), and nothing else of the service that answers requests
(:class:`auditor.service.AuditorService` is the context at run time, :class:`auditor.gate.PrivacyGate`
the gate). It reads its examples as :class:`RoundBatch` and returns a :class:`Release`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fairsplit.protocol.conditional import GatedModel
from fairsplit.auditor.config import AuditorConfig
from fairsplit.protocol.config import ExperimentConfig
from fairsplit.protocol.data import Dataset
from fairsplit.protocol.model import FairsplitModel

__all__ = ["RECORD_OF", "Gate", "MethodContext", "Release", "RoundBatch"]


@dataclass
class RoundBatch:
    """The auditor's examples for one round: B raw inputs, groups ``s`` (B,) int64, labels ``y`` (B,) int64."""

    inputs: object
    s: torch.Tensor
    y: torch.Tensor


@dataclass
class Release:
    """What a method computed for one request; the service sends it only through the policy.

    ``adapter_gradient``: peft key → ∂R/∂φ (the adapter's shapes); ``head_gradient``:
    ``weight`` (C, D), ``bias`` (C,) → ∂R/∂h; ``update``: LoRA module → ΔW (d_out, d_in);
    ``head``: a task head ``weight`` (C, D), ``bias`` (C,); ``metrics``: a
    :class:`protocol.policy.SignalMetrics` dict (aggregates over the method's batch);
    ``cond_gradient``: FairNet's ∂R/∂φ_c (the conditional LoRA's keys and shapes).
    """

    metrics: dict = field(default_factory=dict)
    adapter_gradient: dict[str, torch.Tensor] | None = None
    head_gradient: dict[str, torch.Tensor] | None = None
    update: dict[str, torch.Tensor] | None = None
    head: dict[str, torch.Tensor] | None = None
    cond_gradient: dict[str, torch.Tensor] | None = None

    def records(self) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors that cross, keyed by their reply record (:data:`RECORD_OF`: the names
        :func:`protocol.messages.make_reply` takes); absent ones left out."""
        return {record: getattr(self, name) for name, record in RECORD_OF.items()
                if getattr(self, name) is not None}

    def map_tensors(self, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> "Release":
        """A copy with ``fn`` applied to each crossing's tensors (the metrics unchanged)."""
        return replace(self, **{name: fn(getattr(self, name)) for name in RECORD_OF
                                if getattr(self, name) is not None})


#: Release field → the reply record it crosses as (one entry per kind of crossing; the policy's
#: rule for that record and its codec are in :mod:`protocol.policy`).
RECORD_OF = {"adapter_gradient": "signal", "head_gradient": "head_signal", "update": "update", "head": "head",
             "cond_gradient": "cond_signal"}


class Gate(Protocol):
    """What a method may spend (:class:`auditor.gate.PrivacyGate` at run time)."""

    dp: bool
    """Differential privacy on (the auditor's ``[auditor.privacy] enabled``)."""
    secret: object
    """Under DP the auditor's secret bound to the current release (``.rng(...)``: its draws)."""

    @property
    def noise(self):
        """This run's noise multipliers per part (``train``, ``val``, ``test``)."""

    def spend(self, part: str, kind: str, sigma: float, q: float | None = None, count: int = 1) -> None:
        """Note a release the current answer makes."""

    def report(self, part_name: str, scores: np.ndarray, key: tuple) -> dict:
        """The (under DP: noisy) report on one part at ``scores``."""


class MethodContext(Protocol):
    """The auditor's side of one experiment, as a method sees it."""

    exp: ExperimentConfig
    """The experiment both parties agreed on (``exp.method``: the method's config)."""
    cfg: AuditorConfig
    """The auditor's own config (``device``, ``min_group_size``, ``privacy``)."""
    fingerprint: str
    """The experiment's fingerprint (keys the auditor's random draws)."""
    gate: Gate
    """The DP gate: ``dp``, ``noise``, ``spend(...)``, ``secret``, ``report(...)``."""

    @property
    def model(self) -> FairsplitModel:
        """The shared backbone + LoRA + head, loaded with the request's adapter and head."""

    @property
    def gated(self) -> GatedModel | None:
        """FairNet's gated model around :attr:`model` (gated methods), else None."""

    @property
    def data(self) -> dict[str, Dataset]:
        """The auditor's parts: ``auditor_train``, ``auditor_val``, ``auditor_test``."""

    @property
    def group_names(self) -> list[str]:
        """Sorted sensitive group names of the training part (the code order)."""

    @property
    def train_codes(self) -> np.ndarray:
        """(N,) int64 group codes of the training part."""

    @property
    def refit_basis(self) -> dict[str, torch.Tensor] | None:
        """With a head refit request: the developer's ``basis`` (D, k) and ``mean`` (D,) of its
        own training features (:mod:`protocol.messages`), checked against the contract; else None."""

    def round_batch(self, round_: int, size: int, salt: int = 0) -> RoundBatch:
        """A seeded sample of ``min(size, N)`` training examples for (experiment seed, round, salt)."""

    def cached_records(self, *names: str) -> tuple[ArrayRecord | ConfigRecord, ...] | None:
        """The records ``names`` from the latest kept snapshot holding all of them, or None."""
