"""The auditor's privacy state on disk: where it lives, what makes it complete, the stored replies.

Everything that bounds what a developer can learn lives in one folder, ``state_dir``, shared by
every experiment the auditor serves and every process it runs (one lock, ``state_dir/.lock``):

* ``privacy_ledger.json``: the ledger (:class:`auditor.privacy.Ledger`): every release's DP
  event, and the journal of answers (key, request hash, release number);
* ``runs.json``: the run registry (:class:`auditor.privacy.RunRegistry`, ``max_runs``);
* ``secret.key``: the auditor's secret (:class:`auditor.privacy.AuditorSecret`);
* ``<fingerprint>/replies/<round>_<split>_<want>.pt``: each answer as it was sent; a second
  request for an answered (fingerprint, round, split, want) gets it back byte for byte;
* ``<fingerprint>/state.pt`` and ``audit.jsonl``: per-round snapshots and the audit log
  (:mod:`auditor.service`).

Under differential privacy the auditor refuses to start without a writable ``state_dir``
(launchers choose one: :func:`default_state_dir`), and it refuses to start when one of the
three privacy files is missing, truncated or corrupt while anything else in the folder shows that
releases were made: a budget or a run cap never restarts from zero.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from flwr.app import RecordDict

from fairsplit.protocol.fileio import FileLock, atomic_write_bytes

from . import privacy as P
from .records import load_records, records_bytes

__all__ = ["PrivacyState", "PrivacyStateError", "default_state_dir"]

log = logging.getLogger(__name__)

LEDGER_FILE, RUNS_FILE, SECRET_FILE, AUDIT_FILE = "privacy_ledger.json", "runs.json", "secret.key", "audit.jsonl"


class PrivacyStateError(RuntimeError):
    """The auditor's privacy state is missing, incomplete, unreadable or not writable: the
    auditor does not start (it never starts a new ledger over earlier releases)."""


def default_state_dir(superlink: str) -> Path:
    """The auditor's state folder for the SuperLink it serves, under the user's state directory.

    ``$FAIRSPLIT_STATE_HOME`` if set, else ``$XDG_STATE_HOME/fairsplit`` (default
    ``~/.local/state/fairsplit``), then ``auditor/<superlink>`` with every character other
    than letters, digits, ``.``, ``_`` and ``-`` replaced by ``_`` (``127.0.0.1_9092``).
    """
    base = os.environ.get("FAIRSPLIT_STATE_HOME")
    if not base:
        xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        base = str(Path(xdg) / "fairsplit")
    return Path(base) / "auditor" / re.sub(r"[^A-Za-z0-9._-]", "_", superlink)


def _releases_made(state_dir: Path) -> list[str]:
    """What in ``state_dir`` (other than the ledger, registry and secret) shows releases were made."""
    found = []
    replies = sorted(state_dir.glob("*/replies/*.pt"))
    if replies:
        found.append(f"{len(replies)} stored replies ({replies[0].parent.parent.name[:12]}/replies/...)")
    states = sorted(state_dir.glob("*/state.pt"))
    if states:
        found.append(f"{len(states)} experiment state file(s)")
    audit = state_dir / AUDIT_FILE
    if audit.is_file():
        with open(audit, encoding="utf-8", errors="replace") as fh:
            if any('"direction": "sent"' in line for line in fh):
                found.append(f"{AUDIT_FILE} with sent replies")
    return found


def _reply_key(path: Path) -> tuple[str, tuple | None]:
    """(fingerprint, (round, split, want)) of a stored reply's path; the key is None if the name
    is not a reply's."""
    r, _, rest = path.stem.partition("_")
    split, _, want = rest.partition("_")
    if not r.isdigit() or not split or not want:
        return path.parent.parent.name, None
    return path.parent.parent.name, (int(r), split, want)


