"""The local-run file of ``fairsplit run`` / ``bench`` / ``tune``: both parties' tables in one
file (``[experiment]`` + ``[developer]`` + ``[auditor]``, + ``[bench]``, + ``[tune]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from fairsplit.auditor.config import AuditorConfig, AuditorFile
from fairsplit.developer.config import DeveloperConfig, DeveloperFile
from fairsplit.protocol.config import ExperimentConfig, load_toml
from fairsplit.protocol.methods import METHODS, method_spec
from fairsplit.protocol.schema import StrictModel
from fairsplit.protocol.tune import TuneConfig

__all__ = ["BenchConfig", "RunFile", "load_run_file"]


class BenchConfig(StrictModel):
    """``[bench]`` of a local-run file: per-method settings for ``fairsplit bench fairness``.

    ``[bench.methods.<name>]`` holds the keys of method ``<name>``'s config (without ``name``;
    ``lam`` is set by the benchmark's grid), e.g. ``[bench.methods.adversarial] auditor_steps = 20``.
    Each table is validated against that method's config model: an unknown method or a key
    that belongs to another method is an error.
    """

    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, keys in v.items():
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r}; known: {list(METHODS)}")
            if "name" in keys:
                raise ValueError(f"bench.methods.{name}: 'name' is implied by the table's name")
            try:
                method_spec(name).config.model_validate({"name": name, **keys})
            except ValidationError as err:
                e = err.errors()[0]
                loc = ".".join(map(str, e["loc"]))
                raise ValueError(f"bench.methods.{name}.{loc}: {e['msg']}") from None
        return v

    def method_config(self, name: str, lam: float | None = None):
        """Method ``name``'s config from its table (defaults elsewhere), with ``lam`` if given.

        Raises:
            KeyError: unknown method; ValueError: ``lam`` given for a method without λ.
        """
        spec = method_spec(name)
        keys = dict(self.methods.get(name, {}))
        if lam is not None:
            if "lam" not in spec.config.model_fields:
                raise ValueError(f"method {name!r} has no λ")
            keys["lam"] = lam
        return spec.config.model_validate({"name": name, **keys})


class RunFile(StrictModel):
    """A local-run file for ``fairsplit run``: both parties' tables in one file (+ ``[bench]``,
    + ``[tune]`` for ``fairsplit tune``)."""

    experiment: ExperimentConfig
    developer: DeveloperConfig
    auditor: AuditorConfig
    bench: BenchConfig = Field(default_factory=BenchConfig)
    tune: TuneConfig | None = None

    def developer_file(self) -> DeveloperFile:
        """The developer's part only (what the developer process is given)."""
        return DeveloperFile(experiment=self.experiment, developer=self.developer, tune=self.tune)

    def auditor_file(self) -> AuditorFile:
        """The auditor's part only (what the auditor process is given; its ``[tune]`` is the
        search space it admits)."""
        return AuditorFile(experiment=self.experiment, auditor=self.auditor, tune=self.tune)


def load_run_file(path: str | Path) -> RunFile:
    """Load a local-run config (all three tables).

    Raises:
        protocol.config.ConfigError: naming the file and the key.
    """
    return load_toml(RunFile, path)
