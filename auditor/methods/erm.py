"""ERM: the fairness-unaware baseline. The auditor only evaluates; nothing else crosses."""

from __future__ import annotations

from .base import AuditorMethod


class Erm(AuditorMethod):
    """Serves evaluation reports only (every serve method refuses)."""

    name = "erm"
