"""The fairsplit CLI: config errors are reported with the key, the co-located runner works."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from deploy.cli import app

runner = CliRunner()

GOOD = """
[experiment]
rounds = 2
local_steps = 2
batch_size = 16
[experiment.model]
kind = "timm"
name = "vit_tiny_patch16_224"
pretrained = false
overrides = { img_size = 32, patch_size = 8, depth = 1, embed_dim = 32, num_heads = 2 }
[experiment.lora]
r = 2
[developer.data]
kind = "synthetic"
n = 400
[auditor.data]
kind = "synthetic"
n = 400
sensitive = true
"""


def test_unknown_key_is_named(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(GOOD.replace("r = 2", "r = 2\nrank = 4"))
    res = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "o"), "--colocated"])
    assert res.exit_code == 2
    assert "experiment.lora.rank" in res.output and "unknown key" in res.output


def test_wrong_type_is_named(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(GOOD.replace("rounds = 2", 'rounds = "two"'))
    res = runner.invoke(app, ["run", "--config", str(cfg), "--colocated"])
    assert res.exit_code == 2 and "experiment.rounds" in res.output


def test_colocated_run_writes_results(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "run.toml"
    cfg.write_text(GOOD)
    out = tmp_path / "o"
    res = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--colocated"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["transport"] == "colocated" and results["rounds"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    show = runner.invoke(app, ["show", str(out / "results.json")])
    assert show.exit_code == 0 and "demographic_parity_difference" in show.output
