"""Task LoRA orthogonal to the auditor's sensitive LoRA (O-LoRA, Wang et al. 2023, "Orthogonal
Subspace Learning for Language Model Continual Learning", Eq. 4): R = λ·Σ_modules ‖A_t A_sᵀ‖²_F."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fairsplit.protocol.messages import RoundRequest

from . import common as C
from .base import AuditorMethod, Release, grad_norm

SENS_A = "fairsplit.sensitive_A"
SENS_META = "fairsplit.sensitive_meta"


class Orthogonality(AuditorMethod):
    """Trains φ_s once (or every ``sensitive_refresh_every`` rounds), returns ∇_{A_t} R."""

    name = "orthogonality"

    def signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """∇ R (zero for every B_t); metrics: R, the sensitive adapter's training accuracy, the norm."""
        refit = SENS_A not in state or (
            self.cfg.sensitive_refresh_every > 0
            and req.round - int(state[SENS_META]["fitted_round"]) >= self.cfg.sensitive_refresh_every)
        if refit:
            train = self.ctx.data["auditor_train"]
            model_s, acc = C.train_sensitive_adapter(self.exp, train.inputs, self.ctx.train_codes,
                                                     self.n_groups, self.ctx.cfg.device)
            state[SENS_A] = ArrayRecord(C.sensitive_A(model_s))
            state[SENS_META] = ConfigRecord({"fitted_round": req.round, "accuracy": acc})
        else:
            acc = float(state[SENS_META]["accuracy"])
        grads, objective = C.orthogonality_term(self.ctx.model, state[SENS_A].to_torch_state_dict(),
                                                self.cfg.lam)
        n = min(len(self.ctx.train_codes), self.cfg.auditor_batch_size)
        return Release(adapter_gradient=grads, metrics={
            "n": int(n), "objective": objective, "sensitive_accuracy": acc, "signal_norm": grad_norm(grads)})
