"""The method table: every training method, what it crosses, and its configuration.

One row per method (:data:`METHODS`). A row names the method, says what crosses the wire for it
(``crosses``: ``adapter_gradient``, ``head_gradient``, ``head``, ``weight_update``,
``cond_adapter_gradient``), which request the developer sends when (``round0_want``,
``round_want``, ``cond_want``, ``final_want``), whether its requests carry a gated model
(``gated``: FairNet's conditional LoRA and bias detector), the default λ grid of
``fairsplit bench fairness``, and the method's own config model. ``[experiment.method]`` is a
``name``-discriminated union of those models (as ``DataConfig`` is on ``kind``): a key that
belongs to another method is an error naming the key.

Both parties read this table: the developer's loop (what to ask for each round, what to add to
which gradient), the payload policy (which records a reply holds) and the auditor's method
registry (:mod:`auditor.methods`, one module per row; ``tests/test_methods_registry.py`` checks
that both name the same methods).

Adding a method: one config model (:mod:`protocol.method_configs`) and one row here, one module
in ``auditor/methods/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import Field

from .method_configs import (
    AdversarialConfig,
    EntropyConfig,
    ErmConfig,
    FairNetConfig,
    FairNetLocalConfig,
    LastLayerConfig,
    OrthogonalityConfig,
    PenaltyConfig,
    UnlearningConfig,
)
from .schema import StrictModel

__all__ = [
    "CROSSES",
    "METHODS",
    "AdversarialConfig",
    "EntropyConfig",
    "ErmConfig",
    "FairNetConfig",
    "FairNetLocalConfig",
    "LastLayerConfig",
    "MethodConfig",
    "MethodSpec",
    "OrthogonalityConfig",
    "PenaltyConfig",
    "RequestPlan",
    "UnlearningConfig",
    "method_lam",
    "method_spec",
    "request_plan",
    "total_rounds",
]

#: What a method may make cross from the auditor to the developer.
CROSSES = ("adapter_gradient", "head_gradient", "head", "weight_update", "cond_adapter_gradient")
Want = Literal["none", "signal", "unlearning_update", "head", "threshold"]


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table.

    ``round0_want``: what the developer asks for before round 1 (``none`` = nothing);
    ``round_want``: what it asks for after each round but the last; ``cond_want``: what it asks
    for after each of the conditional rounds' predecessors (gated methods: after ERM round R
    and every conditional round but the last); ``final_want``: what it asks for after the last
    round, before the test report; ``gated``: every request carries the conditional LoRA and
    the bias detector (records ``cond_adapter`` and ``detector``), and the auditor evaluates the
    gated model; ``crosses``: what the auditor releases;
    ``lams``: default λ grid (empty: the method has no λ, or chooses its own on validation);
    ``private``: the auditor has a differentially private form of every release (its objective
    is written per example: clipped per-example gradients, noisy counts); the others are refused
    under ``[auditor.privacy]`` (``docs/privacy.md``).
    """

    name: str
    config: type[StrictModel]
    crosses: frozenset[str]
    round0_want: Want
    round_want: Want
    final_want: Want
    lams: tuple[float, ...]
    source: str
    private: bool = False
    gated: bool = False
    cond_want: Want = "none"

    @property
    def wants(self) -> frozenset[str]:
        """The request kinds (``want`` values other than ``none``) this method is asked."""
        return frozenset({self.round0_want, self.round_want, self.cond_want, self.final_want} - {"none"})

    def __post_init__(self) -> None:
        unknown = set(self.crosses) - set(CROSSES)
        if unknown:
            raise ValueError(f"method {self.name}: unknown crossing(s) {sorted(unknown)}")


def _row(name, config, crosses, round0, each, final, lams, source, private=False, gated=False,
         cond="none") -> MethodSpec:
    return MethodSpec(name, config, frozenset(crosses), round0, each, final, tuple(lams), source, private,
                      gated, cond)


