"""The auditor's per-round state: one snapshot per answered round, so answers are repeatable.

State between rounds (the adversary or sensitive classifier, the sensitive LoRA's A_s, the
unlearning update ΔW_s) is one ``RecordDict`` per answered round. The request for round r starts
from the snapshot of the latest earlier round (none for round 0), never from "whatever came
last", so a request re-sent after a crash of either party, even after later rounds were
answered, gets a bit-identical reply. Where snapshots live:

* ``state_dir/<fingerprint>/state.pt`` when the auditor has a ``state_dir`` (surviving
  restarts): ``torch.save`` of ``{"format": 1, "fingerprint", "pruned": [rounds dropped],
  "snapshots": {round: records as in auditor.records.records_to_plain}}``, replaced atomically;
* else the caller's ``RecordDict`` (Flower's ``context.state``, which survives the per-message
  ClientApp processes of one Flower run), under ``fairsplit.snapshot.<round>.<record name>``
  and an index record ``fairsplit.snapshots``;
* else this object's memory.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict

from fairsplit.protocol.fileio import atomic_write_bytes

from .records import records_from_plain, records_to_plain

__all__ = ["KEEP_ROUNDS", "Snapshots", "StateUnavailable"]

_SNAP_INDEX = "fairsplit.snapshots"  # index record when snapshots live in the caller's RecordDict
_SNAP_PREFIX = "fairsplit.snapshot."
_STATE_FORMAT = 1

#: Snapshots kept (the latest rounds); older ones are dropped and a request needing one is refused.
KEEP_ROUNDS = 3


class StateUnavailable(RuntimeError):
    """The state a request's round must start from was discarded (or belongs to another experiment)."""


def copy_records(snapshot: RecordDict | None) -> RecordDict:
    """A new RecordDict holding the same records (records are replaced, never mutated, in place)."""
    out = RecordDict()
    for name, rec in (snapshot or {}).items():
        out[name] = rec
    return out


