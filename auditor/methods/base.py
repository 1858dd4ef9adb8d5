"""The interface every auditor-side method implements, and what it may release.

A method is one module in :mod:`auditor.methods` with one :class:`AuditorMethod` subclass, plus
one row in :data:`protocol.methods.METHODS` (what crosses, when the developer asks). The service
(:class:`auditor.service.AuditorService`, through :class:`auditor.context.MethodContext`) owns
everything around it: payload checks, the
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

from typing import ClassVar

import torch
from flwr.app import RecordDict

from fairsplit.protocol.messages import RoundRequest
from fairsplit.protocol.methods import METHODS

from ..accounting import NotPrivate, RunNoise

from ..context import MethodContext, Release, RoundBatch

__all__ = ["REGISTRY", "AuditorMethod", "ProtocolMismatch", "Release", "RoundBatch"]


#: Method name → auditor-side implementation (filled as the method modules are imported:
#: :mod:`auditor.methods` imports them all).
REGISTRY: dict[str, type["AuditorMethod"]] = {}


class ProtocolMismatch(ValueError):
    """The developer's request is for a different experiment, method or message type."""


class AuditorMethod:
    """Base class: one auditor-side method. Subclasses set :attr:`name` and override what they serve.

    Args:
        ctx: what the method may read and spend (:class:`auditor.context.MethodContext`: the
            experiment, the model, the auditor's data, group codes, cached state, the DP gate).
        cfg: this method's config (default: ``ctx.exp.method``; given for a stage of a
            composite method).

    Every ``serve`` method gets the request and the round's working state and returns a
    :class:`Release`; the default raises :class:`ProtocolMismatch` (the method does not serve
    that kind of request).
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        """Register a subclass that sets its own ``name`` in :data:`REGISTRY` (a reloaded module
        replaces its class).

        Raises:
            ValueError: two classes with one name.
        """
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):  # its own name (a subclass of a method does not inherit its row)
            known = REGISTRY.get(cls.name)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise ValueError(f"two auditor methods named {cls.name!r}: {known} and {cls}")
            REGISTRY[cls.name] = cls

    def __init__(self, ctx: MethodContext, cfg=None):
        self.ctx = ctx
        self.cfg = cfg if cfg is not None else ctx.exp.method
        #: the experiment as this method sees it (``method`` = its own config; differs from
        #: ``ctx.exp`` for last_layer's first stage)
        self.exp = ctx.exp if cfg is None else ctx.exp.model_copy(update={"method": cfg})

    @classmethod
    def dp_events(cls, cfg, exp, n_train: int, noise: RunNoise) -> list[dict]:
        """The ledger events of this method's own releases in one run of ``exp`` (reports are
        counted by :func:`auditor.accounting.run_events`), with ``cfg`` the method's config (the
        experiment's method or its first stage) and ``n_train`` the auditor's training part's
        size. Default: nothing of its own when its row of the method table is private, else
        refused.

        Raises:
            auditor.accounting.NotPrivate: the method (or these settings) has no private form.
        """
        if not METHODS[cls.name].private:
            raise NotPrivate(f"method {cls.name!r} has no differentially private form")
        return []

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
