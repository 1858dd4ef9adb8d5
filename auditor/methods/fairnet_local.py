"""FairNet-Unlabeled on the developer's side (``fairnet_local``), the baseline that measures what
the auditor's contrastive signal adds to :mod:`.fairnet`. The developer builds its prototypes and
anchors from its own LOF pseudo-labels (:mod:`developer.fairnet`); the auditor only evaluates the
gated model and, after the last round, chooses τ on its validation part exactly as for
``fairnet`` (:func:`.fairnet.choose_threshold`; under the auditor's DP one noisy report per τ,
on the plan)."""

from __future__ import annotations

from flwr.app import RecordDict

from fairsplit.protocol.messages import RoundRequest

from .base import AuditorMethod, Release
from .fairnet import choose_threshold, threshold_events


class FairNetLocal(AuditorMethod):
    """Serves reports of the gated model and the τ choice; no per-round signal."""

    name = "fairnet_local"

    @classmethod
    def dp_events(cls, cfg, exp, n_train: int, noise) -> list[dict]:
        """Under DP: the τ choice's validation reports (:func:`auditor.methods.fairnet.threshold_events`);
        the developer's own training reads nothing of the auditor's."""
        return threshold_events(cfg, noise)

    def choose_threshold(self, req: RoundRequest, state: RecordDict) -> Release:
        """τ on validation (:func:`auditor.methods.fairnet.choose_threshold`)."""
        return choose_threshold(self, self.ctx.gated)
