"""The auditor's methods: one module per method behind one interface (:mod:`.base`).

:data:`REGISTRY` maps each method name of :data:`protocol.methods.METHODS` to its
:class:`~auditor.methods.base.AuditorMethod` class; ``tests/test_methods_registry.py`` checks
that the two name the same methods. The shared helpers of :mod:`.common` are re-exported here.
"""

from __future__ import annotations

from .adversarial import Adversarial
from .base import AuditorMethod, ProtocolMismatch, Release, RoundBatch
from . import common
from .common import *  # noqa: F403 - the shared helpers, re-exported
from .common import _features  # noqa: F401 - used by the tests
from .entropy import Entropy
from .erm import Erm
from .fairnet import FairNet
from .fairnet_local import FairNetLocal
from .last_layer import LastLayer
from .orthogonality import Orthogonality
from .penalty import Penalty
from .unlearning import Unlearning

__all__ = ["REGISTRY", "AuditorMethod", "ProtocolMismatch", "Release", "RoundBatch", *common.__all__]

#: Method name → auditor-side implementation.
REGISTRY: dict[str, type[AuditorMethod]] = {
    cls.name: cls for cls in (Erm, Unlearning, Adversarial, Entropy, Orthogonality, Penalty, LastLayer,
                              FairNet, FairNetLocal)
}
