"""Sensitive unlearning by task-arithmetic negation (Ilharco et al. 2023, "Editing Models with
Task Arithmetic", §3 negation): the auditor trains its sensitive LoRA φ_s on (x, s) and releases
ΔW_s = (α/r)·B_s A_s per target module, once; the developer trains on W = W0 − λ·ΔW_s."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fairsplit.protocol.messages import RoundRequest
from fairsplit.protocol.model import subtract_weight_update

from . import common as C
from .base import AuditorMethod, Release, grad_norm

UPDATE = "fairsplit.unlearning_update"
UPDATE_META = "fairsplit.unlearning_meta"


class Unlearning(AuditorMethod):
    """Releases ΔW_s once per experiment; evaluates the model the developer trains (W0 − λ·ΔW_s)."""

    name = "unlearning"

    def __init__(self, ctx, cfg=None):
        super().__init__(ctx, cfg)
        self._applied = False  # ΔW_s subtracted from ctx.model

    def prepare(self, state: RecordDict) -> None:
        """Apply W0 − λ·ΔW_s to the auditor's model once the update exists (once per model)."""
        if UPDATE in state and not self._applied:
            subtract_weight_update(self.ctx.model, state[UPDATE].to_torch_state_dict(), self.cfg.lam)
            self._applied = True

    def update(self, req: RoundRequest, state: RecordDict) -> Release:
        """ΔW_s (module → (d_out, d_in)), cached in ``state``: a repeated request gets the same one.

        The update depends on the experiment and the auditor's data only, so one cached in any
        kept snapshot is reused.
        """
        if UPDATE not in state:
            cached = self.ctx.cached_records(UPDATE, UPDATE_META)
            if cached is not None:
                state[UPDATE], state[UPDATE_META] = cached
            else:
                train = self.ctx.data["auditor_train"]
                model_s, acc = C.train_sensitive_adapter(self.exp, train.inputs, self.ctx.train_codes,
                                                         self.n_groups, self.ctx.cfg.device)
                update = C.sensitive_update(model_s)
                state[UPDATE] = ArrayRecord(update)
                state[UPDATE_META] = ConfigRecord({
                    "n": min(len(train), self.cfg.auditor_batch_size), "objective": 0.0,
                    "sensitive_accuracy": acc, "signal_norm": grad_norm(update)})
        release = Release(update=state[UPDATE].to_torch_state_dict(), metrics=dict(state[UPDATE_META]))
        self.prepare(state)
        return release
