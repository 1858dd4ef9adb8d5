"""FairTune over the split: the search space the auditor admits, the auditor host serving many
experiments, and studies over the real Flower deployment (pruning, persistence, max_runs)."""

from __future__ import annotations

import json

import pytest

from flower_helpers import tiny_run, wait_gone

from fairsplit.auditor.host import AuditorHost
from fairsplit.deploy.colocated import run_colocated
from fairsplit.deploy.flower import FlowerError
from fairsplit.deploy.config import RunFile, load_run_file
from fairsplit.protocol.config import experiment_fingerprint, experiment_from_json, experiment_json
from fairsplit.protocol.trials import admit, block_layout, placement_names, trial_experiment
from fairsplit.protocol.tune import NotAdmitted, TuneConfig, TuneSpace


def _tuned(run: RunFile, **tune) -> RunFile:
    space = {"r": [2, 4], "lr": [1e-4, 1e-2], "seeds": [1], **tune.pop("space", {})}
    return run.model_copy(update={"tune": TuneConfig.model_validate({**tune, "space": space})})


def _deep_vit(run: RunFile, depth: int = 4) -> RunFile:
    model = run.experiment.model.model_copy(update={"overrides": {**run.experiment.model.overrides, "depth": depth}})
    return run.model_copy(update={"experiment": run.experiment.model_copy(update={"model": model})})


# -- the search space and what the auditor admits ------------------------------------------------

def test_placement_masks_whole_block_groups():
    run = _deep_vit(tiny_run(), depth=4)
    spec = run.experiment.model
    assert block_layout(spec) == ("blocks", 4)
    space = TuneSpace(block_groups=2, modules=["attn.qkv", "mlp.fc2"])
    mask = {(0, "attn.qkv"): True, (0, "mlp.fc2"): False, (1, "attn.qkv"): False, (1, "mlp.fc2"): True}
    assert placement_names(spec, space, mask) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv",
                                                  "blocks.2.mlp.fc2", "blocks.3.mlp.fc2"]
    per_block = TuneSpace(modules=["attn.qkv"])  # block_groups None: one mask entry per block
    assert placement_names(spec, per_block, {(i, "attn.qkv"): i == 2 for i in range(4)}) == ["blocks.2.attn.qkv"]
    with pytest.raises(ValueError, match="selects no module"):
        placement_names(spec, per_block, {(i, "attn.qkv"): False for i in range(4)})
    with pytest.raises(ValueError, match="lacks group"):
        placement_names(spec, space, {(0, "attn.qkv"): True})


def test_auditor_admits_exactly_the_search_space():
    run = _deep_vit(tiny_run(), depth=4)
    base, space = run.experiment, TuneSpace(block_groups=2, r=[2, 4], lr=[1e-4, 1e-2], seeds=[1],
                                            methods=["erm", "penalty"], lam=[0.1, 1.0])
    mask = {(g, m): g == 1 for g in range(2) for m in space.modules}
    trial = trial_experiment(base, space, mask=mask, r=2, lr=3e-3, method="penalty", lam=0.5, seed=1)
    admit(base, space, trial)  # does not raise
    admit(base, None, base.model_copy(update={"name": "renamed"}))  # the name is free
    # a round-trip through the wire format keeps the fingerprint
    assert experiment_fingerprint(experiment_from_json(experiment_json(trial))) == experiment_fingerprint(trial)

    def refused(exp, match, s=space):
        with pytest.raises(NotAdmitted, match=match):
            admit(base, s, exp)

    refused(base.model_copy(update={"rounds": base.rounds + 1}), r"experiment\.rounds")
    refused(base.model_copy(update={"lr": 0.5}), r"experiment\.lr = 0\.5 is outside")
    refused(base.model_copy(update={"seed": 7}), r"seed = 7")
    refused(base.model_copy(update={"lora": base.lora.model_copy(update={"r": 16})}), r"lora\.r = 16")
    refused(base.model_copy(update={"lora": base.lora.model_copy(update={"lora_alpha": 99.0})}), "lora_alpha")
    part = base.model_copy(update={"lora": base.lora.model_copy(update={"target_modules": ["blocks.0.attn.qkv"]})})
    refused(part, "part of the block group 0-1")
    other = base.model_copy(update={"lora": base.lora.model_copy(update={"target_modules": ["blocks.0.attn.foo"]})})
    refused(other, "not blocks")
    refused(trial.model_copy(update={"method": space.method_config("penalty", 5.0)}), r"lam = 5\.0 is outside")
    refused(base.model_copy(update={"method": TuneSpace(methods=["adversarial"]).method_config("adversarial", 0.5)}),
            "not in the search space")
    # without a [tune] table only the auditor's own experiment is served
    refused(trial, r"experiment\.lora", s=None)


