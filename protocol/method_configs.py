"""Each method's ``[experiment.method]`` table (pydantic, ``name``-discriminated): the keys a
method takes, their defaults, ranges and the source (paper, equation) of each method. The method
table (:mod:`protocol.methods`) holds one row per method, and builds the ``[experiment.method]``
union from its rows.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from .schema import StrictModel

__all__ = ["AdversarialConfig", "EntropyConfig", "ErmConfig", "FairNetConfig", "FairNetLocalConfig",
           "LastLayerConfig", "OrthogonalityConfig", "PenaltyConfig", "UnlearningConfig"]


class ErmConfig(StrictModel):
    """Fairness-unaware LoRA fine-tuning (empirical risk minimisation); nothing but reports cross."""

    name: Literal["erm"] = "erm"


class UnlearningConfig(StrictModel):
    """Sensitive unlearning by task-arithmetic negation (Ilharco et al. 2023): W = W0 − λ·ΔW_s.

    ``sensitive_steps`` AdamW steps (batch ``auditor_batch_size``) train the auditor's sensitive
    LoRA φ_s that defines ΔW_s = (α/r)·B_s A_s.
    """

    name: Literal["unlearning"]
    lam: float = Field(1.0, ge=0.0, description="weight λ of the negated sensitive update")
    auditor_batch_size: int = Field(64, ge=2)
    sensitive_steps: int = Field(60, ge=1)


class _DPProbe(StrictModel):
    """The DP form shared by the probe-based signals (``adversarial``, ``entropy``): under the
    auditor's differential privacy the probe g is trained with DP-SGD (``auditor_steps`` steps
    before the first signal, ``dp_probe_steps`` before each later one, Poisson rate
    ``auditor_batch_size`` / N, per-example clip ``dp_probe_clip`` in the probe gradient's units,
    ≈ the feature norm, plain SGD at lr ``auditor_lr``) and never leaves; the released adapter
    gradient is a clipped, noised sum of per-example terms (``auditor.methods.private_signal``)."""

    dp_probe_steps: int = Field(1, ge=0, description="DP-SGD steps of the probe before each signal after the first")
    dp_probe_clip: float = Field(5.0, gt=0, description="per-example clip of the probe's DP-SGD gradient")


class AdversarialConfig(_DPProbe):
    """Adversarial debiasing (Zhang, Lemoine & Mitchell 2018), R = −λ·CE(g(f_φ(x)), s).

    The auditor's linear adversary g is updated for ``auditor_steps`` Adam steps (lr
    ``auditor_lr``) on each round's batch of ``auditor_batch_size`` examples; under the auditor's
    DP, see :class:`_DPProbe`.
    """

    name: Literal["adversarial"]
    lam: float = Field(0.1, ge=0.0)
    auditor_batch_size: int = Field(64, ge=2)
    auditor_steps: int = Field(20, ge=1)
    auditor_lr: float = Field(1e-2, gt=0)


class EntropyConfig(_DPProbe):
    """Maximum-entropy representations (Roy & Boddeti 2019), R = −λ·mean H(softmax(g(f_φ(x)))).

    The sensitive classifier g is refitted from scratch every ``refresh_every`` rounds
    (``auditor_steps`` Adam steps, lr ``auditor_lr``; 0 = fitted once). Under the auditor's DP it
    is trained continuously instead (:class:`_DPProbe`; ``refresh_every`` does not apply).
    """

    name: Literal["entropy"]
    lam: float = Field(0.1, ge=0.0)
    auditor_batch_size: int = Field(64, ge=2)
    auditor_steps: int = Field(20, ge=1)
    auditor_lr: float = Field(1e-2, gt=0)
    refresh_every: int = Field(2, ge=0)


class OrthogonalityConfig(StrictModel):
    """Task LoRA orthogonal to the sensitive LoRA (O-LoRA, Wang et al. 2023), R = λ·Σ‖A_t A_sᵀ‖²_F.

    φ_s is trained as for unlearning and retrained every ``sensitive_refresh_every`` rounds
    (0 = once).
    """

    name: Literal["orthogonality"]
    lam: float = Field(1.0, ge=0.0)
    auditor_batch_size: int = Field(64, ge=2)
    sensitive_steps: int = Field(60, ge=1)
    sensitive_refresh_every: int = Field(0, ge=0)


FairStatistic = Literal["demographic_parity", "equal_opportunity", "equalized_odds", "accuracy_equality"]


class PenaltyConfig(StrictModel):
    """In-processing fairness regularisation on the auditor's labelled data (fairret NormLoss).

    R = λ·‖stat_g(p)/stat(p) − 1‖₁ over the sensitive groups g, on soft predictions p of the
    auditor's round batch (Buyl et al., ICLR 2024, "fairret: a Framework for Differentiable
    Fairness Regularization Terms", Eq. 5 with the linear-fractional statistics of Table 1):
    ``demographic_parity`` (positive rate), ``equal_opportunity`` (TPR), ``equalized_odds`` (TPR
    and FPR stacked), ``accuracy_equality`` (accuracy). The gradient crosses for the adapter and
    the head.

    Constraint form: with ``bound`` set, λ is a Lagrange multiplier the auditor adapts every
    round by projected dual ascent on its own validation gap (Cotter et al. 2019; Tran et al.
    2021): λ ← max(0, λ + ``dual_lr``·(gap_val − bound)), starting from ``lam``; the gap is the
    fairlearn metric of the statistic (DPD, TPR difference, equalized odds difference, accuracy
    difference) at ``experiment.threshold``. The update (a full pass over the validation part)
    runs every ``dual_every`` rounds (default ``experiment.eval_every``, so λ changes only when a
    validation report is released anyway); λ is kept in between.
    """

    name: Literal["penalty"]
    lam: float = Field(1.0, ge=0.0)
    statistic: FairStatistic = "equalized_odds"
    bound: float | None = Field(None, gt=0.0, lt=1.0, description="accepted gap ε (constraint form)")
    dual_lr: float = Field(10.0, gt=0.0, description="dual ascent step on λ per unit of gap")
    dual_every: int | None = Field(None, ge=1, description="rounds between dual updates "
                                   "(default: experiment.eval_every)")
    auditor_batch_size: int = Field(128, ge=2)


LastLayerConstraint = Literal["EO", "DI", "AE", "MMF"]

#: Methods that can be last_layer's first stage (every method but last_layer itself).
FirstStageConfig = Annotated[
    Union[ErmConfig, UnlearningConfig, AdversarialConfig, EntropyConfig, OrthogonalityConfig, PenaltyConfig],
    Field(discriminator="name"),
]


class LastLayerConfig(StrictModel):
    """Last-layer fairness fine-tuning (Mao et al. 2023, arXiv 2304.03935), after ERM training.

    After the last round the auditor refits the developer's head on its own representations
    f_φ(x) of its training part with CE + α·L_fair, for each α in ``alphas``, and keeps the α whose
    head has the smallest validation gap among those within ``max_accuracy_drop`` of the
    reference validation accuracy: ``accuracy_reference = "incoming"`` (default) the developer's
    own head's, so the refit is as fair as it can be without costing more than that much accuracy
    against the model the developer trained; ``"best_refit"`` the most accurate refit's. ``constraint``: ``EO`` (equalized odds), ``DI`` (demographic parity /
    disparate impact), ``AE`` (accuracy equality), ``MMF`` (max-min fairness: the worst group's
    loss). ``balanced``: refit on a group×class-balanced subsample (the paper's M2, as DFR).
    ``refit_steps`` full-batch Adam steps at lr ``refit_lr``, starting from the developer's head.
    Only the new head crosses, with the developer's head's keys and shapes. Under the auditor's
    differential privacy (``dp_refit``): ``"stats"`` releases, once, noisy
    per-(group, label) counts and clipped feature sums of the training part and computes every
    head of ``dp_stats_alphas`` from them in closed form, the incoming head projected away from
    the groups' mean differences (:mod:`auditor.methods.private_head`; ``EO``, ``DI``);
    ``"sgd"`` (default) is one DP-SGD path (Poisson batches of expected size ``dp_batch_size``,
    per-example clip ``dp_clip_norm``) from the incoming head through the α of ``dp_alphas`` in
    increasing order, ``dp_refit_steps`` steps at each, the head at the end of each segment a
    candidate: the grid costs the steps of one path, every step costs ε. The path changes the head
    only within the span of ``refit_basis`` (the top ``dp_subspace_dim`` principal directions of
    the developer's own training features, sent with the head-refit request): the noise then
    falls on k directions instead of D (``dp_subspace_dim`` ≥ D: the whole space; the exact and
    ``"stats"`` refits do not use it). Either way the α is
    chosen on noisy validation reports, one per candidate. ``MMF`` and ``balanced`` have no
    private form.

    ``first_stage``: the method the developer trains with before the refit (default ERM), with
    its own keys, e.g. ``first_stage = {name = "penalty", lam = 0.25}``; its requests and
    releases are those of its own row.
    """

    name: Literal["last_layer"]
    first_stage: FirstStageConfig = Field(default_factory=lambda: ErmConfig())
    constraint: LastLayerConstraint = "EO"
    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
                                min_length=1)
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0)
    accuracy_reference: Literal["incoming", "best_refit"] = "incoming"
    balanced: bool = False
    refit_steps: int = Field(300, ge=1)
    refit_lr: float = Field(1e-2, gt=0)
    dp_refit: Literal["stats", "sgd"] = Field(
        "sgd", description="the refit under the auditor's DP: 'stats', the fair projection of "
        "the incoming head from one release of noisy per-(group, label) counts and feature sums "
        "(any α grid at the cost of one head; EO, DI); 'sgd', one DP-SGD path through dp_alphas")
    dp_stats_alphas: list[float] = Field(
        default_factory=lambda: [0.0, 1.0, 3.0, 10.0, 100.0, 10000.0], min_length=1,
        description="the α grid of the 'stats' refit (α / tr Q weighs the squared mean-score "
        "differences; large α removes them); each α > 0 costs one validation report")
    dp_alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75], min_length=1,
                                   description="the α of the 'sgd' refit's path under the auditor's DP, "
                                   "taken in increasing order")
    dp_refit_steps: int = Field(25, ge=1, description="DP-SGD steps at each α of the path under DP")
    dp_batch_size: int = Field(512, ge=1, description="expected Poisson batch of the DP refit")
    dp_clip_norm: float = Field(5.0, gt=0, description="per-example gradient clip C of the DP "
                                "refit, in the head gradient's units (≈ the projected feature norm)")
    dp_refit_lr: float = Field(0.03, gt=0, description="Adam's lr on the DP refit's path")
    dp_subspace_dim: int = Field(32, ge=1, description="k: the DP refit changes the head only "
                                 "within the top-k principal directions of the developer's own "
                                 "training features (sent with the head-refit request)")

    @model_validator(mode="after")
    def _alphas_nonnegative(self) -> "LastLayerConfig":
        if any(a < 0 for a in self.alphas + self.dp_alphas + self.dp_stats_alphas):
            raise ValueError("alphas must be >= 0")
        return self


class _FairNetBase(StrictModel):
    """What both FairNet variants share (Zhou, Liu & Jiang, NeurIPS 2025, arXiv 2510.19421).

    Stages: ``experiment.rounds`` rounds of ERM (stage 1); then the developer's bias detector is
    trained without any attribute (stage 2, FairNet-Unlabeled's path: scikit-learn's
    ``LocalOutlierFactor`` with ``lof_neighbors`` neighbours and ``lof_contamination`` on the
    CLS / mean-pooled hidden state of block ``detector_layer`` of up to ``detector_examples``
    developer examples gives pseudo-minority labels,
    which train the attention-pooling + MLP detector with class-weighted BCE (``pseudo_labels =
    "errors"`` instead takes the developer's examples the ERM model misclassifies, as JTT does:
    Liu et al. 2021, "Just Train Twice"),
    ``detector_steps`` Adam steps of batch ``detector_batch_size`` at lr ``detector_lr``); then
    ``cond_rounds`` rounds train the conditional LoRA φ_c (same r and lora_alpha as the task
    LoRA, zero-initialised B) on the developer's task loss with φ_c on plus the triplet loss of
    the paper's Eq. 2 weighted by λ (stages 3 and 4), ``local_steps`` Adam steps per round at lr
    ``cond_lr``, the task LoRA and head frozen. (The paper's stage 4 has the triplet term alone;
    under Adam λ would then have no effect, and alone it collapsed the representation here:
    docs/methods.md.) At inference the gate applies
    φ_c to flagged inputs only: ``W0·x + B·A·x + 1[p(x) > τ]·(α/r)·B_c·A_c·x``
    (:mod:`protocol.conditional`). τ: ``tau`` while training; after the last round the auditor
    chooses τ among ``taus`` (and 1, the ungated model) on its validation part: the largest
    worst-group accuracy among the τ within ``max_accuracy_drop`` of the ungated model's
    validation accuracy.
    """

    lam: float = Field(0.1, ge=0.0, description="weight λ of the contrastive term")
    margin: float = Field(0.5, ge=0.0, description="triplet margin (squared Euclidean units)")
    cond_rounds: int = Field(40, ge=1, description="rounds of conditional-LoRA training after ERM")
    cond_lr: float = Field(5e-4, gt=0)
    cond_task: Literal["ce", "kl", "none"] = Field("ce", description="the developer's own term "
                                                   "for φ_c: task cross-entropy with φ_c on, KL "
                                                   "from the ERM model's predictions, or none")
    tau: float = Field(0.5, gt=0.0, lt=1.0, description="gate threshold while training")
    taus: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.3, 0.5, 0.7, 0.9], min_length=1,
                              description="gate thresholds the auditor chooses from on validation")
    max_accuracy_drop: float = Field(0.005, ge=0.0, le=1.0)
    detector_layer: int | None = Field(None, ge=0, description="block whose hidden states the "
                                       "detector reads (default: the middle block, depth // 2)")
    detector_hidden: int = Field(64, ge=1)
    detector_examples: int = Field(3000, ge=50, description="developer examples (a seeded subset) "
                                   "for LOF and the detector")
    detector_steps: int = Field(200, ge=1)
    detector_lr: float = Field(1e-3, gt=0)
    detector_batch_size: int = Field(64, ge=2)
    pseudo_labels: Literal["lof", "errors"] = Field("lof", description="where the detector's "
                                                   "pseudo-minority labels come from")
    lof_neighbors: int = Field(20, ge=1)
    lof_contamination: float = Field(0.1, gt=0.0, le=0.5)

    @model_validator(mode="after")
    def _taus_in_range(self) -> "_FairNetBase":
        if any(not 0.0 <= t <= 1.0 for t in self.taus):
            raise ValueError("taus must lie in [0, 1]")
        return self


class FairNetConfig(_FairNetBase):
    """FairNet in the split: the developer's attribute-free detector gates a conditional LoRA
    trained with the auditor's contrastive gradient on its true groups.

    Each conditional round the auditor computes, on a seeded batch of ``auditor_batch_size``
    minority examples of its training part, the paper's Eq. 2 with static prototypes μ(y, s) of
    its own training part under the ERM model. Per class y one group is the reference "majority"
    maj(y), every other group of y is minority: ``minority = "accuracy"`` (default) takes as
    maj(y) the group the ERM model classifies best within class y on the auditor's training
    part, so the anchors are the bias-conflicting cells the model gets wrong; ``"size"`` the
    group with most examples of class y (the paper's under-representation). ``R = λ·mean_i max(0, ‖z_i − μ(y_i, maj_y)‖² − min_{y'≠y_i} ‖z_i − μ(y', maj_y')‖²
    + margin)``, z_i the pooled representation with φ_c on, and returns ∇_{φ_c} R only.
    """

    name: Literal["fairnet"]
    auditor_batch_size: int = Field(64, ge=2)
    minority: Literal["accuracy", "size"] = "accuracy"
    report_detector_auc: bool = Field(False, description="release, with each signal, the ROC AUC "
                                      "of the developer's detector for the auditor's minority "
                                      "membership on a seeded batch (an oracle: docs/methods.md)")


class FairNetLocalConfig(_FairNetBase):
    """FairNet-Unlabeled end to end on the developer's side (the baseline that measures the
    auditor's contribution): prototypes per (y, pseudo-minority) and anchors from the LOF
    pseudo-labels of the developer's own data; nothing but reports (and the τ choice) cross."""

    name: Literal["fairnet_local"]
