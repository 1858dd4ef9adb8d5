"""fairsplit: fair LoRA fine-tuning where the sensitive attributes never leave the auditor.

Installed, the repository's folders are subpackages of this one name:

* ``fairsplit.developer``: the developer's side (task data, backbone, LoRA + head, the run).
* ``fairsplit.auditor``: the auditor's side (its data with s, the methods' signals, the ledger).
* ``fairsplit.protocol``: what both agree on (configs, model spec, codecs, payload policy, metrics).
* ``fairsplit.deploy``: what starts or combines both parties (CLI, launchers, co-located runner).

The small public API below is loaded lazily (PEP 562), so ``import fairsplit.developer`` loads
nothing of the auditor's side:

>>> from fairsplit import load_run_file, run_colocated, fairness_report  # doctest: +SKIP
>>> result = run_colocated(load_run_file("examples/utkface_erm.toml"), Path("out"))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name → the module that defines it
_PUBLIC = {
    # the experiment and each party's config (pydantic models; docs: README "Configuration")
    "RunFile": "fairsplit.deploy.config",
    "ExperimentConfig": "fairsplit.protocol.config",
    "DeveloperConfig": "fairsplit.developer.config",
    "AuditorConfig": "fairsplit.auditor.config",
    "PrivacyConfig": "fairsplit.auditor.config",
    "ConfigError": "fairsplit.protocol.config",
    "load_run_file": "fairsplit.deploy.config",
    # fairlearn-defined group metrics of one model's predictions
    "fairness_report": "fairsplit.protocol.metrics",
    # both parties in one process (experiments)
    "run_colocated": "fairsplit.deploy.colocated",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Load a public name on first use.

    Raises:
        AttributeError: ``name`` is not part of the public API.
    """
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fairsplit' has no attribute {name!r}; public names: {', '.join(__all__)}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
