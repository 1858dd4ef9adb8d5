"""`fairsplit report`: a self-contained HTML page on finished runs, checked in a real headless
Chromium where one is installed (Debian's `chromium`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from flower_helpers import tiny_run

from fairsplit.deploy.colocated import run_colocated
from fairsplit.deploy.report import build_report, compare_logs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    outs = []
    for seed in (0, 1):
        # run 0 under the auditor's default DP (no per-group table crosses), run 1 exact releases
        run = tiny_run("erm", rounds=2, private=seed == 0, state_dir=str(base / f"run{seed}" / "auditor"))
        run.experiment.seed = seed
        run_colocated(run, base / f"run{seed}")
        outs.append(base / f"run{seed}")
    return outs


def test_report_is_self_contained_and_complete(two_runs, tmp_path):
    page = build_report(two_runs, tmp_path / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from a network
    assert page.count('<img class="chart"') == 2 + 1  # curves, trade-off, the exact run's groups
    results = [json.loads((r / "results.json").read_text()) for r in two_runs]
    assert results[0]["metrics"]["per_group"] == {} and results[1]["metrics"]["per_group"]
    assert page.count("Not released: under the auditor's differential privacy") == 1
    for res in results:
        assert res["fingerprint"] in page
        for group, stats in res["metrics"]["per_group"].items():
            assert f"<td>{group}</td><td>{stats['n']}</td><td>{stats['accuracy']:.4f}</td>" in page
    assert "demographic_parity_difference</code></td><td>largest difference in selection rate" in page
    assert page.count('data-logs="agree"') == 2  # both parties' logs at hand and equal
    assert results[0]["privacy"]["dp"]  # tiny_run keeps the auditor's default DP: ε in words
    eps = results[0]["privacy"]["epsilon_run"]
    assert f"ε = {eps:.2f} (δ = 1e-05): from everything released" in page


def test_log_comparison_finds_a_difference(two_runs):
    dev = [json.loads(x) for x in (two_runs[0] / "audit.jsonl").read_text().splitlines()]
    aud = [json.loads(x) for x in (two_runs[0] / "auditor" / "audit.jsonl").read_text().splitlines()]
    fp = json.loads((two_runs[0] / "results.json").read_text())["fingerprint"]
    assert compare_logs(dev, aud, fp)["status"] == "agree"
    aud[1] = {**aud[1], "sha256": "0" * 64}  # one payload the auditor logged differently
    assert compare_logs(dev, aud, fp)["status"] == "differ"
    assert compare_logs(dev, None, fp)["status"] == "no auditor log"


def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the page is not rendered")
    page = build_report(two_runs, tmp_path / "report.html")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--window-size=1300,2200"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("L").getextrema()
    assert colours[0] < 100 < colours[1]  # text and charts drawn, not a blank page
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    n = 2 + 1  # curves, trade-off, the exact run's groups
    assert f'data-charts-ok="{n}/{n}"' in dom  # every embedded chart decoded (naturalWidth > 0)
