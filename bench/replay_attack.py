"""Replay of the ledger-bypass attack (issue "A privacy ledger that no sequence of requests can
bypass"): report differencing through an evicted, rebuilt or wiped answer.

The developer follows the message formats. It asks the auditor's validation report for one
(round, split) of its experiment E0 with a crafted head that predicts positive exactly the top t
of the validation people along a direction of its choice (it holds their inputs in the
``shared_source`` setting, and the backbone), for t = 0, 1, ..., T. Two answers whose heads
differ in one person differ, if they carry the same noise, by exactly that person's count: the
group whose positive count moves names their sensitive attribute (Gadotti et al. 2019, on
"sticky" noise). Between two asks it makes the auditor forget E0's answer:

* ``evict``: it touches a renamed copy E1 of its experiment (admitted by the ``[tune]`` space,
  a new fingerprint), so that the auditor's host, holding one experiment in memory, evicts E0's
  service and rebuilds it for the next ask;
* ``wipe``: (an operator's mistake, not a developer's power) E0's stored answer file is deleted
  before each ask.

The score is the attack's accuracy over the T targets; a target whose answer shows no group
moving more than another (the same answer twice, or a refusal) counts 0.5, a coin flip.

``python bench/replay_attack.py [--targets 60] [--scenario evict|wipe] [--json PATH]`` prints
``accuracy=``, ``answers=`` (distinct answers obtained), ``refused=`` and ``epsilon_total=``.
The auditor is started as a launcher starts it: without a ``state_dir`` in its config; where the
auditor refuses that under DP (this version), with the launchers' default folder in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fairsplit.auditor.host import AuditorHost  # noqa: E402
from fairsplit.protocol.config import experiment_fingerprint, experiment_json  # noqa: E402
from fairsplit.protocol.messages import PROTOCOL_VERSION, RoundRequest, make_request, message_type_for  # noqa: E402
from fairsplit.protocol.model import adapter_state, head_state, state_spec  # noqa: E402
from fairsplit.protocol.trials import trial_experiment  # noqa: E402
from fairsplit.protocol.tune import TuneConfig  # noqa: E402

__all__ = ["replay"]


def _host(run, state_home: Path) -> AuditorHost:
    """The auditor as a launcher starts it (one experiment in memory, so E1 evicts E0)."""
    try:
        return AuditorHost(run.experiment, run.auditor, run.tune, max_services=1)
    except Exception as err:  # noqa: BLE001 - this version refuses DP without a state_dir
        from fairsplit.auditor.state import PrivacyStateError, default_state_dir

        if not isinstance(err, PrivacyStateError):
            raise
        os.environ["FAIRSPLIT_STATE_HOME"] = str(state_home)
        cfg = run.auditor.model_copy(update={"state_dir": default_state_dir(run.auditor.superlink)})
        return AuditorHost(run.experiment, cfg, run.tune, max_services=1)


def _content(model, exp, head: dict, base_fp: str):
    fp = experiment_fingerprint(exp)
    req = RoundRequest(round=1, split="val", want="none", method=exp.method.name, fingerprint=fp,
                       protocol=PROTOCOL_VERSION, experiment=None if fp == base_fp else experiment_json(exp))
    adapter = adapter_state(model)
    return message_type_for(req), make_request(adapter, head, req, adapter_spec=state_spec(adapter),
                                               head_spec=state_spec(head_state(model)))


def _positives(reply) -> dict[str, float]:
    """Per group, the positive count the report implies (selection rate × n)."""
    report = json.loads(reply["report"]["json"]) if "json" in reply["report"] else dict(reply["report"])
    return {g: v["selection_rate"] * v["n"] for g, v in report["per_group"].items()}


def replay(targets: int = 60, scenario: str = "evict", seed: int = 0) -> dict:
    """Run the attack on the tiny synthetic experiment (auditor defaults, DP on); returns
    ``{"scenario", "targets", "accuracy", "answers", "refused", "epsilon_total"}``.

    Raises:
        ValueError: an unknown scenario, or more targets than validation people.
    """
    from flower_helpers import tiny_run

    if scenario not in ("evict", "wipe"):
        raise ValueError(f"unknown scenario {scenario!r} (evict, wipe)")
    run = tiny_run("erm", rounds=2)
    run = run.model_copy(update={"tune": TuneConfig.model_validate({"space": {"r": [run.experiment.lora.r]}})})
    tmp = Path(tempfile.mkdtemp(prefix="replay-"))
    try:
        host = _host(run, tmp)
        e0 = run.experiment
        e1 = trial_experiment(e0, run.tune.space, name="renamed-copy")
        svc = host.service(e0)
        model, val = svc.model, svc.data["auditor_val"]
        if targets >= len(val):
            raise ValueError(f"{targets} targets, but the validation part holds {len(val)} people")
        with torch.no_grad():
            feats = model.features(model.prepare(val.inputs)).double()
        u = torch.randn(feats.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        proj = feats @ u
        order = torch.argsort(proj, descending=True).tolist()
        ranked = proj[order]
        base_fp = experiment_fingerprint(e0)
        answers, refused, seen = [], 0, set()
        for t in range(targets + 1):
            # positive exactly for the top t along u: logit_1 − logit_0 = u·f − threshold
            thr = float(ranked[0] + 1.0) if t == 0 else float((ranked[t - 1] + ranked[t]) / 2)
            head = {k: torch.zeros_like(v) for k, v in head_state(model).items()}
            head["weight"][1] = u.float()
            head["bias"][1] = -thr
            if scenario == "evict":
                mt, content = _content(model, e1, head, base_fp)
                try:
                    host.handle(mt, content)  # E1 in, E0 out
                except Exception:  # noqa: BLE001 - a refusal still touched E1
                    pass
            else:
                shutil.rmtree(Path(svc.cfg.state_dir or tmp) / base_fp / "replies", ignore_errors=True)
            mt, content = _content(model, e0, head, base_fp)
            try:
                reply = host.handle(mt, content)
                answers.append(_positives(reply))
                seen.add(json.dumps(answers[-1], sort_keys=True))
            except Exception:  # noqa: BLE001 - refused: nothing learnt
                answers.append(None)
                refused += 1
        s_val = np.asarray(val.s).astype(str)
        score = 0.0
        for t in range(1, targets + 1):
            a, b = answers[t - 1], answers[t]
            if a is None or b is None:
                score += 0.5
                continue
            moved = {g: b[g] - a[g] for g in b}
            if not moved or max(moved.values()) - min(moved.values()) < 1e-9:  # under DP no per-group table crosses
                score += 0.5
                continue
            guess = max(moved, key=moved.get)
            score += float(guess == s_val[order[t - 1]])
        ledger = host.shared.ledger
        return {"scenario": scenario, "targets": targets, "accuracy": score / targets,
                "answers": len(seen), "refused": refused,
                "epsilon_total": None if ledger is None else round(ledger.epsilon(), 4)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=int, default=60)
    p.add_argument("--scenario", default="evict", choices=["evict", "wipe"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    os.environ.setdefault("FAIRSPLIT_STATE_HOME", tempfile.mkdtemp(prefix="replay-home-"))
    row = replay(args.targets, args.scenario)
    for k, v in row.items():
        print(f"{k}={v}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
