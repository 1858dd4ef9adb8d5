"""The auditor's private randomness: every random draw of a release derives from a secret only
the auditor holds, keyed by the ledger's release number (``docs/privacy.md``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from fairsplit.protocol.fileio import atomic_write_bytes

__all__ = ["AuditorSecret", "NoRelease"]


class AuditorSecret:
    """32 random bytes only the auditor holds; every random draw of its releases derives from it.

    With a ``state_dir`` the secret is ``state_dir/secret.key`` (mode 0600, written atomically
    on first use; :class:`auditor.state.PrivacyState` refuses to start when it is missing while
    releases were made); without one it lives in memory for the life of the process.

    The auditor draws only through :meth:`for_release`: every draw of one answer is keyed by the
    ledger's release number, so two distinct answers never share noise (``docs/privacy.md``).

    Raises:
        ValueError: ``secret.key`` is not 32 bytes.
    """

    def __init__(self, state_dir: Path | None):
        path = Path(state_dir) / "secret.key" if state_dir is not None else None
        if path is not None and path.is_file():
            key = path.read_bytes()
            if len(key) != 32:
                raise ValueError(f"{path} must hold 32 bytes, found {len(key)}")
        else:
            key = os.urandom(32)
            if path is not None:
                atomic_write_bytes(path, key, mode=0o600)
        self._key = key

    def seed(self, *keys) -> int:
        """A 128-bit seed for ``keys`` (str/int), unpredictable without the secret."""
        msg = json.dumps([str(k) for k in keys]).encode()
        return int.from_bytes(hashlib.blake2b(msg, key=self._key, digest_size=16).digest(), "big")

    def rng(self, *keys) -> np.random.Generator:
        """A NumPy generator for ``keys``."""
        return np.random.default_rng(self.seed(*keys))

    def generator(self, *keys) -> torch.Generator:
        """A CPU torch generator for ``keys``."""
        return torch.Generator().manual_seed(self.seed(*keys) % (2 ** 63))

    def for_release(self, release: int | str) -> "AuditorSecret":
        """The secret as one release sees it: every seed also keyed by ``release``
        (:meth:`Ledger.noise_key`: its number and nonce)."""
        return _ReleaseSecret(self, str(release))


class _ReleaseSecret(AuditorSecret):
    """:class:`AuditorSecret` bound to one release number (:meth:`AuditorSecret.for_release`)."""

    def __init__(self, parent: AuditorSecret, release: str):
        self._parent, self.release_id = parent, release

    def seed(self, *keys) -> int:
        return self._parent.seed("release", self.release_id, *keys)

    def for_release(self, release: int | str) -> "AuditorSecret":
        raise RuntimeError("a release's secret cannot open another release")


class NoRelease:
    """Stands for the secret outside an answer: any draw is a programming error, not a release."""

    def __getattr__(self, name):
        raise RuntimeError("the auditor's randomness is drawn only inside a release "
                           "(AuditorSecret.for_release with the ledger's release number)")
