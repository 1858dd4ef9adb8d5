"""The auditor's methods: one module per method behind one interface (:mod:`.base`).

:data:`REGISTRY` maps each method name of :data:`protocol.methods.METHODS` to its
:class:`~auditor.methods.base.AuditorMethod` class: every module of this package is imported
here, and a subclass with a ``name`` registers itself, so a new method is its module (plus its
row in the method table); ``tests/test_methods_registry.py`` checks that the two name the same
methods. The shared helpers of :mod:`.common` are re-exported here.
"""

from __future__ import annotations

import importlib
import pkgutil

from fairsplit.protocol.methods import METHODS

from . import common
from .base import REGISTRY, AuditorMethod, ProtocolMismatch, Release, RoundBatch
from .common import *  # noqa: F403 - the shared helpers, re-exported
from .common import _features  # noqa: F401 - used by the tests

# every module of this package; a method's class registers itself (AuditorMethod.__init_subclass__)
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

_missing = sorted(set(METHODS) - set(REGISTRY))
if _missing:  # fail at import, not at the first request of such a method
    raise ImportError(f"the method table's rows {_missing} have no auditor module in {__name__}")

__all__ = ["REGISTRY", "AuditorMethod", "ProtocolMismatch", "Release", "RoundBatch", "dp_events", *common.__all__]


def dp_events(cfg, exp, n_train: int, noise) -> list[dict]:
    """The ledger events of one stage's own releases (:meth:`AuditorMethod.dp_events` of the
    method ``cfg.name``): the ``stage_events`` of :func:`auditor.accounting.run_events`.

    Raises:
        auditor.accounting.NotPrivate: the stage has no private form.
    """
    return REGISTRY[cfg.name].dp_events(cfg, exp, n_train, noise)
