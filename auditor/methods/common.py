"""Helpers shared by the auditor's methods: the fairness terms on its own data (``docs/methods.md``).

Notation: frozen backbone with LoRA matrices A (r × d_in), B (d_out × r) per target module; the
developer's task adapter φ_t; the auditor's examples x with sensitive groups s ∈ {0..G-1};
f_φ(x) ∈ R^D the pooled representation; λ = ``method.lam``.

* adversarial (Zhang, Lemoine & Mitchell, 2018, "Mitigating Unwanted Biases with Adversarial
  Learning"; Ganin & Lempitsky, 2015, gradient reversal): an adversary g: R^D → R^G predicts s
  from f_φ(x); R = −λ·CE(g(f_φ(x)), s), so descending R ascends the adversary's loss.
* entropy (maximum-entropy debiasing, e.g. Roy & Boddeti, 2019, "Mitigating Information Leakage
  in Image Representations: A Maximum Entropy Approach"): a sensitive classifier g is fitted on
  the representations, R = −λ·mean_i H(softmax(g(f_φ(x_i)))).
* orthogonality (O-LoRA, Wang et al., 2023, "Orthogonal Subspace Learning for Language Model
  Continual Learning"): R = λ·Σ_modules ‖A_t A_sᵀ‖²_F with A_s from the auditor's sensitive LoRA.
* unlearning (task arithmetic by negation, Ilharco et al., 2023, "Editing Models with Task
  Arithmetic"): ΔW_s = (α/r)·B_s A_s per module from the auditor's sensitive LoRA.

Every function returns gradients with exactly the adapter's keys (peft state-dict names), or the
per-module ΔW_s, plus aggregates over the batch. Nothing here is sent as is: the service passes
it through :func:`protocol.messages.make_reply`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairsplit.protocol.config import ExperimentConfig
from fairsplit.protocol.model import FairsplitModel, adapter_parameters, build_model, lora_modules

__all__ = [
    "adversarial_term",
    "batch_indices",
    "encode_groups",
    "entropy_term",
    "fit_probe",
    "orthogonality_term",
    "sensitive_A",
    "sensitive_update",
    "train_sensitive_adapter",
]


def encode_groups(s: np.ndarray, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Integer codes (N,) int64 for group names, and the sorted list of names (the code order)."""
    names = names if names is not None else sorted(set(map(str, s)))
    index = {g: i for i, g in enumerate(names)}
    return np.array([index[str(g)] for g in s], dtype=np.int64), names


def batch_indices(n: int, size: int, seed: int, round_: int, salt: int = 0) -> np.ndarray:
    """A deterministic sample of ``min(size, n)`` distinct indices for (seed, round, salt)."""
    rng = np.random.default_rng([seed, round_, salt])
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def _inputs(data_inputs, idx):
    return data_inputs[idx] if isinstance(data_inputs, np.ndarray) else [data_inputs[i] for i in idx]


