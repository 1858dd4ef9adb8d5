"""Shared fixtures for the unit tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

#: The shared folder beside the repository (data sets, model weights); absent on most machines.
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """``../shared`` relative to the repository root (may not exist; see ``shared_path``)."""
    return SHARED_DIR


@pytest.fixture
def shared_path() -> Callable[[str], Path]:
    """``shared_path("data/adult")``: that path under ``../shared``, or skip the test if absent."""

    def get(rel: str) -> Path:
        p = SHARED_DIR / rel
        if not p.exists():
            pytest.skip(f"{rel} not available under {SHARED_DIR}")
        return p

    return get


@pytest.fixture(autouse=True)
def _private_state_home(tmp_path_factory, monkeypatch):
    """Launchers' default auditor state folders go to a temp dir, never the user's."""
    monkeypatch.setenv("FAIRSPLIT_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))


@pytest.fixture
def flwr_env(tmp_path, monkeypatch):
    """Flower's home and the decoded-data cache in the test's temp dir, telemetry off: for tests
    that start real ``flower-superlink`` / ``flower-supernode`` processes."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