class Snapshots:
    """The per-round snapshots of one experiment.

    Args:
        fingerprint: the experiment's fingerprint (``state.pt`` of another one is refused).
        state_path: ``state_dir/<fingerprint>/state.pt``, or None (the caller's records or memory).
        keep_rounds: how many snapshots to keep (those nearest the latest round written).

    Raises:
        ValueError: ``keep_rounds`` < 1.
    """

    def __init__(self, fingerprint: str, state_path: Path | None, keep_rounds: int = KEEP_ROUNDS):
        if keep_rounds < 1:
            raise ValueError("keep_rounds must be at least 1")
        self.fingerprint, self.state_path, self.keep_rounds = fingerprint, state_path, keep_rounds
        self._snapshots: dict[int, RecordDict] = {}  # round -> state after answering it
        self._pruned: set[int] = set()  # rounds whose snapshot was dropped
        self._disk_stamp: tuple | None = None  # (inode, mtime, size) of state.pt last read/written

    def start(self, round_: int, state: RecordDict | None, lost_if_none: bool) -> RecordDict:
        """A working copy of the snapshot of the latest round before ``round_`` (empty if none).

        ``lost_if_none``: the method keeps state from round 0 on, so no snapshot before a round
        > 0 means it was lost (not never made).

        Raises:
            StateUnavailable: the snapshot needed was discarded or lost.
        """
        self.refresh(state)
        base = max((r for r in self._snapshots if r < round_), default=None)
        lost = sorted(p for p in self._pruned if p < round_ and (base is None or p > base))
        if lost:
            raise StateUnavailable(
                f"the auditor's state after round {lost[-1]} was discarded (it keeps the last "
                f"{self.keep_rounds} rounds); cannot recompute round {round_}")
        if base is None and round_ > 0 and lost_if_none:
            raise StateUnavailable(
                f"the auditor holds no state from before round {round_} (restarted without "
                "auditor.state_dir, or a new Flower run); it cannot answer as it did the first time")
        return copy_records(self._snapshots.get(base) if base is not None else None)

    def keep(self, round_: int, work: RecordDict, state: RecordDict | None) -> None:
        """Store ``work`` as the snapshot after ``round_``, keep the ``keep_rounds`` snapshots
        nearest to ``round_`` (in a run: the latest rounds), drop the others, persist.

        Nearest, not latest: when an experiment goes back (a new run of it from round 0 on a
        long-lived auditor, or a developer resumed from an earlier checkpoint) the state just
        written is the one the next request needs; dropping "the oldest" would drop it.
        """
        self._snapshots[round_] = work
        keep = sorted(self._snapshots, key=lambda r: (abs(r - round_), r))[:self.keep_rounds]
        for r in [r for r in self._snapshots if r not in keep]:
            del self._snapshots[r]
            self._pruned.add(r)
        self._pruned -= set(self._snapshots)
        if self.state_path is not None:
            self._write_disk()
        elif state is not None:
            self._write_records(state)

    def after(self, round_: int, state: RecordDict | None) -> RecordDict | None:
        """A copy of the snapshot kept after ``round_``, or None."""
        self.refresh(state)
        snap = self._snapshots.get(round_)
        return None if snap is None else copy_records(snap)

    def latest_with(self, *names: str) -> tuple | None:
        """The records ``names`` from the latest kept snapshot holding all of them, or None."""
        for _, snap in sorted(self._snapshots.items(), reverse=True):
            if all(n in snap for n in names):
                return tuple(snap[n] for n in names)
        return None

    def refresh(self, state: RecordDict | None) -> None:
        """Load the snapshots from ``state.pt`` (if changed since last read) or the caller's state.

        Raises:
            StateUnavailable: ``state.pt`` holds another experiment's state or another format.
        """
        if self.state_path is not None:
            try:
                st = os.stat(self.state_path)
            except FileNotFoundError:
                return
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._disk_stamp:
                self._read_disk()
                self._disk_stamp = stamp
        elif state is not None:
            self._read_records(state)

    def _write_disk(self) -> None:
        snaps = {r: records_to_plain(snap) for r, snap in self._snapshots.items()}
        buf = io.BytesIO()
        torch.save({"format": _STATE_FORMAT, "fingerprint": self.fingerprint,
                    "pruned": sorted(self._pruned), "snapshots": snaps}, buf)
        atomic_write_bytes(self.state_path, buf.getvalue())
        st = os.stat(self.state_path)
        self._disk_stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read_disk(self) -> None:
        obj = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if obj.get("format") != _STATE_FORMAT or obj.get("fingerprint") != self.fingerprint:
            raise StateUnavailable(f"{self.state_path} holds state for another experiment or format")
        self._snapshots = {int(r): records_from_plain(snap) for r, snap in obj["snapshots"].items()}
        self._pruned = set(int(p) for p in obj["pruned"])

    def _write_records(self, state: RecordDict) -> None:
        for name in [n for n in state.keys() if n.startswith(_SNAP_PREFIX) or n == _SNAP_INDEX]:
            del state[name]
        for r, snap in self._snapshots.items():
            for name, rec in snap.items():
                state[f"{_SNAP_PREFIX}{r}.{name}"] = rec
        state[_SNAP_INDEX] = ConfigRecord({"rounds": sorted(self._snapshots), "pruned": sorted(self._pruned)})

    def _read_records(self, state: RecordDict) -> None:
        if _SNAP_INDEX not in state:
            return
        index = state[_SNAP_INDEX]
        snaps: dict[int, RecordDict] = {int(r): RecordDict() for r in index["rounds"]}
        for name in state.keys():
            if name.startswith(_SNAP_PREFIX):
                r, rec_name = name[len(_SNAP_PREFIX):].split(".", 1)
                if int(r) in snaps:
                    snaps[int(r)][rec_name] = state[name]
        self._snapshots = snaps
        self._pruned = set(int(p) for p in index["pruned"])