@torch.no_grad()
def _features(model: FairsplitModel, inputs, device, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = [model.features(model.prepare(inputs[i:i + batch_size], device))
           for i in range(0, len(inputs), batch_size)]
    return torch.cat(out)


def fit_probe(features: torch.Tensor, s: torch.Tensor, n_groups: int, steps: int, lr: float,
              init: dict[str, torch.Tensor] | None, seed: int) -> nn.Linear:
    """Fit a linear sensitive classifier g: R^D → R^G on fixed representations.

    Args:
        features: (N, D) detached representations; s: (N,) int64 group codes.
        steps: full-batch Adam steps (lr ``lr``), starting from ``init`` (weights ``weight``
            (G, D), ``bias`` (G,)) or from an initialisation seeded with ``seed`` (the service
            passes ``experiment seed + round``).

    Deterministic for the same inputs: the initialisation draws from a forked RNG seeded with
    ``seed`` (the caller's global torch RNG is left untouched) and the fit is full-batch.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = nn.Linear(features.shape[1], n_groups)
    if init is not None:
        probe.load_state_dict(init)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(features), s).backward()
        opt.step()
    return probe


def _grads(model: FairsplitModel, objective: torch.Tensor) -> dict[str, torch.Tensor]:
    params = adapter_parameters(model)
    grads = torch.autograd.grad(objective, list(params.values()), allow_unused=True)
    return {k: (torch.zeros_like(p) if g is None else g).detach().cpu()
            for (k, p), g in zip(params.items(), grads)}


def adversarial_term(model: FairsplitModel, adversary: nn.Linear, inputs, s: torch.Tensor,
                     lam: float, device="cpu") -> tuple[dict[str, torch.Tensor], float, float]:
    """R = −λ·CE(g(f_φ(x)), s) (mean over the batch) and ∇_φ R.

    Args:
        inputs: a batch of B raw inputs; s: (B,) int64 group codes; adversary: g (fixed here).
    Returns:
        (gradient per adapter key, R, adversary accuracy on the batch).
    """
    model.eval()
    feats = model.features(model.prepare(inputs, device))
    logits = adversary(feats)
    objective = -lam * F.cross_entropy(logits, s)
    acc = float((logits.argmax(-1) == s).float().mean())
    return _grads(model, objective), float(objective.detach()), acc


def entropy_term(model: FairsplitModel, classifier: nn.Linear, inputs, s: torch.Tensor, lam: float,
                 device="cpu") -> tuple[dict[str, torch.Tensor], float, float]:
    """R = −λ·mean H(softmax(g(f_φ(x)))) and ∇_φ R (H in nats).

    ``s`` is used only for the reported classifier accuracy. Returns (gradients, R, accuracy).
    """
    model.eval()
    feats = model.features(model.prepare(inputs, device))
    logits = classifier(feats)
    logp = F.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    objective = -lam * entropy
    acc = float((logits.argmax(-1) == s).float().mean())
    return _grads(model, objective), float(objective.detach()), acc


def orthogonality_term(model: FairsplitModel, a_s: dict[str, torch.Tensor], lam: float
                       ) -> tuple[dict[str, torch.Tensor], float]:
    """R = λ·Σ_modules ‖A_t A_sᵀ‖²_F and ∇ R (non-zero for the A_t only; ∇_A = 2λ A_t A_sᵀ A_s).

    Args:
        a_s: module name → A_s (r_s × d_in) of the auditor's sensitive LoRA.
    Raises:
        KeyError: a module of the task adapter has no sensitive counterpart.
    """
    params = adapter_parameters(model)
    objective = torch.zeros(())
    for module, a_sens in a_s.items():
        a_t = params[f"{module}.lora_A.weight"]
        objective = objective + (a_t @ a_sens.to(a_t).T).pow(2).sum()
    objective = lam * objective
    return _grads(model, objective), float(objective.detach())


def train_sensitive_adapter(exp: ExperimentConfig, inputs, s: np.ndarray, n_groups: int,
                            device="cpu") -> tuple[FairsplitModel, float]:
    """Fine-tune the auditor's own sensitive LoRA φ_s + head to predict s from x.

    Starts from the pretrained backbone W0 (no task adapter), LoRA config as the experiment's,
    ``method.sensitive_steps`` AdamW steps (lr ``exp.lr``, batch ``method.auditor_batch_size``)
    with seeded batches. Returns (model with φ_s, training accuracy over the last 5 steps).
    φ_s and its head never leave the auditor.

    Deterministic for a given experiment and data: the model is built from seed
    ``exp.seed + 101``, batches come from :func:`batch_indices` with that seed, and any random
    draw (LoRA dropout) uses a forked torch RNG, so the caller's global RNG is left untouched.
    """
    with torch.random.fork_rng():
        return _train_sensitive_adapter(exp, inputs, s, n_groups, device)


def _train_sensitive_adapter(exp: ExperimentConfig, inputs, s: np.ndarray, n_groups: int,
                             device) -> tuple[FairsplitModel, float]:
    model = build_model(exp, seed=exp.seed + 101).to(device)
    model.head = nn.Linear(model.feature_dim, n_groups).to(device)
    params = [p for n, p in model.named_parameters() if "lora_" in n] + list(model.head.parameters())
    for p in model.head.parameters():
        p.requires_grad = True
    opt = torch.optim.AdamW(params, lr=exp.lr)
    st = torch.as_tensor(s)
    accs = []
    model.train()
    for step in range(exp.method.sensitive_steps):
        idx = batch_indices(len(s), exp.method.auditor_batch_size, exp.seed + 101, step)
        logits = model(model.prepare(_inputs(inputs, idx), device))
        loss = F.cross_entropy(logits, st[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        accs.append(float((logits.argmax(-1).cpu() == st[idx]).float().mean()))
    model.eval()
    return model, float(np.mean(accs[-5:]))


def sensitive_update(model_s: FairsplitModel) -> dict[str, torch.Tensor]:
    """ΔW_s = (lora_alpha / r)·B_s A_s per target module, computed by peft (exact, per module)."""
    return {name: m.get_delta_weight("default").detach().cpu().clone()
            for name, m in lora_modules(model_s).items()}


def sensitive_A(model_s: FairsplitModel) -> dict[str, torch.Tensor]:
    """A_s (r × d_in) per target module of the sensitive LoRA."""
    return {name: m.lora_A["default"].weight.detach().cpu().clone()
            for name, m in lora_modules(model_s).items()}
