"""The ledger-bypass attacks, replayed: no sequence of requests, evictions, restarts or damaged
files gets the auditor to answer an answered query again with the same noise, for free.

Each test states the defect it replays; every one of them passed the attacker on the code before
the privacy state moved to disk (``bench/replay_attack.py`` there: 60 of 60 targets named).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fairsplit.auditor import privacy as P
from fairsplit.auditor.host import AuditorHost
from fairsplit.auditor.service import AuditorService
from fairsplit.auditor.state import PrivacyState, PrivacyStateError, default_state_dir
from fairsplit.deploy.colocated import run_colocated
from fairsplit.protocol.codec import payload_digest
from fairsplit.auditor.config import AuditorFile
from fairsplit.protocol.config import experiment_fingerprint, experiment_json
from fairsplit.protocol.messages import PROTOCOL_VERSION, RoundRequest, make_request, message_type_for
from fairsplit.protocol.methods import request_plan
from fairsplit.protocol.model import adapter_state, head_state, state_spec
from fairsplit.protocol.schedule import planned_requests
from fairsplit.protocol.trials import trial_experiment
from fairsplit.protocol.tune import TuneConfig
from flower_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]


def _ask(service: AuditorService, round_: int = 1, split: str = "val", a_scale: float = 1.0,
         bias: float = 0.0, carry: bool = False):
    """(message type, request) for ``service``'s experiment at a chosen adapter and head bias;
    ``carry``: the request carries its experiment (one the host admits, not its own)."""
    model = service.model
    adapter = {k: v * a_scale if "lora_A" in k else v for k, v in adapter_state(model).items()}
    head = head_state(model)
    head["bias"] = head["bias"] + torch.tensor([0.0, bias])
    req = RoundRequest(round=round_, split=split, want="none", method=service.exp.method.name,
                       fingerprint=service.fingerprint, protocol=PROTOCOL_VERSION,
                       experiment=experiment_json(service.exp) if carry else None)
    return message_type_for(req), make_request(adapter, head, req, adapter_spec=state_spec(adapter),
                                               head_spec=state_spec(head))


def _digest(reply) -> str:
    return payload_digest(reply)["sha256"]


@pytest.fixture
def run(tmp_path):
    r = tiny_run("erm", rounds=2)
    return r.model_copy(update={"auditor": r.auditor.model_copy(update={"state_dir": tmp_path / "state"})})


def test_eviction_replay_names_no_one():
    """Issue 19's attack: E0 answered, a renamed copy E1 evicts E0's service, E0 is rebuilt and
    asked again with a head that differs in one person, 60 times. Before: every answer was
    recomputed with the same noise and each difference named its target's s (60 of 60). Now
    every ask gets the stored answer: one distinct answer, the attack at chance."""
    spec = importlib.util.spec_from_file_location("_replay", REPO / "bench" / "replay_attack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = mod.replay(targets=60, scenario="evict")
    assert row["answers"] == 1 and row["refused"] == 0
    assert row["accuracy"] <= 0.6


def test_an_evicted_and_rebuilt_experiment_gets_the_stored_answer_byte_for_byte(run):
    """max_services = 1: touching another experiment evicts E0; the rebuilt service answers a
    different payload for an answered key with the first reply, byte for byte, at no ε."""
    run = run.model_copy(update={"tune": TuneConfig.model_validate({"space": {"r": [run.experiment.lora.r]}})})
    host = AuditorHost(run.experiment, run.auditor, run.tune, max_services=1)
    first = host.handle(*_ask(host.base))
    spent = host.shared.ledger.epsilon()
    renamed = trial_experiment(run.experiment, run.tune.space, name="copy-1")
    assert experiment_fingerprint(renamed) != host.base.fingerprint
    host.service(renamed)  # E0's service is evicted
    rebuilt = host.service(run.experiment)
    assert rebuilt is not host.base
    again = host.handle(*_ask(rebuilt, bias=3.0))
    assert _digest(again) == _digest(first)
    assert host.shared.ledger.epsilon() == pytest.approx(spent)


def test_renamed_experiments_are_new_runs_charged_and_capped(run):
    """A renamed (or re-seeded) experiment is a new experiment: charged, and counted against
    max_runs."""
    run = run.model_copy(update={"tune": TuneConfig.model_validate({"space": {"r": [run.experiment.lora.r]}}),
                                 "auditor": run.auditor.model_copy(update={"max_runs": 2})})
    host = AuditorHost(run.experiment, run.auditor, run.tune)
    host.handle(*_ask(host.base))
    one = host.shared.ledger.epsilon()
    renamed = host.service(trial_experiment(run.experiment, run.tune.space, name="copy-1"))
    host.handle(*_ask(renamed, carry=True))
    assert host.shared.ledger.epsilon() > 1.3 * one  # charged: two runs of ε = 1 compose to 1.46
    third = host.service(trial_experiment(run.experiment, run.tune.space, name="copy-2"))
    with pytest.raises(P.RunLimitExceeded, match="max_runs = 2"):
        host.handle(*_ask(third, carry=True))


def test_a_restarted_auditor_keeps_answers_budget_and_cap(run):
    """A new process on the same state_dir: the stored answer, the same ε, the same run count."""
    host = AuditorHost(run.experiment, run.auditor)
    first = host.handle(*_ask(host.base))
    spent, runs = host.shared.ledger.epsilon(), list(host.shared.runs.fingerprints)
    restarted = AuditorHost(run.experiment, run.auditor)
    assert restarted.shared.ledger.epsilon() == pytest.approx(spent)
    assert restarted.shared.runs.fingerprints == runs
    assert _digest(restarted.handle(*_ask(restarted.base, bias=-2.0))) == _digest(first)


def test_a_lost_answer_is_recomputed_with_fresh_noise_and_charged(run):
    """The stored answer deleted (an operator's slip): the identical request is answered as
    before (same release, same noise: nothing new, nothing charged); a request for the same
    function in other bytes (LoRA A scaled while B = 0) is a new release: other noise, charged.
    Before, noise was keyed by (experiment, part, round) alone: both got the same noise."""
    host = AuditorHost(run.experiment, run.auditor)
    svc = host.base
    first = host.handle(*_ask(svc))
    spent = host.shared.ledger.epsilon()
    store: PrivacyState = host.shared.privacy
    key = (1, "val", "none")
    store.reply_path(svc.fingerprint, key).unlink()
    same = host.handle(*_ask(svc))
    assert same["report"]["json"] == first["report"]["json"]
    assert host.shared.ledger.epsilon() == pytest.approx(spent)
    store.reply_path(svc.fingerprint, key).unlink()
    other = host.handle(*_ask(svc, a_scale=2.0))  # B = 0: the model is the same function
    assert other["report"]["json"] != first["report"]["json"]
    assert host.shared.ledger.epsilon() > spent + 1e-3
    releases = [r for r in host.shared.ledger.releases if (r["round"], r["split"], r["want"]) == key]
    assert len({r["id"] for r in releases}) == 2 and releases[-1]["paid"]


def test_a_lost_answer_past_the_budget_is_refused(run):
    """Recomputations are charged against epsilon_budget like any release."""
    privacy = run.auditor.privacy.model_copy(update={"target_epsilon": 3.0, "epsilon_budget": 3.05})
    run = run.model_copy(update={"auditor": run.auditor.model_copy(update={"privacy": privacy})})
    host = AuditorHost(run.experiment, run.auditor)
    host.handle(*_ask(host.base))
    host.shared.privacy.reply_path(host.base.fingerprint, (1, "val", "none")).unlink()
    with pytest.raises(P.BudgetExceeded, match="a second answer"):
        host.handle(*_ask(host.base, a_scale=2.0))


def test_draws_are_keyed_by_the_release():
    """Structural: two releases never share a seed; outside a release the service cannot draw."""
    secret = P.AuditorSecret(None)
    a, b = secret.for_release(0), secret.for_release(1)
    assert a.seed("fp", "auditor_val", "report", 1) != b.seed("fp", "auditor_val", "report", 1)
    assert a.seed("x") == secret.for_release(0).seed("x")
    with pytest.raises(RuntimeError, match="inside a release"):
        P.NoRelease().rng("fp")


@pytest.mark.parametrize("name", ["privacy_ledger.json", "runs.json", "secret.key"])
@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_privacy_file_refuses_to_start(run, name, damage):
    """After releases, a deleted or truncated ledger, registry or secret stops the auditor with
    a message naming the file; it never starts again from zero."""
    res = run_colocated(run, run.auditor.state_dir.parent / "out")
    assert res["privacy"]["epsilon_total"] > 0
    path = Path(run.auditor.state_dir) / name
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: max(1, len(path.read_bytes()) // 2)])
    with pytest.raises(PrivacyStateError, match=name.replace(".", r"\.")):
        AuditorHost(run.experiment, run.auditor)


def test_a_privacy_file_deleted_while_serving_is_a_refusal(run):
    host = AuditorHost(run.experiment, run.auditor)
    host.handle(*_ask(host.base))
    (Path(run.auditor.state_dir) / "privacy_ledger.json").unlink()
    with pytest.raises(ValueError, match="was deleted"):
        host.handle(*_ask(host.base, round_=2))


def test_dp_needs_a_state_dir_and_launchers_choose_one(run, tmp_path, monkeypatch):
    """Under DP an auditor without state_dir does not start; the co-located runner uses
    OUT/auditor and ``fairsplit auditor`` the default folder for its SuperLink."""
    bare = run.auditor.model_copy(update={"state_dir": None})
    with pytest.raises(PrivacyStateError, match="state_dir"):
        AuditorService(run.experiment, bare)
    res = run_colocated(run.model_copy(update={"auditor": bare}), tmp_path / "out")
    assert res["privacy"]["dp"] and (tmp_path / "out" / "auditor" / "privacy_ledger.json").is_file()
    from fairsplit.deploy.launch import auditor_state_dir

    monkeypatch.setenv("FAIRSPLIT_STATE_HOME", str(tmp_path / "home"))
    f = AuditorFile(experiment=run.experiment, auditor=bare)
    where = auditor_state_dir(f, "dev.example:9092")
    assert where == tmp_path / "home" / "auditor" / "dev.example_9092" == default_state_dir("dev.example:9092")
    assert {p.name for p in where.iterdir()} >= {"privacy_ledger.json", "runs.json", "secret.key"}


def test_two_processes_on_one_ledger_lose_no_charge(tmp_path):
    """Two ledgers on one file (two processes): each sees the other's records before adding its
    own, under the folder's lock; none is lost."""
    a = P.Ledger(1e-5, 100.0, tmp_path / "ledger.json")
    b = P.Ledger(1e-5, 100.0, tmp_path / "ledger.json")
    ev = {"fingerprint": "f", "part": "auditor_val", "kind": "gaussian", "sigma": 5.0, "q": None, "count": 1}
    a.record([ev])
    b.record([ev])
    a.record([ev])
    assert P.Ledger(1e-5, 100.0, tmp_path / "ledger.json").events[0]["count"] == 3
    assert a.reserve("f", (1, "val", "none"), "x")[0] != b.reserve("f", (2, "val", "none"), "y")[0]


def test_replies_stored_before_the_journal_are_journalled(run):
    """A state_dir from before the journal (ledger format 1): its stored replies count as
    answered, so a request for one of them after the file is lost is charged."""
    host = AuditorHost(run.experiment, run.auditor)
    host.handle(*_ask(host.base))
    path = Path(run.auditor.state_dir) / "privacy_ledger.json"
    obj = json.loads(path.read_text())
    path.write_text(json.dumps({"format": 1, "delta": obj["delta"], "events": obj["events"]}))
    reopened = AuditorHost(run.experiment, run.auditor)
    assert reopened.base.gate.answered_keys() == [(1, "val", "none")]
    spent = reopened.shared.ledger.epsilon()
    reopened.shared.privacy.reply_path(reopened.base.fingerprint, (1, "val", "none")).unlink()
    reopened.handle(*_ask(reopened.base))
    assert reopened.shared.ledger.epsilon() > spent + 1e-3


# -- found by a red team of this ledger (each passed the attacker before its fix) ----------------


def test_a_ledger_that_goes_back_is_refused_while_serving_and_at_start(run):
    """An older privacy_ledger.json put back (as a refusal's 'restore it' could invite): the
    running auditor refuses to read it, and a new one refuses to start over it (the registry and
    the stored replies are newer); it never answers again with release numbers from the past."""
    host = AuditorHost(run.experiment, run.auditor)
    path = Path(run.auditor.state_dir) / "privacy_ledger.json"
    old = path.read_bytes()  # before any run
    host.handle(*_ask(host.base))
    path.write_bytes(old)
    with pytest.raises(ValueError, match="went back"):
        host.handle(*_ask(host.base, round_=2))
    with pytest.raises(PrivacyStateError, match="older than the rest"):
        AuditorHost(run.experiment, run.auditor)


def test_a_rolled_back_journal_never_repeats_noise(tmp_path):
    """Release numbers repeat after a whole-folder rollback; the nonce drawn at each reservation
    still makes every release's noise key new."""
    path = tmp_path / "ledger.json"
    ledger = P.Ledger(1e-5, 40.0, path)
    backup = path.read_bytes() if path.exists() else None
    first, _ = ledger.reserve("f", (1, "val", "none"), "a")
    key_a = ledger.noise_key(first)
    path.unlink() if backup is None else path.write_bytes(backup)
    again = P.Ledger(1e-5, 40.0, path)
    second, _ = again.reserve("f", (1, "val", "none"), "b")
    assert second == first and again.noise_key(second) != key_a


def test_a_changed_privacy_config_does_not_change_a_registered_experiment(run):
    """The plan is charged at the σ of registration; after a restart with another target ε the
    experiment's answers still use that σ (else the ledger would undercharge them)."""
    host = AuditorHost(run.experiment, run.auditor)
    host.handle(*_ask(host.base))
    sigma = host.base.gate.noise
    looser = run.auditor.model_copy(update={"privacy": run.auditor.privacy.model_copy(
        update={"target_epsilon": 20.0, "epsilon_budget": 100.0})})
    restarted = AuditorHost(run.experiment, looser)
    assert restarted.base.gate.noise == sigma


def test_a_refused_second_answer_leaves_the_method_state_alone(tmp_path):
    """penalty keeps per-round state: a charged-again answer refused for budget must not have
    changed it (the state is kept only once the release is paid)."""
    r = tiny_run("penalty", rounds=2)
    privacy = r.auditor.privacy.model_copy(update={"target_epsilon": 3.0, "epsilon_budget": 3.05})
    r = r.model_copy(update={"auditor": r.auditor.model_copy(update={"state_dir": tmp_path / "s", "privacy": privacy})})
    host = AuditorHost(r.experiment, r.auditor)
    svc = host.base
    plan = planned_requests(r.experiment)

    def ask_signal(round_, scale=1.0):
        model = svc.model
        adapter = {k: v * scale if "lora_A" in k else v for k, v in adapter_state(model).items()}
        head = head_state(model)
        req = RoundRequest(round=round_, split="none", want="signal", method="penalty",
                           stage=request_plan(r.experiment.method).stage["signal"],
                           fingerprint=svc.fingerprint, protocol=PROTOCOL_VERSION)
        return message_type_for(req), make_request(adapter, head, req, adapter_spec=state_spec(adapter),
                                                   head_spec=state_spec(head))

    first = [k for k in plan if k[2] == "signal"][0]
    host.handle(*ask_signal(first[0]))
    before = svc.state_after(first[0])
    host.shared.privacy.reply_path(svc.fingerprint, first).unlink()
    with pytest.raises(P.BudgetExceeded):
        host.handle(*ask_signal(first[0], scale=2.0))
    after = svc.state_after(first[0])
    assert {n: payload_digest(RecordDictOf(before[n])) for n in before.keys()} == \
        {n: payload_digest(RecordDictOf(after[n])) for n in after.keys()}


def RecordDictOf(record):  # noqa: N802 - a one-record RecordDict, for payload_digest
    from flwr.app import RecordDict

    out = RecordDict()
    out["r"] = record
    return out


def test_the_state_lock_is_the_folder_itself(run):
    """A lock file can be deleted while held (then two processes hold 'the' lock); the folder
    cannot go while it holds the ledger."""
    host = AuditorHost(run.experiment, run.auditor)
    assert host.shared.privacy.lock.path == Path(run.auditor.state_dir)
    assert not (Path(run.auditor.state_dir) / ".lock").exists()
