"""The co-located reference runner: both parties in one process, no Flower.

Same code, seeds, batches and payloads as a split run: the developer's loop sends the very
``RecordDict`` it would send over Flower, and the auditor's service parses it with the same
checks. Only the transport differs, so this is the reference for correctness and speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from flwr.app import RecordDict

from fairsplit.auditor.host import AuditorHost
from fairsplit.auditor.service import AuditorService
from fairsplit.developer.loop import AuditorError, run_experiment
from fairsplit.deploy.config import RunFile

__all__ = ["DirectChannel", "run_colocated"]


class DirectChannel:
    """:class:`developer.loop.AuditorChannel` that calls an in-process :class:`AuditorService`.

    Exceptions raised by the service become :class:`AuditorError`, as a Flower error reply would.
    """

    def __init__(self, service: AuditorService | AuditorHost):
        self.service = service

    def send(self, message_type: str, content: RecordDict) -> RecordDict:
        """Hand ``content`` to the auditor service and return its reply."""
        try:
            return self.service.handle(message_type, content)
        except Exception as err:  # same surface as Flower's error reply
            raise AuditorError(f"auditor refused the request: {type(err).__name__}: {err}") from err


def run_colocated(run: RunFile, out_dir: Path, on_round: Callable[[dict], None] | None = None,
                  resume: bool = False, host: AuditorHost | None = None) -> dict:
    """Run one experiment with both parties in this process; returns ``results.json``'s dict.

    A fresh :class:`AuditorHost` is built from ``run.auditor`` (and ``run.tune``) unless
    ``host`` is given (many runs on one auditor: a study). Its privacy state (ledger, run
    registry, secret, answers), per-round state and audit log live in ``auditor.state_dir``,
    by default ``out_dir/auditor`` (as ``fairsplit run``): a resumed run finds them there.

    Args:
        on_round: called with each metrics row after the row and the checkpoint are written.
        resume: continue from ``out_dir/checkpoint`` (see :func:`developer.loop.run_experiment`).
        host: the auditor to ask (its search space must admit ``run.experiment``).

    Raises:
        developer.loop.CheckpointMismatch: ``resume`` with a checkpoint of another experiment.
        AuditorError: the auditor refused a request.
        protocol.metrics.SmallGroupError: an evaluation group below ``min_group_size``, found
            before training (naming the groups and their sizes).
    """
    if host is None:
        if run.auditor.state_dir is None:
            run = run.model_copy(update={"auditor": run.auditor.model_copy(
                update={"state_dir": Path(out_dir) / "auditor"})})
        host = AuditorHost(run.experiment, run.auditor, run.tune)
        host.check()  # small evaluation groups: refused before the developer trains
    return run_experiment(run.experiment, run.developer, DirectChannel(host), Path(out_dir),
                          transport="colocated", on_round=on_round, resume=resume)
