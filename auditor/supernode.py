"""Flower's ``flower-supernode``, with a shorter idle poll of the SuperLink.

flwr 1.41's SuperNode asks the SuperLink for a new message, and when there is none sleeps a
fixed 3 s (0.5 s while it waits for the ClientApp's reply); neither is configurable. With one
message per round that adds up to 3 s to every round. This wrapper runs the unmodified SuperNode
(same command-line flags; ``python -m fairsplit.auditor.supernode --help``) with those sleeps capped at
``FAIRSPLIT_SUPERNODE_POLL`` seconds (default 0.2): the SuperNode then polls about five times a
second, each poll one small authenticated HTTPS request to the developer's SuperLink.
Set ``FAIRSPLIT_SUPERNODE_POLL=3`` for Flower's own behaviour.

It also starts retrying a payload object that is not on the SuperLink yet after 50 ms instead of
Flower's 1 s (the message header can arrive before its payload). Only the SuperNode loop in
``flwr.supernode.start_client_internal`` is affected.
"""

from __future__ import annotations

import os
import sys
import time as _time

__all__ = ["CappedSleep", "main"]


class CappedSleep:
    """Stands in for the ``time`` module: ``sleep(s)`` sleeps ``min(s, cap)``; all else is ``time``.

    Raises:
        ValueError: ``cap`` is not a positive number of seconds.
    """

    def __init__(self, cap: float):
        if not cap > 0:
            raise ValueError(f"poll interval must be > 0 seconds, got {cap}")
        self.cap = cap

    def __getattr__(self, name: str):
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        """Sleep ``min(seconds, cap)``."""
        _time.sleep(min(seconds, self.cap))


def main() -> None:
    """Entry point: patch the SuperNode loop's sleeps, then run ``flower-supernode``."""
    from flwr.supernode.cli import flower_supernode

    from .flower_compat import patch_supernode_loop

    patch_supernode_loop(CappedSleep(float(os.environ.get("FAIRSPLIT_SUPERNODE_POLL", "0.2"))))
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
