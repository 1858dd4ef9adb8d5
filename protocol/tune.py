"""The ``[tune]`` table: a FairTune search space both parties agree on (trials: :mod:`protocol.trials`).

FairTune (Dutt, Bohdal, Tsaftaris, Hospedales, "FairTune: Optimizing Parameter Efficient Fine
Tuning for Fairness in Medical Image Analysis", ICLR 2024, arXiv 2310.05055) is bi-level: an
outer hyperparameter search chooses *which* parameters are fine-tuned (per-block masks) and the
learning rate, scored on validation fairness (their default: worst-group accuracy); the inner
loop is ordinary fine-tuning. In fairsplit the validation scores are the auditor's aggregate
reports, so the developer runs the search without ever seeing an attribute.

A trial's experiment is the base ``[experiment]`` with these keys set
(:func:`protocol.trials.trial_experiment`):

* ``lora.target_modules``: LoRA placement, a mask over ``modules`` (e.g. ``attn.qkv``,
  ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) per block, or per group of ``block_groups``
  contiguous blocks (FairTune's ``auto_peft`` masks), written as the full module names
  ``blocks.<i>.<module>`` (timm) / ``encoder.layer.<i>.<module>`` (BERT-style text models);
* ``lora.r`` from ``r``; ``lr`` log-uniform in ``lr``; the method from ``methods`` and its λ
  log-uniform in ``lam`` (methods with λ), its other keys from ``[tune.methods.<name>]``;
* ``seed`` from ``seeds`` (the re-runs of a chosen trial over seeds).

The auditor, given the same ``[tune]`` table beside its ``[experiment]``, answers exactly the
experiments :func:`protocol.trials.admit` accepts: equal to its base on every other key (model, data partition,
rounds, steps, batch sizes, threshold, overlap, eval_every, LoRA α and dropout), with each tuned
key inside the declared space. Every admitted experiment is a new run against the auditor's
``max_runs`` and privacy ledger.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from .methods import METHODS, method_spec
from .privacy import PublicRefusal
from .schema import StrictModel

__all__ = ["GAPS", "NotAdmitted", "TuneConfig", "TuneSpace", "has_lam"]

#: Gaps an objective may name (keys of :func:`protocol.metrics.fairness_report`, lower is fairer).
GAPS = ("demographic_parity_difference", "equalized_odds_difference", "equal_opportunity_difference",
        "false_positive_rate_difference")


class NotAdmitted(PublicRefusal):
    """The developer's experiment is outside what the auditor's ``[tune]`` space admits (the text
    names only config keys and the declared space: nothing about the auditor's data)."""

    code = "E_NOT_ADMITTED"


def _log_range(v: list[float], what: str) -> list[float]:
    if len(v) not in (1, 2) or any(not (x > 0 and math.isfinite(x)) for x in v) or (len(v) == 2 and v[0] > v[1]):
        raise ValueError(f"{what} must be [value] or [low, high] with 0 < low <= high")
    return v


class TuneSpace(StrictModel):
    """``[tune.space]``: what a trial may change. One-element lists fix a key.

    ``modules``: LoRA candidate modules, named within a block; ``block_groups``: number of
    contiguous groups of blocks sharing one mask (None: one mask per block); ``r``: LoRA ranks
    to choose from; ``lr``: ``[low, high]`` (log-uniform) or ``[value]``; ``methods``: method
    names; ``lam``: λ range (log-uniform) for the methods that have λ; ``seeds``: experiment
    seeds admitted (default: the base's only); ``methods_config``: per-method keys other than
    ``name`` and ``lam`` (``[tune.space.methods_config.<name>]``, like ``[bench.methods]``).
    """

    modules: list[str] = Field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
                               min_length=1)
    block_groups: int | None = Field(None, ge=1)
    r: list[int] = Field(default_factory=lambda: [4, 8, 16], min_length=1)
    lr: list[float] = Field(default_factory=lambda: [1e-4, 3e-3])
    methods: list[str] = Field(default_factory=lambda: ["erm"], min_length=1)
    lam: list[float] = Field(default_factory=lambda: [0.1, 10.0])
    seeds: list[int] = Field(default_factory=list)
    methods_config: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("r")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v) or len(set(v)) != len(v):
            raise ValueError("r must list distinct ranks >= 1")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: list[float]) -> list[float]:
        return _log_range(v, "lr")

    @field_validator("lam")
    @classmethod
    def _lam(cls, v: list[float]) -> list[float]:
        return _log_range(v, "lam")

    @model_validator(mode="after")
    def _known_methods(self) -> "TuneSpace":
        for name in self.methods:
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r} in methods; known: {list(METHODS)}")
        for name, keys in self.methods_config.items():
            if name not in self.methods:
                raise ValueError(f"methods_config.{name}: not one of methods {self.methods}")
            if "name" in keys or "lam" in keys:
                raise ValueError(f"methods_config.{name}: 'name' and 'lam' are set by the search")
            try:
                method_spec(name).config.model_validate({"name": name, **keys})
            except ValidationError as err:
                e = err.errors()[0]
                raise ValueError(f"methods_config.{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}") from None
        return self

    def method_config(self, name: str, lam: float | None):
        """Method ``name``'s config: its ``methods_config`` keys, with ``lam`` when it has λ.

        Raises:
            KeyError: ``name`` not in ``methods``.
        """
        if name not in self.methods:
            raise KeyError(f"method {name!r} is not in the search space {self.methods}")
        keys = dict(self.methods_config.get(name, {}))
        if has_lam(name) and lam is not None:
            keys["lam"] = float(lam)
        return method_spec(name).config.model_validate({"name": name, **keys})


