"""FairNet-Unlabeled on the developer's side (``fairnet_local``), the baseline that measures what
the auditor's contrastive signal adds to :mod:`.fairnet`. The developer builds its prototypes and
anchors from its own LOF pseudo-labels (:mod:`developer.fairnet`); the auditor only evaluates the
gated model and, after the last round, chooses τ on its validation part exactly as for
``fairnet`` (:func:`.fairnet.choose_threshold`)."""

from __future__ import annotations

from flwr.app import RecordDict

from fairsplit.protocol.messages import RoundRequest

from .base import AuditorMethod, Release
from .fairnet import choose_threshold


class FairNetLocal(AuditorMethod):
    """Serves reports of the gated model and the τ choice; no per-round signal."""

    name = "fairnet_local"

    def choose_threshold(self, req: RoundRequest, state: RecordDict) -> Release:
        """τ on validation (:func:`auditor.methods.fairnet.choose_threshold`)."""
        return choose_threshold(self, self.ctx.gated)
