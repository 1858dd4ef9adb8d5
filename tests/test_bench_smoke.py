"""bench/bytes.py and bench/throughput.py on a tiny ViT and synthetic data: the last line is the
figure, the numbers are sane, and the byte accounting agrees with what a real run sends."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

TINY = """
[experiment]
rounds = 3
local_steps = 1
batch_size = 8
eval_every = 2
seed = 0
[experiment.model]
kind = "timm"
name = "vit_tiny_patch16_224"
pretrained = false
overrides = { img_size = 32, patch_size = 8, depth = 1, embed_dim = 32, num_heads = 2 }
[experiment.lora]
r = 2
[experiment.method]
METHOD_TABLE
[developer.data]
kind = "synthetic"
n = 200
[auditor]
min_group_size = 2
[auditor.data]
kind = "synthetic"
n = 200
sensitive = true
"""


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(tmp_path: Path, method: str = "erm") -> Path:
    p = tmp_path / f"tiny_{method}.toml"
    keys = {"name": method, **({"lam": 0.1, "auditor_batch_size": 16, "auditor_steps": 2}
                                 if method != "erm" else {})}
    text = TINY.replace("METHOD_TABLE", "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items()))
    if method != "erm":  # batch 16 and the older methods: exact releases (timing and byte studies)
        text = text.replace("[auditor.data]", "[auditor.privacy]\nenabled = false\n[auditor.data]")
    p.write_text(text)
    return p


def _figure(out: str, name: str) -> float:
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(rf"{name}=([0-9.]+)", last)
    assert m, f"last line {last!r} is not {name}=<number>"
    value = float(m.group(1))
    assert math.isfinite(value) and value > 0
    return value


def test_bytes_figure_and_monotone_in_rank(tmp_path, capsys):
    bench = _load("bytes")
    out_json = tmp_path / "bytes.json"
    assert bench.main(["--config", str(_config(tmp_path)), "--no-text", "--ranks", "4,8",
                       "--json", str(out_json)]) == 0
    figure = _figure(capsys.readouterr().out, "bytes_ratio_to_floor")
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert [r["rank"] for r in rows] == [4, 8]
    assert data["bytes_ratio_to_floor"] == pytest.approx(figure, abs=1e-4)
    for r in rows:
        assert r["floor_bytes"] == 4 * r["adapter_params"] > 0
        assert r["floor_bytes"] <= r["to_auditor_train_round"] < r["to_auditor_eval_round"]
        assert r["to_auditor_eval_round"] - r["to_auditor_train_round"] >= r["head_bytes"]
        assert r["from_auditor_signal"] >= r["floor_bytes"]  # the signal is adapter-shaped
        assert 0 < r["from_auditor_erm_eval"] < r["floor_bytes"]  # a report: aggregates only
    assert rows[1]["adapter_params"] == 2 * rows[0]["adapter_params"]
    assert rows[1]["to_auditor_eval_round"] > rows[0]["to_auditor_eval_round"]
    assert rows[1]["from_auditor_signal_eval"] > rows[0]["from_auditor_signal_eval"]
    assert rows[0]["from_auditor_unlearning_once"] > 0
    assert figure == pytest.approx(max(r["ratio_to_auditor"] for r in rows), abs=1e-4)


@pytest.mark.parametrize("method", ["erm", "adversarial"])
def test_bytes_run_totals_match_a_real_run(tmp_path, capsys, monkeypatch, method):
    """The schedule and the request sizes equal what developer/loop.py records in results.json."""
    from fairsplit.deploy.colocated import run_colocated
    from fairsplit.deploy.config import load_run_file

    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, method)
    bench = _load("bytes")
    out_json = tmp_path / "bytes.json"
    argv = ["--config", str(cfg), "--no-text", "--ranks", "2", "--json", str(out_json)]
    if method != "erm":
        argv += ["--signal-method", method]
    assert bench.main(argv) == 0
    capsys.readouterr()
    row = json.loads(out_json.read_text())["rows"][0]
    key = "erm" if method == "erm" else "signal"
    results = run_colocated(load_run_file(cfg), tmp_path / "run")
    assert results["bytes_to_auditor"] == row[f"run_{key}_to"]
    # Reports differ in their float values (digits), signals not at all: close, not equal.
    assert results["bytes_from_auditor"] == pytest.approx(row[f"run_{key}_from"], rel=0.2)
    audit = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    assert sum(a["direction"] == "sent" for a in audit) == row[f"run_{key}_messages"]


def test_throughput_figure(tmp_path, capsys):
    bench = _load("throughput")
    out_json = tmp_path / "tp.json"
    assert bench.main(["--config", str(_config(tmp_path)), "--steps", "2", "--reps", "2",
                       "--threads", "1", "--synthetic", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    figure = _figure(out, "throughput_ratio")
    assert "SYNTHETIC" in out
    data = json.loads(out_json.read_text())
    assert data["fairsplit_samples_per_s"] > 0 and data["plain_samples_per_s"] > 0
    assert len(data["reps_table"]) == 2
    assert figure == pytest.approx(data["fairsplit_samples_per_s"] / data["plain_samples_per_s"], abs=1e-4)
    assert data["trainable_params"] > 0


def test_penalty_snr_figure_is_the_dead_zone_at_the_calibrated_sigma(tmp_path, capsys):
    """bench/penalty_snr.py: σ is what the auditor's own calibration gives for the planned
    signals, the dead zone shrinks with fewer signals, and the last line is the config's."""
    from fairsplit.auditor.methods.penalty import dead_zone

    bench = _load("penalty_snr")
    out_json = tmp_path / "snr.json"
    assert bench.main(["--config", str(_config(tmp_path)), "--n-train", "500", "--batches", "100",
                       "--batch", "100", "--signals", "1", "--gaps", "0.3", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["signals"] for r in rows] == [3, 1]  # the config's 3 rounds first
    for r in rows:
        assert r["dead_zone"] == pytest.approx(dead_zone(r["sigma"], 100, 2), abs=2e-3)
        assert r["gap 0.3"] == pytest.approx(0.3 / (r["dead_zone"] / 3), rel=0.02)
    assert rows[1]["dead_zone"] < rows[0]["dead_zone"]
    assert _figure(out, "dead_zone_at_config") == pytest.approx(rows[0]["dead_zone"], abs=2e-3)


def test_per_example_grads_figure_is_loop_over_vmap(tmp_path, capsys):
    """bench/per_example_grads.py on DeiT-Tiny's architecture (random weights): the arms agree
    (the bench refuses otherwise) and the last line is the loop's median over vmap's."""
    bench = _load("per_example_grads")
    out_json = tmp_path / "peg.json"
    assert bench.main(["--backbone", "image", "--batch", "3", "--reps", "1", "--r", "2", "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert set(data["median"]) == {"batched", "vmap", "loop"}
    assert data["max_abs_difference"] < 1e-4
    figure = _figure(capsys.readouterr().out, "vmap_speedup")
    assert figure == pytest.approx(data["median"]["loop"] / data["median"]["vmap"], rel=0.01)


def test_throughput_refuses_text_models(tmp_path):
    bench = _load("throughput")
    cfg = tmp_path / "text.toml"
    cfg.write_text(_config(tmp_path).read_text().replace('kind = "timm"', 'kind = "hf_text"'))
    with pytest.raises(SystemExit):
        bench.main(["--config", str(cfg)])


@pytest.mark.flower
def test_overhead_and_round_latency_over_flower(tmp_path, capsys, monkeypatch):
    """The Flower benchmarks end to end on the tiny config (2 rounds, 1 repetition): the split
    overhead on a warm deployment, the round latency, and the per-run start-up."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    cfg = _config(tmp_path, "adversarial")
    overhead = _load("overhead")
    ratio = overhead.main(["--configs", str(cfg), "--reps", "1", "--rounds", "2", "--overlap", "on",
                           "--warm", "--json", str(tmp_path / "overhead.json")])
    assert _figure(capsys.readouterr().out, "overhead_ratio") == pytest.approx(ratio, abs=1e-4)
    data = json.loads((tmp_path / "overhead.json").read_text())["results"][0]
    assert data["overlap"] is True and data["warm"] is True
    assert len(data["walls"]["split"]) == len(data["walls"]["colocated"]) == 1
    split, colo = (r for r in sorted(data["runs"], key=lambda r: r["mode"], reverse=True))
    assert split["mode"] == "split" and split["accuracy"] == colo["accuracy"]  # same computation

    latency = _load("round_latency")
    med = latency.main(["--config", str(cfg), "--rounds", "2", "--json", str(tmp_path / "lat.json")])
    assert _figure(capsys.readouterr().out, "round_latency_s") == pytest.approx(med, abs=1e-3)
    lat = json.loads((tmp_path / "lat.json").read_text())
    assert [r["round"] for r in lat["rows"]] == [0, 1, 2, 2]  # signal 0, 1, val 2, test
    for r in lat["rows"]:
        assert 0 < r["auditor"] < r["round_trip"]

    runs = _load("runs")
    startup = runs.main(["--config", str(cfg), "--rounds", "1", "--runs", "2", "--cold", "1",
                         "--json", str(tmp_path / "runs.json")])
    assert _figure(capsys.readouterr().out, "per_run_startup_s") == pytest.approx(startup, abs=1e-3)
    res = json.loads((tmp_path / "runs.json").read_text())["result"]
    assert [(r["mode"], r["run"]) for r in res["runs"]] == [("warm", 0), ("warm", 1), ("cold", 0)]
    assert res["cold_startup_s"] > res["per_run_startup_s"]  # a fresh deployment starts processes


def test_staleness_runs_every_k_and_batch_with_the_same_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, "erm")
    text = cfg.read_text().replace("rounds = 3", "rounds = 4")
    text = text.replace("[auditor.data]", "[auditor.privacy]\nenabled = false\n[auditor.data]")  # a study of exact signals
    cfg.write_text(text + '\n[bench.methods.penalty]\nauditor_batch_size = 16\n')
    bench = _load("staleness")
    ratio = bench.main(["--config", str(cfg), "--methods", "penalty=0.5", "--ks", "1,2",
                        "--batches", "16,32", "--out", str(tmp_path / "st"), "--json", str(tmp_path / "st.json")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"staleness_eod_ratio=[0-9.]+", last) and float(last.split("=")[1]) == pytest.approx(ratio, abs=1e-4)
    data = json.loads((tmp_path / "st.json").read_text())
    assert [(r["method"], r["K"], r["auditor_batch"]) for r in data["rows"]] == [
        ("erm", 4, 0), ("penalty", 1, 16), ("penalty", 2, 16), ("penalty", 1, 32), ("penalty", 2, 32)]
    for tag, rounds in (("K1", 4), ("K2", 2)):  # same total steps, cut into rounds of K
        res = json.loads(next((tmp_path / "st").glob(f"penalty-lam0.5-b16-{tag}-*/results.json")).read_text())
        assert res["rounds"] == rounds and res["experiment"]["overlap"] is True
        assert res["experiment"]["local_steps"] * rounds == 4


def test_tune_seeds_reruns_default_and_chosen(tmp_path, capsys, monkeypatch):
    """bench/tune_seeds.py on a 2-trial co-located study: both configurations over 2 seeds."""
    from fairsplit.auditor.host import AuditorHost
    from fairsplit.deploy.colocated import run_colocated
    from fairsplit.deploy.tune import run_study
    from fairsplit.deploy.config import load_run_file

    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, "erm")
    cfg.write_text(cfg.read_text() + '\n[tune]\npruner = "none"\n[tune.space]\nr = [2, 4]\nlr = [1e-3, 1e-2]\n')
    run = load_run_file(cfg)
    run = run.model_copy(update={"auditor": run.auditor.model_copy(update={"state_dir": tmp_path / "study-auditor"})})
    host = AuditorHost(run.experiment, run.auditor, run.tune)
    run_study(run, tmp_path / "study", lambda r, f, cb: run_colocated(r, f, on_round=cb, host=host), trials=2)
    capsys.readouterr()
    bench = _load("tune_seeds")
    gain = bench.main([str(tmp_path / "study"), "--seeds", "2", "--control", "--json", str(tmp_path / "seeds.json")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"wga_gain=-?[0-9.]+", last) and float(last.split("=")[1]) == pytest.approx(gain, abs=1e-4)
    rows = json.loads((tmp_path / "seeds.json").read_text())["rows"]
    assert [len(r["seeds"]) for r in rows] == [2, 2, 2]  # default, chosen, control
    assert rows[0]["config"].endswith("default placement (trial 0)")
    assert rows[0]["seeds"][0] != rows[0]["seeds"][1]  # the seed changes the run


def test_seed_setting_prints_one_table_over_epsilons(tmp_path, capsys, monkeypatch):
    """bench/seed_setting.py on the tiny config (CPU): one row per (ε, method) with the cut
    against ERM; its GPU config parses and its dry run counts the runs (real weights and data:
    skipped without ../shared)."""
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    mod = _load("seed_setting")
    cfg = _config(tmp_path)  # reports at the run's whole ε: at 0.2 of it the tiny test part's noisy
    # group counts can fall to zero, leaving ERM's gaps (and so the cut against them) undefined
    cfg.write_text(cfg.read_text().replace("[auditor.data]", "[auditor.privacy]\nreport_epsilon_fraction = 1.0\n"
                                           "[auditor.data]"))
    assert mod.main(["--config", str(cfg), "--methods", "erm", "--seeds", "1",
                     "--epsilons", "inf,1", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| inf |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and all("| erm |" in r and "+0 %" in r for r in rows)
    if not (REPO.parent / "shared" / "models").is_dir():
        pytest.skip("../shared (UTKFace, DeiT-Tiny weights) is absent: the GPU config is not checked")
    assert mod.main(["--dry-run"]) == 0
    plan = capsys.readouterr().out.strip().splitlines()
    assert plan[-1].startswith(f"{len(plan) - 1} runs of 1530 rounds at 224 px") and "'cuda'" in plan[-1]
