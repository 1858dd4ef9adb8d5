"""The developer's own configuration: ``[developer]`` (its task data, without sensitive
attributes, and its machine) and the developer's file, ``[experiment]`` + ``[developer]``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from fairsplit.protocol.config import ExperimentConfig, load_toml
from fairsplit.protocol.schema import FilePath, StrictModel
from fairsplit.protocol.sources import BiasInjection, DataConfig, names_sensitive
from fairsplit.protocol.tune import TuneConfig

__all__ = ["DeveloperConfig", "DeveloperFile", "load_developer_file"]


class DeveloperConfig(StrictModel):
    """The developer's own settings: its task data (no sensitive attributes) and machine."""

    data: DataConfig
    bias_injection: BiasInjection | None = None
    device: str = "cpu"
    num_threads: int | None = Field(None, ge=1)
    cache_dir: FilePath | None = None
    superlink: str = "127.0.0.1:9092"

    @model_validator(mode="after")
    def _no_sensitive(self) -> "DeveloperConfig":
        if names_sensitive(self.data):
            raise ValueError("the developer's data config must not name sensitive attributes")
        if getattr(self.data, "group_map", None):
            raise ValueError("data.group_map: the developer holds no sensitive groups to merge")
        return self


class DeveloperFile(StrictModel):
    """A developer's config file: ``[experiment]`` + ``[developer]`` (+ the study's ``[tune]``)."""

    experiment: ExperimentConfig
    developer: DeveloperConfig
    tune: TuneConfig | None = None


def load_developer_file(path: str | Path) -> DeveloperFile:
    """Load a developer config (``[experiment]`` + ``[developer]``).

    Raises:
        protocol.config.ConfigError: naming the file and the key.
    """
    return load_toml(DeveloperFile, path)