def has_lam(method: str) -> bool:
    """Whether method ``method``'s config has a λ (``lam``) the search chooses."""
    return "lam" in method_spec(method).config.model_fields


Objective = Literal["worst_group_accuracy", "gap", "constrained"]


class TuneConfig(StrictModel):
    """``[tune]``: the study (``fairsplit tune``) and the space the auditor admits.

    ``objective``:

    * ``worst_group_accuracy`` (FairTune's default, ``min_acc``): maximise the validation
      worst-group accuracy;
    * ``gap``: minimise the validation ``gap`` (one of :data:`GAPS`);
    * ``constrained``: maximise validation accuracy subject to ``gap`` ≤ ``max_gap`` (Optuna's
      constraints: infeasible trials are ranked after every feasible one).

    The value is read from the last round's validation report; every earlier validation report
    is an intermediate value (``trial.report``) that the ``pruner`` may stop a trial on, after
    ``warmup_rounds`` rounds and once ``pruner_startup_trials`` trials have finished. For
    ``constrained`` the intermediate value is the accuracy less the bound's violation,
    ``accuracy − max(0, gap − max_gap)`` (one point of excess gap costs one point of accuracy),
    so that the pruner does not stop a feasible trial for a lower accuracy than infeasible ones.
    ``trials``: default number of trials; ``sampler_seed``: TPE's seed.
    ``baseline``: the first trial is the base experiment's own placement, rank and lr (the
    default to compare with).
    """

    objective: Objective = "worst_group_accuracy"
    gap: Literal[GAPS] = "equalized_odds_difference"  # type: ignore[valid-type]
    max_gap: float = Field(0.1, gt=0.0, le=1.0)
    trials: int = Field(20, ge=1)
    pruner: Literal["successive_halving", "hyperband", "median", "none"] = "median"
    warmup_rounds: int = Field(1, ge=0)
    pruner_startup_trials: int = Field(5, ge=0)
    sampler_seed: int = 0
    baseline: bool = True
    space: TuneSpace = Field(default_factory=TuneSpace)

    def direction(self) -> str:
        """``maximize`` or ``minimize`` (Optuna's study direction)."""
        return "minimize" if self.objective == "gap" else "maximize"

    def value(self, report: dict) -> float | None:
        """The objective's value on one validation report (None when the key is not reported)."""
        key = {"worst_group_accuracy": "worst_group_accuracy", "gap": self.gap,
               "constrained": "accuracy"}[self.objective]
        v = report.get(key)
        return None if v is None else float(v)

    def intermediate(self, report: dict) -> float | None:
        """The value reported to the pruner for one validation report (see the class docs)."""
        v = self.value(report)
        if v is None or self.objective != "constrained":
            return v
        return v - max(0.0, self.violation(report))

    def violation(self, report: dict) -> float:
        """``gap − max_gap`` (≤ 0 is feasible) for ``constrained``; 0 otherwise."""
        if self.objective != "constrained":
            return 0.0
        g = report.get(self.gap)
        return 1.0 if g is None else float(g) - self.max_gap
