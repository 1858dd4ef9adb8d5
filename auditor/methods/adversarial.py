"""Adversarial debiasing (Zhang, Lemoine & Mitchell 2018, "Mitigating Unwanted Biases with
Adversarial Learning"; gradient reversal of Ganin & Lempitsky 2015): R = −λ·CE(g(f_φ(x)), s)."""

from __future__ import annotations

import torch.nn.functional as F
from flwr.app import RecordDict

from fairsplit.protocol.messages import RoundRequest

from . import common as C
from .base import AuditorMethod, Release, grad_norm
from .private_signal import private_probe_signal, probe_signal_events
from .probe import fit_or_load_probe


class Adversarial(AuditorMethod):
    """Updates its linear adversary g on each round's batch (warm start), returns ∇_φ R."""

    name = "adversarial"

    @classmethod
    def dp_events(cls, cfg, exp, n_train: int, noise) -> list[dict]:
        """Under DP: the adversary's DP-SGD steps and one sampled Gaussian step per signal
        (:func:`auditor.methods.private_signal.probe_signal_events`)."""
        return probe_signal_events(cfg, exp, n_train, noise)

    def signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """∇_φ R on the round batch; metrics: R, the adversary's accuracy on the batch, the norm.

        Under the auditor's DP: the adversary trained with DP-SGD and the clipped, noised sum of
        the per-example ∇_φ(−λ·CE(g(f_φ(x_i)), s_i)) on a Poisson sample
        (:func:`auditor.methods.private_signal.private_probe_signal`).
        """
        if self.ctx.gate.dp:
            lam = self.cfg.lam
            return private_probe_signal(self, req, state, lambda logits, si: -lam * F.cross_entropy(
                logits.unsqueeze(0), si.unsqueeze(0)))
        b = self.batch(req.round)
        s = b.s.to(self.ctx.cfg.device)
        probe = fit_or_load_probe(self, req.round, state, refit=True, fit_inputs=b.inputs, fit_s=s,
                                  warm_start=True)
        grads, objective, acc = C.adversarial_term(self.ctx.model, probe, b.inputs, s, self.cfg.lam,
                                                   self.ctx.cfg.device)
        return Release(adapter_gradient=grads, metrics={
            "n": int(len(s)), "objective": objective, "sensitive_accuracy": acc,
            "signal_norm": grad_norm(grads)})