#: The method table (name → row), in the order tables and CLIs list them.
METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    _row("erm", ErmConfig, (), "none", "none", "none", (), "ERM baseline", private=True),
    _row("unlearning", UnlearningConfig, ("weight_update",), "unlearning_update", "none", "none",
         (0.1, 0.5, 1.0, 2.0), "Ilharco et al. 2023, task negation"),
    _row("adversarial", AdversarialConfig, ("adapter_gradient",), "signal", "signal", "none",
         (0.01, 0.03, 0.1, 0.3), "Zhang, Lemoine & Mitchell 2018", private=True),
    _row("entropy", EntropyConfig, ("adapter_gradient",), "signal", "signal", "none",
         (0.01, 0.03, 0.1, 0.3), "Roy & Boddeti 2019", private=True),
    _row("orthogonality", OrthogonalityConfig, ("adapter_gradient",), "signal", "signal", "none",
         (0.1, 1.0, 10.0, 100.0), "Wang et al. 2023 (O-LoRA)", private=True),
    _row("penalty", PenaltyConfig, ("adapter_gradient", "head_gradient"), "signal", "signal", "none",
         (0.25, 0.5, 1.0, 2.0), "Buyl et al. 2024 (fairret); Cotter et al. 2019 (constraint form)", private=True),
    _row("last_layer", LastLayerConfig, ("head",), "none", "none", "head", (),
         "Mao et al. 2023, last-layer fairness fine-tuning", private=True),
    _row("fairnet", FairNetConfig, ("cond_adapter_gradient",), "none", "none", "threshold",
         (0.03, 0.1, 0.3), "Zhou, Liu & Jiang 2025 (FairNet), Eq. 2; detector without s", private=True, gated=True,
         cond="signal"),
    _row("fairnet_local", FairNetLocalConfig, (), "none", "none", "threshold", (0.03, 0.1, 0.3),
         "Zhou, Liu & Jiang 2025 (FairNet-Unlabeled), on the developer's data", private=True,
         gated=True),
)}

#: ``[experiment.method]``: one of the rows' config models, discriminated on ``name`` (a key of
#: another method is an error naming it). Built from the table: a new row is a new choice.
MethodConfig = Annotated[Union[tuple(spec.config for spec in METHODS.values())], Field(discriminator="name")]


@dataclass(frozen=True)
class RequestPlan:
    """What the developer asks for when, for one method config, and which row governs each request.

    ``stage[want]`` is the method whose row decides what crosses for a request of that kind (sent
    as ``RoundRequest.stage``): the method itself, or for ``last_layer`` its first stage's for
    that stage's requests.
    """

    round0_want: Want
    round_want: Want
    final_want: Want
    stage: dict[str, str]
    lam: float
    cond_want: Want = "none"
    cond_rounds: int = 0

    @property
    def wants(self) -> frozenset[str]:
        """The request kinds (other than ``none``) of this plan."""
        return frozenset({self.round0_want, self.round_want, self.cond_want, self.final_want} - {"none"})

    def want_after(self, round_: int, rounds: int) -> str:
        """What the request after round ``round_`` asks for, in a run of ``rounds`` ERM rounds
        (plus ``cond_rounds``): ``round_want`` before round R, ``cond_want`` from round R to
        the last conditional round's predecessor, ``none`` after the last round."""
        if round_ >= rounds + self.cond_rounds:
            return "none"
        return self.round_want if round_ < rounds else self.cond_want


def request_plan(cfg: StrictModel) -> RequestPlan:
    """The :class:`RequestPlan` of a method config (``[experiment.method]``).

    ``lam``: the λ the developer applies itself (unlearning's), the first stage's for last_layer.
    """
    spec = method_spec(cfg.name)
    first = getattr(cfg, "first_stage", None)
    if first is None:
        return RequestPlan(spec.round0_want, spec.round_want, spec.final_want,
                           {w: cfg.name for w in ("none", *spec.wants)}, method_lam(cfg),
                           spec.cond_want, int(getattr(cfg, "cond_rounds", 0)))
    inner = request_plan(first)
    return RequestPlan(inner.round0_want, inner.round_want, spec.final_want,
                       {**inner.stage, "none": cfg.name, spec.final_want: cfg.name}, inner.lam)


def total_rounds(exp) -> int:
    """Rounds of a run of ``exp``: ``exp.rounds``, plus a gated method's ``cond_rounds``."""
    return int(exp.rounds) + int(getattr(exp.method, "cond_rounds", 0))


def method_spec(name: str) -> MethodSpec:
    """The table row of method ``name``.

    Raises:
        KeyError: no such method (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {list(METHODS)}") from None


def method_lam(cfg: StrictModel) -> float:
    """The method's λ (0.0 for a method without one)."""
    return float(getattr(cfg, "lam", 0.0))