class PrivacyState:
    """The auditor's privacy state in ``state_dir`` (see the module doc), opened and checked.

    Args:
        state_dir: the folder (created with mode 0700 if missing).
        max_runs: ``[auditor] max_runs``.
        privacy: ``[auditor.privacy]``; without DP (``enabled = false``) there is no ledger and
            no secret, only the run registry.

    Raises:
        PrivacyStateError: the folder is not writable; a privacy file is unreadable or truncated;
            one is missing while the others, stored replies, state or the audit log show that
            releases were made.
    """

    def __init__(self, state_dir: Path, max_runs: int, privacy) -> None:
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.lock = FileLock(self.dir)  # the folder itself: it cannot be deleted while in use
            with self.lock:
                pass
        except OSError as err:
            raise PrivacyStateError(f"the auditor's state_dir {self.dir} is not writable ({err}); "
                                    "the privacy ledger must live on disk") from None
        if not os.access(self.dir, os.W_OK):
            raise PrivacyStateError(f"the auditor's state_dir {self.dir} is not writable")
        self.dp = bool(privacy.enabled)
        with self.lock:
            self._check_complete()
            try:
                self.runs = P.RunRegistry(max_runs, self.dir / RUNS_FILE, lock=self.lock)
                self.ledger = (P.Ledger(privacy.delta, privacy.epsilon_budget, self.dir / LEDGER_FILE,
                                        lock=self.lock, report_fraction=privacy.report_epsilon_fraction)
                               if self.dp else None)
                self.secret = P.AuditorSecret(self.dir) if self.dp else None
            except ValueError as err:
                raise PrivacyStateError(f"{err}. The auditor does not start over a damaged privacy "
                                        "state: restore the file's latest copy (an older copy "
                                        "reopens answered queries and is refused)") from None
            # written now, so that a later deletion is seen
            if not (self.dir / RUNS_FILE).is_file():
                self.runs.save()
            if self.dp and not (self.dir / LEDGER_FILE).is_file():
                self.ledger.save()
            if self.dp:
                self._check_consistent()
                self._journal_stored_replies()

    def _check_consistent(self) -> None:
        """The ledger is not older than the registry and the stored replies: every registered
        experiment was charged (the plan is charged before the experiment is registered), and
        under a ledger with a journal (format 2) every stored reply is journalled.

        Raises:
            PrivacyStateError: naming what the ledger lacks.
        """
        charged = {e["fingerprint"] for e in self.ledger.events}
        uncharged = [f for f in self.runs.fingerprints if f not in charged]
        stray = []
        if self.ledger.format >= 2:
            for path in self.dir.glob("*/replies/*.pt"):
                fp, key = _reply_key(path)
                if key is not None and key not in self.ledger.reserved_keys(fp):
                    stray.append(f"{fp[:12]}/{path.name}")
        if uncharged or stray:
            raise PrivacyStateError(
                f"the privacy ledger in {self.dir} is older than the rest of the state: "
                + (f"{len(uncharged)} registered experiment(s) have no charge in it; " if uncharged else "")
                + (f"{len(stray)} stored replies are not in its journal (e.g. {stray[0]}); " if stray else "")
                + "an older ledger would reopen answered queries. Restore its latest copy")

    def _journal_stored_replies(self) -> None:
        """Stored replies that the journal lacks (a ledger of format 1, before the journal) are
        journalled as answered by an unknown request: another answer to them is charged."""
        for path in sorted(self.dir.glob("*/replies/*.pt")):
            fingerprint, key = _reply_key(path)
            if key is None:
                continue
            if key not in self.ledger.reserved_keys(fingerprint):
                self.ledger.reserve(fingerprint, key, "unknown: stored before the journal")

    def _check_complete(self) -> None:
        files = [RUNS_FILE] + ([LEDGER_FILE, SECRET_FILE] if self.dp else [])
        present = [f for f in (RUNS_FILE, LEDGER_FILE, SECRET_FILE) if (self.dir / f).is_file()]
        missing = [f for f in files if f not in present]
        if not missing:
            return
        # the ledger and registry are written only by an auditor that served; a secret alone
        # (written ahead, e.g. a benchmark's fixed one) shows nothing was released
        evidence = [f for f in present if f != SECRET_FILE] + _releases_made(self.dir)
        if evidence:
            raise PrivacyStateError(
                f"the auditor's state_dir {self.dir} lacks {', '.join(missing)} but holds "
                f"{', '.join(evidence)}: releases were made, and starting a new "
                f"{'ledger' if LEDGER_FILE in missing else 'record'} would reset the privacy "
                "budget or the run cap. Restore the missing file(s)' latest copy; only a new "
                "developer gets a new, empty state_dir")

    # -- the stored replies --------------------------------------------------------------------
    def reply_path(self, fingerprint: str, key: tuple) -> Path:
        """Where the answer to ``key`` = (round, split, want) of ``fingerprint`` is stored."""
        return self.dir / fingerprint / "replies" / f"{key[0]}_{key[1]}_{key[2]}.pt"

    def reply(self, fingerprint: str, key: tuple) -> RecordDict | None:
        """The stored answer to ``key``, or None. An unreadable file counts as none (logged): a new
        answer is then computed with new noise and, for another request, charged again."""
        path = self.reply_path(fingerprint, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return load_records(data)
        except Exception as err:  # noqa: BLE001 - a damaged file: the journal still holds the key
            log.warning("stored reply %s is unreadable (%s: %s); it will be answered anew and "
                        "charged if the request differs", path, type(err).__name__, err)
            return None

    def store_reply(self, fingerprint: str, key: tuple, reply: RecordDict) -> None:
        """Store the answer to ``key`` (atomically)."""
        atomic_write_bytes(self.reply_path(fingerprint, key), records_bytes(reply))
