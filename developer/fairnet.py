"""The developer's FairNet stages (Zhou, Liu & Jiang, NeurIPS 2025, arXiv 2510.19421), on its own
data only: no sensitive attribute exists on this side, and none is read here.

* **Stage 2, the bias detector** (FairNet-Unlabeled's path, their Sec. 3.4): the hidden states of
  block ``detector_layer`` under the ERM model (φ_c off) are computed for up to
  ``detector_examples`` of the developer's training examples (a seeded subset); scikit-learn's
  :class:`~sklearn.neighbors.LocalOutlierFactor` (``lof_neighbors``, ``lof_contamination``) on
  their CLS token (timm) or masked mean (text) flags outliers as pseudo-minority; the
  attention-pooling detector (:class:`protocol.conditional.BiasDetector`) is trained on those
  hidden states with BCE weighted by negatives / positives (the paper's class weighting).
  ``pseudo_labels = "errors"`` takes the subset's examples the ERM model misclassifies instead
  (JTT's error set, Liu et al. 2021): also attribute-free.
* **Stage 4, the conditional LoRA**, one round at a time with the task LoRA and head frozen:
  ``fairnet`` takes ``local_steps`` Adam steps along the auditor's ∇_{φ_c} R (the auditor's
  contrastive term on its true groups, :mod:`auditor.methods.fairnet`); ``fairnet_local`` computes
  the same Eq. 2 itself (:func:`protocol.conditional.contrastive_term`), with prototypes per
  (class, pseudo-minority) of the subset under the ERM model and anchors drawn from its
  pseudo-minority examples (stage 3 on pseudo-labels, as FairNet-Unlabeled).

Each step also takes the developer's task cross-entropy with φ_c on over a batch of its own data
(the paper's stage 4 has the triplet term alone: under Adam, λ would then not matter, and alone
it collapsed the representation here, docs/methods.md). With B_c = 0 at the start the gated
model equals the ERM model.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import LocalOutlierFactor

from fairsplit.protocol.conditional import GatedModel, build_gated, contrastive_term, prototypes
from fairsplit.protocol.data import Dataset

__all__ = ["CondStage", "pseudo_minority"]

log = logging.getLogger(__name__)


def pseudo_minority(features: np.ndarray, neighbors: int, contamination: float) -> np.ndarray:
    """LOF outliers of ``features`` (N, D) as pseudo-minority labels, bool (N,).

    Raises:
        ValueError: fewer than ``neighbors`` + 1 examples.
    """
    if len(features) <= neighbors:
        raise ValueError(f"LOF needs more than lof_neighbors = {neighbors} examples, got {len(features)}")
    lof = LocalOutlierFactor(n_neighbors=neighbors, contamination=contamination)
    return lof.fit_predict(np.asarray(features, dtype=np.float64)) == -1


def _take(inputs, idx):
    return inputs[idx] if isinstance(inputs, np.ndarray) else [inputs[i] for i in idx]


class CondStage:
    """FairNet's detector and conditional LoRA on the developer's side.

    Args:
        model: the developer's task model (hooked in place by :func:`protocol.conditional.build_gated`).
        exp: the experiment (a gated method's config).
        data: the developer's training split (no sensitive attributes).
        device: torch device.

    Raises:
        ValueError: ``data`` carries sensitive attributes, or ``detector_layer`` is out of range.
    """

    def __init__(self, model, exp, data: Dataset, device):
        if data.s is not None or data.attr is not None:
            raise ValueError("developer data must not carry sensitive attributes")
        self.exp, self.cfg, self.data, self.device = exp, exp.method, data, device
        self.local = self.cfg.name == "fairnet_local"
        with torch.random.fork_rng():
            self.gated: GatedModel = build_gated(model, exp).to(device)
        self.optimizer = torch.optim.Adam(list(self.gated.cond.parameters()), lr=self.cfg.cond_lr)
        self.rng = np.random.default_rng([exp.seed, 17])
        self.detector_trained = False
        self.subset = np.zeros(0, dtype=np.int64)  # indices of the examples the detector used
        self.pseudo = np.zeros(0, dtype=bool)
        self.mu: torch.Tensor | None = None
        self.majority: torch.Tensor | None = None

    # -- wire ---------------------------------------------------------------------------------
    def cond_state(self) -> dict[str, torch.Tensor]:
        """The conditional LoRA (record ``cond_adapter``)."""
        return self.gated.cond.state()

    def detector_state(self) -> dict[str, torch.Tensor]:
        """The detector with its τ (record ``detector``)."""
        return self.gated.detector.state()

    def set_tau(self, tau: float) -> None:
        """Set the gate threshold τ (the auditor's choice on validation)."""
        self.gated.detector.threshold.fill_(float(tau))

    # -- stage 2 ------------------------------------------------------------------------------
    @torch.no_grad()
    def _hidden_states(self, idx: np.ndarray) -> tuple[list[torch.Tensor], list, np.ndarray, torch.Tensor]:
        """Per batch: block hidden states (float16, CPU), masks; LOF features (N, D); pooled (N, D)."""
        self.gated.eval()
        hs, masks, lof, pooled = [], [], [], []
        bs = self.exp.eval_batch_size
        for i in range(0, len(idx), bs):
            batch = self.gated.model.prepare(_take(self.data.inputs, idx[i:i + bs]), self.device)
            feats, hid, mask = self.gated.hidden(batch)
            hs.append(hid.to(torch.float16).cpu())
            masks.append(None if mask is None else mask.cpu())
            if mask is None:
                lof.append(hid[:, 0].float().cpu().numpy())
            else:
                m = mask.unsqueeze(-1).to(hid.dtype)
                lof.append(((hid * m).sum(1) / m.sum(1).clamp_min(1e-9)).float().cpu().numpy())
            pooled.append(feats.float().cpu())
        return hs, masks, np.concatenate(lof), torch.cat(pooled)

    def train_detector(self) -> dict[str, float]:
        """Stage 2 (and, for ``fairnet_local``, stage 3 on the pseudo-labels).

        Returns ``{"pseudo_minority_rate", "detector_loss", "detector_flag_rate"}`` (the rate of
        the subset the trained detector flags at τ).
        """
        cfg = self.cfg
        n = len(self.data)
        idx = np.sort(self.rng.choice(n, size=min(cfg.detector_examples, n), replace=False))
        hs, masks, lof_feats, pooled = self._hidden_states(idx)
        if cfg.pseudo_labels == "errors":  # JTT's error set: where the ERM model is wrong
            with torch.no_grad():
                pred = self.gated.model.head(pooled.to(self.device)).argmax(-1).cpu().numpy()
            pseudo = pred != np.asarray(self.data.y[idx])
        else:
            pseudo = pseudo_minority(lof_feats, cfg.lof_neighbors, cfg.lof_contamination)
        target = torch.as_tensor(pseudo, dtype=torch.float32)
        pos = float(target.sum())
        weight = torch.tensor((len(target) - pos) / max(pos, 1.0))
        # flatten the batches into (example → (batch, row)) for random detector batches
        where = [(b, j) for b, h in enumerate(hs) for j in range(len(h))]
        det = self.gated.detector
        det.train()
        opt = torch.optim.Adam(det.parameters(), lr=cfg.detector_lr)
        losses = []
        for _ in range(cfg.detector_steps):
            pick = self.rng.choice(len(where), size=min(cfg.detector_batch_size, len(where)), replace=False)
            hid, mask = self._stack([where[i] for i in pick], hs, masks)
            logits = det(hid, mask)
            loss = F.binary_cross_entropy_with_logits(logits, target[pick].to(self.device), pos_weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        det.eval()
        with torch.no_grad():
            p = torch.cat([torch.sigmoid(det(h.to(self.device).float(), None if m is None else m.to(self.device)))
                           for h, m in zip(hs, masks)]).cpu()
        self.subset, self.pseudo = idx, pseudo
        if self.local:  # stage 3 on pseudo-labels: prototypes per (class, pseudo-minority)
            y = torch.as_tensor(self.data.y[idx])
            self.mu, counts = prototypes(pooled, y, torch.as_tensor(pseudo.astype(np.int64)),
                                         self.exp.model.num_classes, 2)
            self.majority = counts.argmax(1)
        self.set_tau(cfg.tau)
        self.detector_trained = True
        stats = {"pseudo_minority_rate": float(pseudo.mean()), "detector_loss": float(np.mean(losses[-10:])),
                 "detector_flag_rate": float((p > cfg.tau).float().mean())}
        log.info("FairNet detector: %s", stats)
        return stats

    def _stack(self, rows, hs, masks) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states (B, T, D) and masks (B, T) of ``rows`` ((batch, row) pairs), padded to one T."""
        t = max(hs[b].shape[1] for b, _ in rows)
        hid = torch.zeros(len(rows), t, hs[rows[0][0]].shape[2])
        mask = None if masks[rows[0][0]] is None else torch.zeros(len(rows), t, dtype=torch.long)
        for k, (b, j) in enumerate(rows):
            h = hs[b][j]
            hid[k, :h.shape[0]] = h.float()
            if mask is not None:
                mask[k, :h.shape[0]] = masks[b][j]
        return hid.to(self.device), None if mask is None else mask.to(self.device)

    # -- stage 4 ------------------------------------------------------------------------------
    def train_round(self, cond_signal: dict[str, torch.Tensor] | None) -> dict[str, float]:
        """``local_steps`` Adam steps on φ_c (task LoRA and head frozen).

        Each step: the task cross-entropy with φ_c on over ``batch_size`` developer examples,
        plus for ``fairnet`` the auditor's gradient λ·∇_{φ_c} R (None, e.g. the first round with
        overlap: the task term alone) and for ``fairnet_local`` Eq. 2 over ``batch_size``
        pseudo-minority examples. Returns ``{"cond_task_loss"}`` and ``"contrastive_loss"``
        (local) or ``"cond_signal_norm"``.

        Raises:
            FloatingPointError: a non-finite loss.
        """
        params = self.gated.cond.params_by_key()
        model = self.gated.model
        self.gated.eval()
        task, contrast = [], []
        anchors = self.subset[self.pseudo]
        bs = self.exp.batch_size
        for _ in range(self.exp.local_steps):
            loss = torch.zeros((), device=self.device)
            if self.cfg.cond_task != "none":
                pick = self.rng.choice(len(self.data), size=min(bs, len(self.data)), replace=False)
                batch = model.prepare(_take(self.data.inputs, pick), self.device)
                logits = model.head(self.gated.features_cond(batch))
                if self.cfg.cond_task == "ce":
                    loss = F.cross_entropy(logits, torch.as_tensor(self.data.y[pick], device=self.device))
                else:  # KL(ERM ‖ gated-on): keep the ERM model's predictions on the developer's data
                    with torch.no_grad():
                        ref = F.log_softmax(model.head(self.gated.hidden(batch)[0]), -1)
                    loss = F.kl_div(F.log_softmax(logits, -1), ref, log_target=True, reduction="batchmean")
                task.append(loss.item())
            if self.local and len(anchors):
                a = anchors[self.rng.choice(len(anchors), size=min(bs, len(anchors)), replace=False)]
                z = self.gated.features_cond(model.prepare(_take(self.data.inputs, a), self.device))
                term = contrastive_term(z, torch.as_tensor(self.data.y[a], device=self.device),
                                        self.mu.to(self.device), self.majority.to(self.device),
                                        self.cfg.margin, self.cfg.lam)
                contrast.append(term.item())
                loss = loss + term
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss in FairNet's conditional round")
            if not loss.requires_grad and cond_signal is None:
                continue  # nothing moves φ_c this step
            self.optimizer.zero_grad(set_to_none=False)
            for p in params.values():
                p.grad = torch.zeros_like(p)
            if loss.requires_grad:
                loss.backward()
            if cond_signal is not None:  # the auditor's λ·∇_{φ_c} R, fixed over the round
                for k, p in params.items():
                    p.grad.add_(cond_signal[k].to(self.device, p.dtype))
            self.optimizer.step()
        out = {"cond_task_loss": float(np.mean(task)) if task else 0.0}
        if self.local:
            out["contrastive_loss"] = float(np.mean(contrast)) if contrast else 0.0
        elif cond_signal is not None:
            out["cond_signal_norm"] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in cond_signal.values())))
        return out

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """φ_c, detector (with τ), optimizer, RNG, the detector's subset and pseudo-labels,
        the local prototypes: tensors, numbers and dicts only (``weights_only`` loadable)."""
        return {"cond": self.cond_state(), "detector": self.detector_state(),
                "optimizer": self.optimizer.state_dict(), "rng": self.rng.bit_generator.state,
                "trained": self.detector_trained, "subset": torch.from_numpy(self.subset.astype(np.int64)),
                "pseudo": torch.from_numpy(self.pseudo.astype(np.bool_)),
                "mu": self.mu, "majority": self.majority}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.gated.cond.load(state["cond"])
        self.gated.detector.load(state["detector"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.detector_trained = bool(state["trained"])
        self.subset = state["subset"].numpy().astype(np.int64)
        self.pseudo = state["pseudo"].numpy().astype(bool)
        self.mu, self.majority = state["mu"], state["majority"]
