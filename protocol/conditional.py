"""FairNet's gated model, built identically by both parties (Zhou, Liu & Jiang, NeurIPS 2025,
"FairNet: Dynamic Fairness Correction without Performance Loss via Contrastive Conditional LoRA",
arXiv 2510.19421, Sec. 3 and Eq. 1).

A :class:`GatedModel` wraps a :class:`protocol.model.FairsplitModel` (frozen backbone, task LoRA,
head) with

* a **conditional LoRA** φ_c (:class:`ConditionalLoRA`): one pair A_c (r × d_in), B_c
  (d_out × r) beside every task-LoRA module, added to that module's output through a forward
  hook, per example: ``y = W0·x + (α/r)·B·A·x + g·(α/r)·B_c·A_c·x`` with g ∈ {0, 1} the
  example's gate. B_c starts at zero, so a fresh φ_c changes nothing;
* a **bias detector** (:class:`BiasDetector`): attention pooling over the hidden states of one
  backbone block (``detector_layer``), then an MLP, giving p(x) = σ(logit) that x is a
  "minority" input.

The gate is ``g(x) = 1[p(x) > τ]``, with the closed limits τ ≤ 0 (φ_c everywhere) and τ ≥ 1
(nowhere: the task model). p(x) is read with φ_c off, so the gated logits are: one pass with φ_c
off (logits and p for every input), then a pass with φ_c on for the flagged inputs only. The
backbone treats examples independently in eval mode, so this per-example choice between the two
outputs is exactly the formula above applied in every layer.

peft cannot do this itself: its per-example adapter selection (``adapter_names``) picks one
adapter per example, not the task adapter plus a second one, hence the hook.

Wire form (:mod:`protocol.policy`): ``cond_adapter`` holds ``<module>.cond_A.weight`` and
``<module>.cond_B.weight`` per task-LoRA module; ``detector`` holds the detector's parameters
(``pool.*``, ``mlp.*``) and ``threshold``, the τ the gate uses (a 0-d tensor).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .model import FairsplitModel, TensorSpec, lora_modules, state_spec

__all__ = [
    "BiasDetector",
    "ConditionalLoRA",
    "GatedModel",
    "block_list",
    "build_gated",
    "contrastive_term",
    "gate_mask",
    "gated_scores",
    "prototypes",
]


def block_list(model: FairsplitModel) -> nn.ModuleList:
    """The backbone's repeated blocks (timm ``blocks``, BERT ``encoder.layer``).

    Raises:
        ValueError: the backbone has no such list.
    """
    root = model.backbone.base_model.model
    for prefix in ("blocks", "encoder.layer", "layers", "transformer.h"):
        mod = root
        for part in prefix.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > 0:
            return mod
    raise ValueError(f"{model.spec.name}: no block list (blocks / encoder.layer) for the detector")


def gate_mask(p: torch.Tensor, tau: float) -> torch.Tensor:
    """g = 1[p > τ] as a bool tensor (B,); τ ≤ 0 flags every input, τ ≥ 1 none."""
    if tau <= 0.0:
        return torch.ones_like(p, dtype=torch.bool)
    if tau >= 1.0:
        return torch.zeros_like(p, dtype=torch.bool)
    return p > tau


class ConditionalLoRA(nn.Module):
    """FairNet's conditional LoRA φ_c beside every task-LoRA module of ``model``.

    Args:
        model: the model to hook (its peft LoRA modules name the targets).
        r, lora_alpha: rank and scaling (α/r), the experiment's LoRA settings.
        seed: A_c's initialisation (Kaiming-uniform as peft's A; B_c = 0), drawn from a forked
            RNG so the caller's torch RNG is untouched.

    ``gate`` (bool (B,) or None) is read by the hooks on every forward: None or all False adds
    nothing (and computes nothing); otherwise row b of each hooked module's output gets
    ``(α/r)·B_c·A_c·x_b`` when ``gate[b]``.
    """

    def __init__(self, model: FairsplitModel, r: int, lora_alpha: float, seed: int):
        super().__init__()
        self.scale = float(lora_alpha) / float(r)
        self.gate: torch.Tensor | None = None
        self.names = list(lora_modules(model))
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for name, mod in lora_modules(model).items():
                base = mod.get_base_layer()
                a = torch.empty(r, base.in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.A.append(nn.Parameter(a))
                self.B.append(nn.Parameter(torch.zeros(base.out_features, r)))
        self._handles = [mod.register_forward_hook(self._hook(i))
                         for i, mod in enumerate(lora_modules(model).values())]

    def _hook(self, i: int):
        def hook(module, args, output):
            gate = self.gate
            if gate is None or not bool(gate.any()):
                return output
            x = args[0]
            delta = (x.to(self.A[i].dtype) @ self.A[i].T) @ self.B[i].T * self.scale
            shape = (-1,) + (1,) * (output.ndim - 1)
            return output + gate.to(output.dtype).view(shape) * delta.to(output.dtype)
        return hook

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def applied(self, gate: torch.Tensor | None) -> Iterator[None]:
        """Within the block, forwards use ``gate`` (restored after)."""
        old, self.gate = self.gate, gate
        try:
            yield
        finally:
            self.gate = old

    def state(self) -> dict[str, torch.Tensor]:
        """``<module>.cond_A.weight`` (r, d_in), ``<module>.cond_B.weight`` (d_out, r), CPU copies."""
        out = {}
        for name, a, b in zip(self.names, self.A, self.B):
            out[f"{name}.cond_A.weight"] = a.detach().cpu().clone()
            out[f"{name}.cond_B.weight"] = b.detach().cpu().clone()
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`state`'s form (keys and shapes already checked against the contract)."""
        with torch.no_grad():
            for name, a, b in zip(self.names, self.A, self.B):
                a.copy_(state[f"{name}.cond_A.weight"])
                b.copy_(state[f"{name}.cond_B.weight"])

    def params_by_key(self) -> dict[str, nn.Parameter]:
        """The parameters keyed as in :meth:`state`."""
        out = {}
        for name, a, b in zip(self.names, self.A, self.B):
            out[f"{name}.cond_A.weight"] = a
            out[f"{name}.cond_B.weight"] = b
        return out


