"""The linear sensitive probe kept in the auditor's state (adversary / entropy classifier)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from . import common as C

PROBE = "fairsplit.probe"
PROBE_META = "fairsplit.probe_meta"


def fit_or_load_probe(method, round_: int, state: RecordDict, *, refit: bool, fit_inputs, fit_s,
                      warm_start: bool) -> torch.nn.Linear:
    """The probe g: R^D → R^G for this round, frozen (no grad), on the auditor's device.

    ``refit``: fit ``method.cfg.auditor_steps`` Adam steps on the representations of
    ``fit_inputs`` at the received adapter (from the state's probe when ``warm_start``, else a
    fresh one seeded by experiment seed + round) and store it in ``state``; otherwise load it.
    """
    ctx, device = method.ctx, method.ctx.cfg.device
    if refit:
        feats = C._features(ctx.model, fit_inputs, device)
        init = state[PROBE].to_torch_state_dict() if warm_start and PROBE in state else None
        probe = C.fit_probe(feats, fit_s, method.n_groups, method.cfg.auditor_steps,
                            method.cfg.auditor_lr, init, ctx.exp.seed + round_)
        state[PROBE] = ArrayRecord(probe.state_dict())
        state[PROBE_META] = ConfigRecord({"fitted_round": round_})
    else:
        probe = torch.nn.Linear(ctx.model.feature_dim, method.n_groups)
        probe.load_state_dict(state[PROBE].to_torch_state_dict())
    probe = probe.to(device)
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe
