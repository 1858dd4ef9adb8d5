"""The developer's client for one auditor in one run: build, send, log, count and check.

Every request is built from the trainer's current adapter and head (and FairNet's gated model)
by :func:`protocol.messages.make_request` under the payload policy, sent through an
:class:`AuditorChannel` (Flower's Grid in deployment, a direct call co-located), logged to the
run's ``audit.jsonl`` (direction, message type, round, records with keys and bytes, SHA-256,
time; never values), and its reply checked by :func:`protocol.messages.parse_reply`. The client
counts the bytes each way and the time spent waiting on the channel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

from flwr.app import RecordDict

from fairsplit.protocol.codec import payload_digest
from fairsplit.protocol.config import ExperimentConfig, experiment_fingerprint, experiment_json
from fairsplit.protocol.messages import PROTOCOL_VERSION, Reply, RoundRequest, make_request, message_type_for, parse_reply
from fairsplit.protocol.methods import request_plan
from fairsplit.protocol.model import state_spec, update_spec
from fairsplit.protocol.policy import refit_basis_spec, sends_head

from .results import append_jsonl

__all__ = ["AuditorChannel", "AuditorClient", "AuditorError", "Pending"]


class AuditorError(RuntimeError):
    """The auditor answered with an error, or did not answer in time."""


class AuditorChannel(Protocol):
    """Sends one request to the auditor and returns its reply's records.

    A channel may also offer ``submit(message_type, content) -> handle`` and
    ``receive(handle) -> RecordDict`` to send without waiting (used with ``overlap``); without
    them the request is sent when its reply is collected.
    """

    def send(self, message_type: str, content: RecordDict) -> RecordDict:
        """Raises :class:`AuditorError` on an error reply or timeout."""
        ...


def now() -> str:
    """UTC wall-clock time for audit lines (ISO 8601, milliseconds); same format as the auditor's."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Pending:
    """A submitted request: its config, message type, and how to fetch its reply."""

    req: RoundRequest
    message_type: str
    fetch: Callable[[], RecordDict]


class AuditorClient:
    """Requests of one run to one auditor.

    Args:
        exp: the experiment (its fingerprint and canonical JSON go with every request).
        trainer: the developer's trainer (``adapter()``, ``head()``, ``model``).
        stage: FairNet's conditional stage (``cond_state()``, ``detector_state()``, ``gated``),
            or None.
        channel: the transport.
        audit_path: the run's ``audit.jsonl``.
        sent, received: bytes already sent and received (a resumed run's totals).
        channel_time: seconds already spent on the channel.
    """

    def __init__(self, exp: ExperimentConfig, trainer, stage, channel: AuditorChannel, audit_path: Path,
                 sent: int = 0, received: int = 0, channel_time: float = 0.0):
        self.exp, self.trainer, self.stage, self.channel, self.audit_path = exp, trainer, stage, channel, audit_path
        self.sent, self.received, self.channel_time = sent, received, channel_time
        self.fingerprint = experiment_fingerprint(exp)
        self._exp_json = experiment_json(exp)
        self._plan = request_plan(exp.method)
        self.adapter_spec = state_spec(trainer.adapter())
        self.head_spec = state_spec(trainer.head())
        self.update_spec = update_spec(trainer.model)
        self.cond_spec, self.detector_spec = stage.gated.contracts() if stage else (None, None)
        k = getattr(exp.method, "dp_subspace_dim", None)  # last_layer: the head refit's basis
        self.refit_basis_spec = refit_basis_spec(self.head_spec, k) if k is not None else None

    def submit(self, round_: int, split: str, want: str) -> Pending:
        """Send round ``round_``'s request (or, without ``channel.submit``, prepare to send it
        when collected).

        Raises:
            protocol.codec.PayloadError: the request would violate the payload policy.
        """
        req = RoundRequest(round=round_, split=split, want=want, method=self.exp.method.name,
                           stage=self._plan.stage[want], fingerprint=self.fingerprint,
                           protocol=PROTOCOL_VERSION, experiment=self._exp_json)
        stage = self.stage
        content = make_request(self.trainer.adapter(), self.trainer.head() if sends_head(req) else None, req,
                               adapter_spec=self.adapter_spec, head_spec=self.head_spec,
                               cond_adapter=stage.cond_state() if stage else None,
                               detector=stage.detector_state() if stage else None,
                               cond_spec=self.cond_spec, detector_spec=self.detector_spec,
                               refit_basis=(self.trainer.feature_basis(self.exp.method.dp_subspace_dim)
                                            if want == "head" else None),
                               refit_basis_spec=self.refit_basis_spec)
        mtype = message_type_for(req)
        digest = payload_digest(content)
        append_jsonl(self.audit_path, {"direction": "sent", "message_type": mtype, "round": round_,
                                       **digest, "time": now()})
        self.sent += digest["bytes"]
        t0 = time.perf_counter()
        if hasattr(self.channel, "submit"):
            handle = self.channel.submit(mtype, content)
            fetch = lambda: self.channel.receive(handle)  # noqa: E731
        else:
            fetch = lambda: self.channel.send(mtype, content)  # noqa: E731
        self.channel_time += time.perf_counter() - t0
        return Pending(req, mtype, fetch)

    def collect(self, pending: Pending) -> Reply:
        """Wait for a submitted request's reply; log and check it.

        Raises:
            AuditorError: the auditor refused or did not answer.
            protocol.codec.PayloadError: the reply violates the payload policy.
        """
        t0 = time.perf_counter()
        reply = pending.fetch()
        self.channel_time += time.perf_counter() - t0
        digest = payload_digest(reply)
        append_jsonl(self.audit_path, {"direction": "received", "message_type": pending.message_type,
                                       "round": pending.req.round, **digest, "time": now()})
        self.received += digest["bytes"]
        return parse_reply(reply, pending.req, self.adapter_spec, self.update_spec, head_spec=self.head_spec,
                           cond_spec=self.cond_spec)

    def ask(self, round_: int, split: str, want: str) -> Reply:
        """:meth:`submit` then :meth:`collect`."""
        return self.collect(self.submit(round_, split, want))
