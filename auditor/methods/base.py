"""The interface every auditor-side method implements, and what it may release.

A method is one module in :mod:`auditor.methods` with one :class:`AuditorMethod` subclass, plus
one row in :data:`protocol.methods.METHODS` (what crosses, when the developer asks). The service
(:class:`auditor.service.AuditorService`) owns everything around it: payload checks, the
experiment fingerprint, the per-round state snapshots, evaluation reports and the audit log.
The method only says

* what it needs to set up: :meth:`AuditorMethod.prepare`, called before every request once the
  round's state is restored (e.g. unlearning's W0 − λ·ΔW_s on the auditor's model);
* what it computes each round from the received model: :meth:`AuditorMethod.signal` (a gradient
  for the adapter and, if its row says so, the head, or FairNet's conditional LoRA),
  :meth:`AuditorMethod.update` (a weight update), :meth:`AuditorMethod.refit_head` (a new head)
  or :meth:`AuditorMethod.choose_threshold` (FairNet's gate τ);
* the state it keeps: records it reads and writes in the ``state`` :class:`RecordDict` it is
  given (the service snapshots it per round, so a re-sent round gets the identical answer);
* what it returns: a :class:`Release`, which the service passes through
  :func:`protocol.messages.make_reply` (the payload policy) before anything leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from flwr.app import RecordDict

from fairsplit.protocol.messages import RoundRequest

if TYPE_CHECKING:  # the service passes itself as the context
    from fairsplit.auditor.service import AuditorService

__all__ = ["AuditorMethod", "ProtocolMismatch", "Release", "RoundBatch"]


class ProtocolMismatch(ValueError):
    """The developer's request is for a different experiment, method or message type."""


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


class AuditorMethod:
    """Base class: one auditor-side method. Subclasses set :attr:`name` and override what they serve.

    Args:
        ctx: the auditor's service (model, data, group codes, device, cached state), see
            :class:`auditor.service.AuditorService`.
        cfg: this method's config (default: ``ctx.exp.method``; given for a stage of a
            composite method).

    Every ``serve`` method gets the request and the round's working state and returns a
    :class:`Release`; the default raises :class:`ProtocolMismatch` (the method does not serve
    that kind of request).
    """

    name: ClassVar[str] = ""

    def __init__(self, ctx: "AuditorService", cfg=None):
        self.ctx = ctx
        self.cfg = cfg if cfg is not None else ctx.exp.method
        #: the experiment as this method sees it (``method`` = its own config; differs from
        #: ``ctx.exp`` for last_layer's first stage)
        self.exp = ctx.exp if cfg is None else ctx.exp.model_copy(update={"method": cfg})

    def prepare(self, state: RecordDict) -> None:
        """Adjust the auditor's model to the one the developer trains (default: nothing)."""

    def signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """The round's gradient of the method's fairness term R at the received model."""
        raise ProtocolMismatch(f"method {self.name!r} has no per-round signal")

    def update(self, req: RoundRequest, state: RecordDict) -> Release:
        """A weight update to apply to the frozen base weights."""
        raise ProtocolMismatch(f"method {self.name!r} serves no weight update")

    def refit_head(self, req: RoundRequest, state: RecordDict) -> Release:
        """A new task head refitted on the auditor's data."""
        raise ProtocolMismatch(f"method {self.name!r} serves no head")

    def choose_threshold(self, req: RoundRequest, state: RecordDict) -> Release:
        """A gated method's τ, chosen on the auditor's validation part (FairNet)."""
        raise ProtocolMismatch(f"method {self.name!r} chooses no gate threshold")

    # -- helpers for subclasses -------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        """Number of sensitive groups in the auditor's training part."""
        return len(self.ctx.group_names)

    def batch(self, round_: int, salt: int = 0) -> RoundBatch:
        """The auditor's seeded batch of ``auditor_batch_size`` training examples for (round, salt)."""
        return self.ctx.round_batch(round_, self.cfg.auditor_batch_size, salt)


def grad_norm(*grads: dict[str, torch.Tensor] | None) -> float:
    """L2 norm over all tensors of the given gradient dicts (float64 accumulation)."""
    return float(torch.sqrt(sum((g.double() ** 2).sum() for d in grads if d for g in d.values())))
