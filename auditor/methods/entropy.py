"""Maximum-entropy representations (Roy & Boddeti 2019, "Mitigating Information Leakage in Image
Representations: A Maximum Entropy Approach"): R = −λ·mean_i H(softmax(g(f_φ(x_i))))."""

from __future__ import annotations

import torch.nn.functional as F
from flwr.app import RecordDict

from fairsplit.protocol.messages import RoundRequest

from . import common as C
from .base import AuditorMethod, Release, grad_norm
from .private_signal import private_probe_signal, probe_signal_events
from .probe import PROBE, PROBE_META, fit_or_load_probe


class Entropy(AuditorMethod):
    """Refits its sensitive classifier g every ``refresh_every`` rounds (from scratch), returns ∇_φ R."""

    name = "entropy"

    @classmethod
    def dp_events(cls, cfg, exp, n_train: int, noise) -> list[dict]:
        """Under DP: the classifier's DP-SGD steps and one sampled Gaussian step per signal
        (:func:`auditor.methods.private_signal.probe_signal_events`)."""
        return probe_signal_events(cfg, exp, n_train, noise)

    def signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """∇_φ R on the round batch; g is fitted on a second seeded batch (salt 1).

        Under the auditor's DP: g trained continuously with DP-SGD and the clipped, noised sum of
        the per-example ∇_φ(−λ·H(softmax(g(f_φ(x_i))))) on a Poisson sample
        (:func:`auditor.methods.private_signal.private_probe_signal`).
        """
        if self.ctx.gate.dp:
            lam = self.cfg.lam

            def term(logits, _si):
                logp = F.log_softmax(logits, -1)
                return lam * (logp.exp() * logp).sum()  # −λ·H

            return private_probe_signal(self, req, state, term)
        b = self.batch(req.round)
        s = b.s.to(self.ctx.cfg.device)
        refit = PROBE not in state or (
            self.cfg.refresh_every > 0
            and req.round - int(state[PROBE_META]["fitted_round"]) >= self.cfg.refresh_every)
        fit = self.batch(req.round, salt=1) if refit else None
        probe = fit_or_load_probe(self, req.round, state, refit=refit,
                                  fit_inputs=fit.inputs if fit else None,
                                  fit_s=fit.s.to(self.ctx.cfg.device) if fit else None, warm_start=False)
        grads, objective, acc = C.entropy_term(self.ctx.model, probe, b.inputs, s, self.cfg.lam,
                                               self.ctx.cfg.device)
        return Release(adapter_gradient=grads, metrics={
            "n": int(len(s)), "objective": objective, "sensitive_accuracy": acc,
            "signal_norm": grad_norm(grads)})
