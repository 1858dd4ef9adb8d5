"""The auditor's audit log: one JSON line per payload received or sent (``state_dir/audit.jsonl``).

Same fields as the developer's ``audit.jsonl``: ``direction`` (``received``/``sent``),
``message_type``, ``round``, ``records``, ``bytes``, ``sha256`` (from
:func:`protocol.codec.payload_digest`), ``time``; plus the experiment (``fingerprint``), the
Flower ``run_id`` (None co-located), under DP the ε the experiment is charged (``epsilon_run``)
and the ledger's total (``epsilon_total``), ``cached`` for a reply answered before, and for a
refused request ``error`` (the error's class name; no data).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from fairsplit.protocol.codec import payload_digest
from fairsplit.protocol.fileio import append_line

__all__ = ["AuditLog", "now", "request_round"]


def now() -> str:
    """UTC wall-clock time for audit lines (ISO 8601, milliseconds); same format as the developer's."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def request_round(content) -> int | None:
    """The round a (possibly malformed) request claims, for the audit log; None if unreadable."""
    try:
        value = content["config"]["round"]
    except Exception:  # noqa: BLE001 - any malformed payload
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class AuditLog:
    """Appends audit lines for one experiment to ``path`` (no-op when ``path`` is None).

    ``epsilons``: returns the ε fields to add to every line (``{}`` without DP).
    """

    def __init__(self, path: Path | None, fingerprint: str, epsilons: Callable[[], dict]):
        self.path, self.fingerprint, self.epsilons = path, fingerprint, epsilons

    def write(self, direction: str, message_type: str, round_: int | None, content,
              error: str | None = None, at: str | None = None, run_id: int | None = None,
              cached: bool = False) -> None:
        """Append one line (``at``: the event's time, default now).

        Raises:
            OSError: the log cannot be written.
        """
        if self.path is None:
            return
        try:
            digest = payload_digest(content)
        except Exception:  # noqa: BLE001 - a payload too malformed to summarise
            digest = {"records": None, "bytes": None, "sha256": None}
        line = {"direction": direction, "message_type": str(message_type), "round": round_,
                **digest, "time": at or now(), "fingerprint": self.fingerprint, "run_id": run_id,
                **self.epsilons()}
        if cached:
            line["cached"] = True
        if error is not None:
            line["error"] = error
        append_line(self.path, json.dumps(line))
