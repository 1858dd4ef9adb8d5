"""The developer's ledgers at the auditor: the run registry (``max_runs``) and the privacy
ledger (every release of every run, composed per part, and the journal of answers).

Both are JSON files in the auditor's ``state_dir`` that every process of it shares
(:class:`_SharedJson`: re-read under the folder's lock when changed, written atomically).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from fairsplit.protocol.fileio import FileLock, atomic_write_bytes
from fairsplit.protocol.privacy import PublicRefusal

from .accounting import PARTS, is_report, part_epsilon

__all__ = ["BudgetExceeded", "Ledger", "OutOfPlan", "RunLimitExceeded", "RunRegistry"]

log = logging.getLogger(__name__)

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


class Ledger(_SharedJson):
    """The privacy ledger of one developer: every release of every run, composed per part, and
    the journal of the answers made.

    Events are dicts ``{"fingerprint", "part", "kind": "gaussian" | "sampled", "sigma", "q",
    "count"}``. ε of a set of events is the RDP composition (``dp-accounting``) of each part's
    events, converted at ``delta``, and the maximum over parts (the parts are disjoint).

    ``budget`` caps every part's composition; the reports on each report part (val, test: the
    events :func:`auditor.accounting.is_report`, not a method's own evaluations) are also capped
    at ``budget × report_fraction`` (:attr:`PrivacyConfig.report_epsilon_fraction`: runs spend
    that share of their ε on each part's reports, so the caps hold the same number of runs, and a
    developer that spends runs on reports alone gets no more report queries than one that trains).

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

    def __init__(self, delta: float, budget: float, path: Path | None = None, lock: FileLock | None = None,
                 report_fraction: float = 1.0):
        self.delta, self.budget, self.report_fraction = delta, budget, report_fraction
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

    def part_budget(self, part: str) -> float:
        """The cap on the composed ε of ``part``'s reports: ``budget × report_fraction`` on a
        report part (val, test); on the training part, and on every part's whole composition,
        ``budget``."""
        return self.budget * (1.0 if part == "auditor_train" else self.report_fraction)

    def check(self, extra: list[dict], what: str) -> None:
        """Refuse (:class:`BudgetExceeded`) if ``extra`` would take any part of the ledger past
        ``budget``, or the reports of a report part past :meth:`part_budget`."""
        with self._locked():
            self._sync()
            events, more = self.events, list(extra)
            limits = [("", part_epsilon(events, self.delta), part_epsilon(events + more, self.delta),
                       lambda part: self.budget)]
            if self.report_fraction < 1.0:
                reports = [e for e in events if is_report(e)]
                limits.append(("reports", part_epsilon(reports, self.delta),
                               part_epsilon(reports + [e for e in more if is_report(e)], self.delta),
                               self.part_budget))
            for which, now, after, cap in limits:
                for part in PARTS:
                    if after[part] > cap(part) + 1e-9:
                        name = (f" (the {part} part's {which}: epsilon_budget × report_epsilon_fraction "
                                f"= {cap(part):g})" if which else "")
                        raise BudgetExceeded(
                            f"{what} would spend the privacy budget{name}: epsilon_budget = {self.budget:g} "
                            f"(delta = {self.delta:g}), spent {now[part]:.3f}, after it {after[part]:.3f}")

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
        if e.get("use"):
            key["use"] = e["use"]
        same = next((x for x in self.events if all(x.get(k) == v for k, v in key.items())
                     and x.get("use") == e.get("use")), None)
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
