"""Task LoRA orthogonal to the auditor's sensitive LoRA (O-LoRA, Wang et al. 2023, "Orthogonal
Subspace Learning for Language Model Continual Learning", Eq. 4): R = λ·Σ_modules ‖A_t A_sᵀ‖²_F."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fairsplit.protocol.messages import RoundRequest

from . import common as C
from .base import AuditorMethod, Release, grad_norm
from .private_signal import sensitive_training_events, train_sensitive_adapter_dp

SENS_A = "fairsplit.sensitive_A"
SENS_META = "fairsplit.sensitive_meta"


class Orthogonality(AuditorMethod):
    """Trains φ_s once (or every ``sensitive_refresh_every`` rounds), returns ∇_{A_t} R."""

    name = "orthogonality"

    @classmethod
    def dp_events(cls, cfg, exp, n_train: int, noise) -> list[dict]:
        """Under DP: the sensitive LoRA's DP-SGD trainings
        (:func:`auditor.methods.private_signal.sensitive_training_events`); the signal itself is
        post-processing of A_s."""
        return sensitive_training_events(cfg, exp, n_train, noise)

    def signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """∇ R (zero for every B_t); metrics: R, the sensitive adapter's training accuracy, the norm.

        Under the auditor's DP φ_s is trained with DP-SGD
        (:func:`auditor.methods.private_signal.train_sensitive_adapter_dp`, noise multiplier
        σ_train, clip ``[auditor.privacy] clip_norm``); A_s and every signal computed from it are
        then post-processing, and the sensitive accuracy is not released (None).
        """
        refit = SENS_A not in state or (
            self.cfg.sensitive_refresh_every > 0
            and req.round - int(state[SENS_META]["fitted_round"]) >= self.cfg.sensitive_refresh_every)
        ctx = self.ctx
        if refit:
            train = ctx.data["auditor_train"]
            if ctx.gate.dp:
                sigma = ctx.gate.noise.train
                model_s = train_sensitive_adapter_dp(
                    self.exp, train.inputs, ctx.train_codes, self.n_groups, sigma=sigma,
                    clip_norm=ctx.cfg.privacy.clip_norm, rng=ctx.gate.secret.rng(ctx.fingerprint, self.name, req.round),
                    generator=ctx.gate.secret.generator(ctx.fingerprint, self.name, req.round), device=ctx.cfg.device)
                ctx.gate.spend("auditor_train", "sampled", sigma, min(1.0, self.cfg.auditor_batch_size / len(train)),
                               self.cfg.sensitive_steps)
                acc = None
            else:
                model_s, acc = C.train_sensitive_adapter(self.exp, train.inputs, ctx.train_codes,
                                                         self.n_groups, ctx.cfg.device)
            state[SENS_A] = ArrayRecord(C.sensitive_A(model_s))
            state[SENS_META] = ConfigRecord({"fitted_round": req.round, **({} if acc is None else {"accuracy": acc})})
        else:
            meta = state[SENS_META]
            acc = float(meta["accuracy"]) if "accuracy" in meta else None
        grads, objective = C.orthogonality_term(self.ctx.model, state[SENS_A].to_torch_state_dict(),
                                                self.cfg.lam)
        n = min(len(self.ctx.train_codes), self.cfg.auditor_batch_size)
        return Release(adapter_gradient=grads, metrics={
            "n": int(n), "objective": objective, "sensitive_accuracy": acc, "signal_norm": grad_norm(grads)})
