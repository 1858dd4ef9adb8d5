"""The developer's local training: task LoRA adapter + head on the developer's own data.

Each round takes ``local_steps`` AdamW steps on the cross-entropy of the task labels, with
mini-batches drawn without replacement from a seeded permutation of the developer's training split
(a new permutation each epoch). With ERM that is all.

With a fairness signal g_R = ∇_φ R(φ_r) from the auditor, computed at the adapter φ_r of the
round's start, every one of the K local steps uses the gradient ∇_φ L_task(φ) + g_R for the
adapter, and, for methods whose signal includes the head (``penalty``), ∇_h R(h_r) is added to the
head's. This is the first-order (linearised) form of minimising L_task + R over the round; the
signal is at most K steps stale. For ``last_layer`` the auditor's refitted head replaces the
head after the last round. For ``unlearning`` the auditor's
ΔW_s is subtracted once from the frozen base weights before training: W = W0 − λ·ΔW_s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fairsplit.developer.config import DeveloperConfig
from fairsplit.protocol.config import ExperimentConfig
from fairsplit.protocol.data import Dataset, load_split
from fairsplit.protocol.model import (
    FairsplitModel,
    adapter_parameters,
    adapter_state,
    build_model,
    head_state,
    load_adapter_state,
    resolve_image_size,
    subtract_weight_update,
)

__all__ = ["DeveloperTrainer", "developer_data"]

log = logging.getLogger(__name__)

_DATA: dict[tuple, Dataset] = {}  # the last loaded training split(s), for a long-lived process
_DATA_KEEP = 2


def developer_data(exp: ExperimentConfig, cfg: DeveloperConfig) -> Dataset:
    """The developer's training split for ``exp``, kept in memory for the next run of this process.

    Keyed by everything the split depends on (data source, partition, input size, bias
    injection), so the runs of a study, which differ in LoRA placement, rank, lr or method,
    decode the data once. The split is read-only for the trainer.

    Raises:
        protocol.data.DataError: unusable data.
    """
    size = resolve_image_size(exp.model)
    key = (cfg.data.model_dump_json(), exp.partition.model_dump_json(), size,
           cfg.bias_injection.model_dump_json() if cfg.bias_injection else None, str(cfg.cache_dir))
    if key not in _DATA:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        _DATA[key] = load_split(cfg.data, exp, "developer", size, cache, cfg.bias_injection)["developer_train"]
        while len(_DATA) > _DATA_KEEP:
            _DATA.pop(next(iter(_DATA)))
    return _DATA[key]


class DeveloperTrainer:
    """Holds the developer's model, optimizer, data and batch order.

    Args:
        exp: shared experiment config.
        cfg: the developer's own config.
        data: optional pre-loaded training split (else loaded from ``cfg.data``).

    Raises:
        protocol.data.DataError / protocol.model.ModelError: unusable data or model spec.
    """

    def __init__(self, exp: ExperimentConfig, cfg: DeveloperConfig, data: Dataset | None = None):
        self.exp = exp
        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = torch.device(cfg.device)
        self.model: FairsplitModel = build_model(exp).to(self.device)
        if data is None:
            data = developer_data(exp, cfg)
        if data.s is not None or data.attr is not None:
            raise ValueError("developer data must not carry sensitive attributes")
        self.data = data
        lora = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]
        self._adapter_params = adapter_parameters(self.model)  # peft key -> Parameter, built once
        head = list(self.model.head.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": lora, "lr": exp.lr}, {"params": head, "lr": exp.head_lr or exp.lr}],
            weight_decay=exp.weight_decay,
        )
        self.rng = np.random.default_rng(exp.seed)
        self._order = np.zeros(0, dtype=np.int64)
        self._pos = 0
        self.step = 0
        log.info("developer: %d training examples (%s)", len(data), data.description)

    def _next_batch(self) -> np.ndarray:
        bs = min(self.exp.batch_size, len(self.data))
        if self._pos + bs > len(self._order):
            self._order = self.rng.permutation(len(self.data))
            self._pos = 0
        idx = self._order[self._pos:self._pos + bs]
        self._pos += bs
        return idx

    def apply_unlearning(self, update: dict[str, torch.Tensor], lam: float) -> None:
        """Subtract ``lam``·ΔW_s from each target module's frozen base weight, in place.

        Args:
            update: module name → ΔW_s (d_out, d_in), already checked against
                :func:`protocol.model.update_spec`.
        """
        subtract_weight_update(self.model, update, lam)

    def train_round(self, signal: dict[str, torch.Tensor] | None = None,
                    head_signal: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Run ``exp.local_steps`` optimizer steps; returns ``{"train_loss", "train_accuracy"}``.

        Args:
            signal: adapter key → gradient of the auditor's fairness term (λ applied), added to
                the adapter's gradient at every step of the round.
            head_signal: ``weight`` (C, D), ``bias`` (C,) → gradient of the same term for the
                head (methods whose row crosses ``head_gradient``), added likewise.
        Raises:
            FloatingPointError: the loss became NaN/inf.
        """
        params = dict(self._adapter_params) if signal is not None else {}
        extra = {k: signal[k].to(self.device) for k in params} if signal is not None else {}
        if head_signal is not None:
            for k, p in self.model.head.named_parameters():
                params[f"head.{k}"] = p
                extra[f"head.{k}"] = head_signal[k].to(self.device, p.dtype)
        self.model.train()
        losses, correct, seen = [], 0, 0
        for _ in range(self.exp.local_steps):
            idx = self._next_batch()
            inputs = self.data.inputs[idx] if isinstance(self.data.inputs, np.ndarray) else [
                self.data.inputs[i] for i in idx]
            y = torch.as_tensor(self.data.y[idx], device=self.device)
            logits = self.model(self.model.prepare(inputs, self.device))
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {self.step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for k, p in params.items():
                if p.grad is None:
                    p.grad = extra[k].clone()
                else:
                    p.grad.add_(extra[k])
            self.optimizer.step()
            self.step += 1
            losses.append(loss.item())
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(idx)
        return {"train_loss": float(np.mean(losses)), "train_accuracy": correct / max(seen, 1)}

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly where it stands (for checkpoints).

        Returns a dict of ``adapter`` (peft keys → tensors), ``head`` (``weight`` (C, D),
        ``bias`` (C,)), ``optimizer`` (AdamW state dict), ``rng`` (the batch-order numpy
        ``Generator``'s ``bit_generator.state``), ``order`` (the current epoch's permutation,
        int64 tensor (N,)), ``pos`` (position in it), ``step`` (optimizer steps taken),
        ``torch_rng`` (``torch.get_rng_state()``, for LoRA dropout) and ``cuda_rng`` (the CUDA
        generator's state on a CUDA device, else None). Only tensors, numbers, strings, lists and
        dicts, so ``torch.load(weights_only=True)`` reads it. Frozen base weights are not
        included (they are rebuilt from the experiment; for ``unlearning`` the caller re-applies
        ΔW_s).
        """
        cuda = self.device.type == "cuda"
        return {
            "adapter": self.adapter(),
            "head": self.head(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "order": torch.from_numpy(self._order.astype(np.int64, copy=True)),
            "pos": int(self._pos),
            "step": int(self.step),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned, into this trainer (same experiment).

        Sets the global torch RNG state (and the CUDA one when saved on CUDA).

        Raises:
            KeyError: a field is missing; protocol.model.ModelError / RuntimeError / ValueError:
                the tensors do not fit this trainer's model or optimizer.
        """
        load_adapter_state(self.model, {k: v.to(self.device) for k, v in state["adapter"].items()})
        self.model.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self._order = state["order"].numpy().astype(np.int64, copy=True)
        self._pos = int(state["pos"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def set_head(self, head: dict[str, torch.Tensor]) -> None:
        """Replace the head with ``weight`` (C, D), ``bias`` (C,) (checked against the head contract)."""
        self.model.head.load_state_dict({k: v.to(self.device) for k, v in head.items()})

    def feature_basis(self, k: int, max_examples: int = 4096) -> dict[str, torch.Tensor]:
        """The top-k principal directions of the developer's own training features at the current
        adapter: the refit basis sent with a head-refit request (last_layer), so that the
        auditor's private refit moves the head within k directions rather than all D.

        Features f_φ(x) (D,) of up to ``max_examples`` training examples (a seeded sample),
        centred at their mean; the directions are the right singular vectors of that (n, D)
        matrix (PCA). Fewer than k directions with a non-zero singular value (n ≤ k, or a
        degenerate representation): the rest are zero columns, which the refit cannot move along.

        Returns:
            ``{"basis": (D, k') float32 with orthonormal non-zero columns, "mean": (D,) float32}``,
            k' = min(k, D), CPU tensors.
        Raises:
            ValueError: k < 1, or non-finite features.
        """
        if k < 1:
            raise ValueError(f"refit basis: k = {k} < 1")
        n = len(self.data)
        idx = np.sort(np.random.default_rng([self.exp.seed, 11]).permutation(n)[:max_examples])
        inputs = self.data.inputs[idx] if isinstance(self.data.inputs, np.ndarray) else [self.data.inputs[i] for i in idx]
        feats = self.model.predict_features(inputs, self.exp.eval_batch_size, self.device).double()
        if not torch.isfinite(feats).all():
            raise ValueError("refit basis: the developer's features are not finite")
        mean = feats.mean(0)
        _, sv, vh = torch.linalg.svd(feats - mean, full_matrices=False)
        d = feats.shape[1]
        k = min(k, d)
        basis = torch.zeros(d, k, dtype=torch.float64)
        keep = min(k, int((sv > sv.max() * 1e-6).sum()) if len(sv) else 0)
        basis[:, :keep] = vh[:keep].T
        return {"basis": basis.float(), "mean": mean.float()}

    def adapter(self) -> dict[str, torch.Tensor]:
        """Current LoRA adapter (peft keys), CPU tensors."""
        return adapter_state(self.model)

    def head(self) -> dict[str, torch.Tensor]:
        """Current head ``{"weight", "bias"}``, CPU tensors."""
        return head_state(self.model)