def test_tune_config_is_validated():
    with pytest.raises(ValueError, match="unknown method"):
        TuneSpace(methods=["nope"])
    with pytest.raises(ValueError, match="lr must be"):
        TuneSpace(lr=[1e-2, 1e-4])
    with pytest.raises(ValueError, match="methods_config.penalty"):
        TuneSpace(methods=["erm"], methods_config={"penalty": {}})
    assert TuneConfig(objective="gap").direction() == "minimize"
    tc = TuneConfig(objective="constrained", gap="demographic_parity_difference", max_gap=0.1)
    assert tc.value({"accuracy": 0.8}) == 0.8
    assert tc.violation({"demographic_parity_difference": 0.25}) == pytest.approx(0.15)


# -- one auditor host, many experiments -----------------------------------------------------------

def test_host_serves_admitted_experiments_with_data_loaded_once(tmp_path, monkeypatch):
    import fairsplit.auditor.service as service_mod

    calls = []
    real = service_mod.load_split
    monkeypatch.setattr(service_mod, "load_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = _tuned(tiny_run("erm", private=False))
    host = AuditorHost(run.experiment, run.auditor, run.tune)
    trial = trial_experiment(run.experiment, run.tune.space, r=2, lr=5e-3)
    together = [run_colocated(run.model_copy(update={"experiment": e}), tmp_path / f"shared{i}", host=host)
                for i, e in enumerate([run.experiment, trial])]
    assert len(calls) == 1  # the auditor decoded its data once for both experiments
    assert len(host.shared.runs.fingerprints) == 2
    alone = run_colocated(run.model_copy(update={"experiment": trial}), tmp_path / "alone")
    assert together[1]["metrics"] == alone["metrics"]  # a shared host answers as a fresh one

    bad = run.experiment.model_copy(update={"rounds": 5})
    with pytest.raises(Exception, match="NotAdmitted.*experiment.rounds"):
        run_colocated(run.model_copy(update={"experiment": bad}), tmp_path / "bad", host=host)


def test_run_limit_counts_experiments_not_reruns(tmp_path):
    run = _tuned(tiny_run("erm", private=False, max_runs=1))
    host = AuditorHost(run.experiment, run.auditor, run.tune)
    first = run_colocated(run, tmp_path / "a", host=host)
    again = run_colocated(run, tmp_path / "b", host=host)  # the same experiment: not a new run
    assert again["metrics"] == first["metrics"]
    other = run.model_copy(update={"experiment": trial_experiment(run.experiment, run.tune.space, seed=1)})
    with pytest.raises(Exception, match="RunLimitExceeded.*max_runs = 1"):
        run_colocated(other, tmp_path / "c", host=host)


def test_stop_file_ends_a_run_before_its_next_round(tmp_path):
    from fairsplit.developer.loop import STOP_FILE

    run = tiny_run("erm", rounds=4, private=False)
    out = tmp_path / "run"

    def on_round(row):
        if row["round"] == 2:
            (out / STOP_FILE).touch()

    res = run_colocated(run, out, on_round=on_round)
    assert res["stopped_after_round"] == 2 and res["metrics"] is None
    assert [r["round"] for r in res["per_round"]] == [1, 2]


# -- studies over the real Flower deployment -------------------------------------------------------

@pytest.mark.flower
def test_tune_over_flower_prunes_persists_and_counts_runs(tmp_path, flwr_env):
    """A 3-trial study on one deployment (DP on, the default): persisted, intermediate values
    reported, a hopeless trial stopped mid-run, best.toml runs (the same experiment: the
    auditor's cached replies), then a new experiment past max_runs is refused with its reason.

    The auditor's population here carries the developer's shortcut (as the developer's data
    does), so a trained trial's validation accuracy stands out from the hopeless one's; the
    demo's own auditor population has none, and every 3-round tiny trial is near chance there
    (this test then failed 2 of 3 runs: the pruner had nothing to tell apart)."""
    import optuna

    from fairsplit.deploy.launch import LocalDeployment
    from fairsplit.deploy.tune import run_study

    base = tiny_run("erm", rounds=3, max_runs=3, state_dir=str(tmp_path / "auditor"))
    # reports at the run's whole ε: at the default 0.2 of it, three reports a run on the tiny
    # validation part (90 rows) carry count noise of σ ≈ 31, which hides the hopeless trial from
    # the pruner (a tune study needs a validation part large enough for its report noise)
    privacy = base.auditor.privacy.model_copy(update={"report_epsilon_fraction": 1.0})
    shortcut = base.auditor.model_copy(update={"data": base.auditor.data.model_copy(update={"spurious_correlation": 0.85}),
                                               "privacy": privacy})
    run = _tuned(base.model_copy(update={"auditor": shortcut}),
                 trials=3, pruner="median", warmup_rounds=1, pruner_startup_trials=2)
    out = tmp_path / "study"
    lines: list[str] = []
    bad = {"g0.attn.qkv": True, "g0.attn.proj": False, "g0.mlp.fc1": False, "g0.mlp.fc2": False,
           "r": 2, "lr": 1e-4}  # too small a step to leave the majority class in 3 rounds
    with LocalDeployment(run, out) as deployment:
        summary = run_study(run, out, lambda r, folder, cb: deployment.run(r, folder, on_round=cb),
                            log_line=lines.append, enqueue=[{**bad, "lr": 5e-3}, bad])
        best = load_run_file(out / "best.toml")
        rerun = deployment.run(best, tmp_path / "best-rerun")
        other = run.model_copy(update={"experiment": trial_experiment(run.experiment, run.tune.space, seed=1)})
        with pytest.raises(FlowerError, match=r"E_RUN_LIMIT: the auditor answers at most max_runs = 3"):
            deployment.run(other, tmp_path / "over-limit")

    study = optuna.load_study(study_name="fairsplit", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in study.trials]
    assert len(states) == 3 and summary["trials"] == 3 and len(lines) == 3
    assert study.trials[0].user_attrs["baseline"] and study.trials[0].intermediate_values  # rounds 1, 2
    assert states[2] == optuna.trial.TrialState.PRUNED
    pruned_res = json.loads((out / "trials" / "002" / "results.json").read_text())
    assert pruned_res["stopped_after_round"] < run.experiment.rounds and pruned_res["metrics"] is None
    chosen = summary["best"]["number"]
    trial_res = json.loads((out / "trials" / f"{chosen:03d}" / "results.json").read_text())
    assert rerun["fingerprint"] == trial_res["fingerprint"]
    assert rerun["metrics"] == trial_res["metrics"]  # answered from the auditor's cache under DP
    for name in ("trials.csv", "summary.json", "plots/optimization_history.png", "plots/accuracy_vs_gap.png"):
        assert (out / name).stat().st_size > 0, name
    registry = json.loads((tmp_path / "auditor" / "runs.json").read_text())
    assert len(registry["fingerprints"]) == 3 and len(registry["runs"]) == 5  # 5 Flower runs, 3 experiments
    audit = [json.loads(x) for x in (tmp_path / "auditor" / "audit.jsonl").read_text().splitlines()]
    assert {a["run_id"] for a in audit} == {r["run_id"] for r in registry["runs"]}
    assert audit[-1]["error"] == "RunLimitExceeded"
    assert wait_gone(str(tmp_path)) == []


@pytest.mark.flower
def test_runs_on_one_deployment_equal_separate_deployments(tmp_path, flwr_env):
    from fairsplit.deploy.launch import LocalDeployment, run_local

    run = _tuned(tiny_run("adversarial", rounds=2, private=False))  # exact releases: runs are deterministic
    second = run.model_copy(update={"experiment": trial_experiment(run.experiment, run.tune.space, r=2, lr=5e-3)})
    with LocalDeployment(run, tmp_path / "shared") as deployment:
        shared = [deployment.run(r, tmp_path / "shared" / f"run{i}") for i, r in enumerate([run, second])]
    separate = run_local(second, tmp_path / "separate")
    assert shared[1]["metrics"] == separate["metrics"]
    assert [r["train_loss"] for r in shared[1]["per_round"]] == [r["train_loss"] for r in separate["per_round"]]
    assert shared[0]["fingerprint"] != shared[1]["fingerprint"]


@pytest.mark.flower
def test_tune_against_a_remote_auditor(tmp_path, flwr_env):
    """`fairsplit tune` with a developer file (no [auditor] table) sends its trials to a separate
    `fairsplit auditor` process whose own file holds the same [tune] table."""
    import os
    import signal
    import subprocess
    import sys

    from fairsplit.deploy.flower import free_port
    from fairsplit.deploy.launch import write_party_files

    run = _tuned(tiny_run("erm", rounds=2, state_dir=str(tmp_path / "auditor-state")), trials=2, pruner="none")
    dev_cfg, aud_cfg = write_party_files(run, tmp_path / "cfg")
    assert "[tune" in dev_cfg.read_text() and "[tune" in aud_cfg.read_text()
    port = free_port()
    auditor = subprocess.Popen(
        [sys.executable, "-m", "fairsplit.deploy.cli", "auditor", "--config", str(aud_cfg), "--insecure",
         "--superlink", f"127.0.0.1:{port}", "--logs", str(tmp_path / "auditor-logs")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        dev = subprocess.run([sys.executable, "-m", "fairsplit.deploy.cli", "tune", "--config", str(dev_cfg), "--insecure",
                              "--port", str(port), "--out", str(tmp_path / "study")],
                             capture_output=True, text=True, timeout=600)
        assert dev.returncode == 0, dev.stdout + dev.stderr
    finally:
        os.killpg(auditor.pid, signal.SIGTERM)
        auditor.wait(timeout=30)
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert summary["complete"] == 2
    assert "[developer" in (tmp_path / "study" / "best.toml").read_text()
    assert "[auditor" not in (tmp_path / "study" / "best.toml").read_text()  # the developer never had it
    registry = json.loads((tmp_path / "auditor-state" / "runs.json").read_text())
    assert len(registry["fingerprints"]) == 2
    assert wait_gone(str(tmp_path)) == []


def test_resumed_study_fails_the_interrupted_trial_and_keeps_its_baseline(tmp_path, monkeypatch):
    """A study killed during its baseline trial: on --resume that trial is marked failed, the
    baseline is tried again, and the study reaches its number of trials."""
    import optuna

    from fairsplit.deploy.tune import run_study

    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    run = _tuned(tiny_run("erm", rounds=2, private=False), trials=2, pruner="none")
    host = AuditorHost(run.experiment, run.auditor, run.tune)

    def crash(r, folder, cb):
        raise KeyboardInterrupt  # the process dies mid-trial

    with pytest.raises(KeyboardInterrupt):
        run_study(run, tmp_path / "s", crash)
    db = f"sqlite:///{tmp_path / 's' / 'study.db'}"
    study = optuna.load_study(study_name="fairsplit", storage=db)
    # Optuna records the interrupted trial; simulate a kill that left it RUNNING
    assert [t.state for t in study.trials] in ([optuna.trial.TrialState.FAIL], [optuna.trial.TrialState.RUNNING])
    summary = run_study(run, tmp_path / "s", lambda r, f, cb: run_colocated(r, f, on_round=cb, host=host),
                        resume=True)
    assert summary["complete"] == 2 and summary["baseline"] is not None


def test_a_stateful_experiment_runs_twice_on_one_auditor(tmp_path, monkeypatch):
    """A long-lived auditor answers a second run of the same stateful experiment (adversarial
    keeps per-round state) from round 0 again, identically; its round-0 state was once dropped
    as "the oldest" snapshot (E_STATE)."""
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))
    run = tiny_run("adversarial", rounds=5, private=False, state_dir=str(tmp_path / "auditor"))
    host = AuditorHost(run.experiment, run.auditor)
    first = run_colocated(run, tmp_path / "a", host=host)
    second = run_colocated(run, tmp_path / "b", host=host)
    assert second["metrics"] == first["metrics"]
    assert [r["train_loss"] for r in second["per_round"]] == [r["train_loss"] for r in first["per_round"]]