class BiasDetector(nn.Module):
    """Attention pooling over one block's hidden states, then an MLP → minority logit (B,).

    ``score_t = w·tanh(W·h_t)`` over the T tokens (padding masked), ``h̄ = Σ_t softmax(score)_t
    h_t``, ``logit = MLP(h̄)`` with one hidden layer of ``hidden`` ReLU units (FairNet, Sec. 3.1).
    ``threshold`` (a buffer) is the gate's τ.
    """

    def __init__(self, dim: int, hidden: int, tau: float, seed: int):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.pool = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("threshold", torch.tensor(float(tau)))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, D), mask (B, T) (1 = token) or None → logits (B,)."""
        scores = self.pool(hidden).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, float("-inf"))
        weights = torch.softmax(scores, dim=-1).unsqueeze(-1)
        return self.mlp((weights * hidden).sum(1)).squeeze(-1)

    def state(self) -> dict[str, torch.Tensor]:
        """Parameters and ``threshold``, CPU copies (the ``detector`` record)."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`state`'s form (checked against the contract)."""
        self.load_state_dict({k: v.to(self.threshold.device) for k, v in state.items()})

    @property
    def tau(self) -> float:
        """The gate threshold τ."""
        return float(self.threshold)


class GatedModel(nn.Module):
    """A :class:`FairsplitModel` with FairNet's conditional LoRA and bias detector.

    Args:
        model: the task model (hooked in place; its own forward is unchanged while no gate is set).
        r, lora_alpha: φ_c's rank and α (the experiment's LoRA).
        detector_layer: the block whose output the detector reads (None: depth // 2).
        detector_hidden, tau: the detector's hidden width and initial τ.
        seed: initialisation of φ_c's A_c and of the detector (forked RNG).

    Raises:
        ValueError: ``detector_layer`` outside the backbone's blocks.
    """

    def __init__(self, model: FairsplitModel, r: int, lora_alpha: float, detector_layer: int | None,
                 detector_hidden: int, tau: float, seed: int):
        super().__init__()
        self.model = model
        blocks = block_list(model)
        layer = len(blocks) // 2 if detector_layer is None else detector_layer
        if not 0 <= layer < len(blocks):
            raise ValueError(f"detector_layer {layer} outside the backbone's {len(blocks)} blocks")
        self.layer = layer
        self.cond = ConditionalLoRA(model, r, lora_alpha, seed + 211)
        self.detector = BiasDetector(model.feature_dim, detector_hidden, tau, seed + 223)
        self._tap: torch.Tensor | None = None
        blocks[layer].register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self._tap = output[0] if isinstance(output, tuple) else output

    def contracts(self) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        """(cond_adapter contract, detector contract)."""
        return state_spec(self.cond.state()), state_spec(self.detector.state())

    @staticmethod
    def _mask(batch: Any) -> torch.Tensor | None:
        return batch["attention_mask"] if isinstance(batch, dict) else None

    @staticmethod
    def _subset(batch: Any, idx: torch.Tensor) -> Any:
        return {k: v[idx] for k, v in batch.items()} if isinstance(batch, dict) else batch[idx]

    def hidden(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One pass with φ_c off: (features (B, D), block ``layer``'s hidden states (B, T, D'),
        mask (B, T) or None)."""
        with self.cond.applied(None):
            feats = self.model.features(batch)
        return feats, self._tap, self._mask(batch)

    def features_cond(self, batch: Any) -> torch.Tensor:
        """Pooled representation (B, D) with φ_c applied to every input (FairNet's anchors)."""
        n = len(batch["input_ids"]) if isinstance(batch, dict) else len(batch)
        device = batch["input_ids"].device if isinstance(batch, dict) else batch.device
        with self.cond.applied(torch.ones(n, dtype=torch.bool, device=device)):
            return self.model.features(batch)

    def parts(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits with φ_c off (B, C), logits with φ_c on (B, C), p(x) (B,)), full batch."""
        feats, hid, mask = self.hidden(batch)
        p = torch.sigmoid(self.detector(hid, mask))
        return self.model.head(feats), self.model.head(self.features_cond(batch)), p

    def forward(self, batch: Any, tau: float | None = None) -> torch.Tensor:
        """Gated logits (B, C) at τ (default: the detector's ``threshold``)."""
        tau = self.detector.tau if tau is None else tau
        feats, hid, mask = self.hidden(batch)
        logits = self.model.head(feats)
        flag = gate_mask(torch.sigmoid(self.detector(hid, mask)), tau)
        if bool(flag.any()):
            idx = flag.nonzero().squeeze(-1)
            on = self.model.head(self.features_cond(self._subset(batch, idx)))
            logits = logits.index_copy(0, idx, on)
        return logits

    @torch.no_grad()
    def score_parts(self, inputs, batch_size: int = 128, device="cpu") -> tuple[np.ndarray, ...]:
        """Positive-class probability with φ_c off and on, and p(x), each float64 (N,), eval mode.

        The gated scores at any τ are ``np.where(gate, on, off)``: one pass pair serves a whole
        τ grid.
        """
        self.eval()
        off, on, ps = [], [], []
        for i in range(0, len(inputs), batch_size):
            lo, ln, p = self.parts(self.model.prepare(inputs[i:i + batch_size], device))
            off.append(torch.softmax(lo.float(), -1)[:, 1].cpu().numpy())
            on.append(torch.softmax(ln.float(), -1)[:, 1].cpu().numpy())
            ps.append(p.float().cpu().numpy())
        cat = (lambda xs: np.concatenate(xs).astype(np.float64) if xs else np.zeros(0))
        return cat(off), cat(on), cat(ps)

    @torch.no_grad()
    def predict_scores(self, inputs, batch_size: int = 128, device="cpu",
                       tau: float | None = None) -> np.ndarray:
        """Positive-class probability of the gated model at τ, float64 (N,), eval mode."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(inputs), batch_size):
            logits = self(self.model.prepare(inputs[i:i + batch_size], device), tau)
            out.append(torch.softmax(logits.float(), -1)[:, 1].cpu().numpy())
        self.train(was)
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def gated_scores(off: np.ndarray, on: np.ndarray, p: np.ndarray, tau: float) -> np.ndarray:
    """The gated model's scores at τ from :meth:`GatedModel.score_parts` (N,)."""
    return np.where(gate_mask(torch.as_tensor(p), tau).numpy(), on, off)


def prototypes(feats: torch.Tensor, y: torch.Tensor, s: torch.Tensor, n_classes: int, n_groups: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean representation per (class, group) and the counts.

    Args:
        feats: (N, D); y: (N,) int64 classes; s: (N,) int64 groups.
    Returns:
        ``(mu (C, G, D), counts (C, G))``; an empty cell's μ is 0 (never used: a majority cell is
        never empty).
    """
    mu = torch.zeros(n_classes, n_groups, feats.shape[1], dtype=feats.dtype)
    counts = torch.zeros(n_classes, n_groups, dtype=torch.int64)
    for c in range(n_classes):
        for g in range(n_groups):
            cell = (y == c) & (s == g)
            counts[c, g] = int(cell.sum())
            if counts[c, g] > 0:
                mu[c, g] = feats[cell].mean(0)
    return mu, counts


def contrastive_term(z: torch.Tensor, y: torch.Tensor, mu: torch.Tensor, majority: torch.Tensor,
                     margin: float, lam: float) -> torch.Tensor:
    """FairNet's Eq. 2 (λ applied): λ·mean_i max(0, d(z_i, pos_i) − d(z_i, neg_i) + margin).

    d is the squared Euclidean distance; pos_i = μ(y_i, maj(y_i)); neg_i is the nearest of the
    other classes' majority prototypes μ(y', maj(y')).

    Args:
        z: anchors (B, D) (with φ_c on); y: (B,) int64 classes; mu: (C, G, D) prototypes;
            majority: (C,) int64 majority group per class.
    Returns:
        A 0-d tensor (differentiable in z).
    """
    protos = mu[torch.arange(mu.shape[0]), majority].to(z)  # (C, D): each class's majority prototype
    d = ((z[:, None, :] - protos[None, :, :]) ** 2).sum(-1)  # (B, C)
    d_pos = d.gather(1, y[:, None]).squeeze(1)
    d_other = d.masked_fill(torch.nn.functional.one_hot(y, mu.shape[0]).bool(), float("inf"))
    d_neg = d_other.min(1).values
    return lam * torch.clamp(d_pos - d_neg + margin, min=0.0).mean()


def build_gated(model: FairsplitModel, exp) -> GatedModel:
    """The gated model of ``exp`` (a gated method's config) around ``model``, seeded from
    ``exp.seed``: both parties build bit-identical φ_c and detector initialisations."""
    m = exp.method
    return GatedModel(model, exp.lora.r, exp.lora.lora_alpha, m.detector_layer, m.detector_hidden,
                      m.tau, exp.seed)

