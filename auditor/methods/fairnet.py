"""FairNet in the split (Zhou, Liu & Jiang, NeurIPS 2025, arXiv 2510.19421): the auditor's
contrastive signal for the developer's conditional LoRA, and the gate threshold τ on validation.

The developer's detector is trained without s (:mod:`developer.fairnet`); the auditor holds the
true groups and uses them in two places only, neither of which crosses as such:

* **static prototypes** (the paper's stage 3): μ(y, s), the mean pooled representation of the
  auditor's training examples of class y and group s under the ERM model (φ_c off), computed at
  the first conditional round and kept in the auditor's state. Per class y the reference group
  maj(y) is the group the ERM model classifies best within y on that part (``minority =
  "accuracy"``, the default: the anchors are the bias-conflicting cells it gets wrong) or the
  group with most examples of y (``"size"``, the paper's under-representation); every other
  group of y is its minority.
* **anchors** (stage 4, Eq. 2): each conditional round a seeded batch of ``auditor_batch_size``
  minority training examples, passed with φ_c on: z_i = f_{φ,φ_c}(x_i). The triplet term is

      R = λ · mean_i max(0, ‖z_i − μ(y_i, maj(y_i))‖² − min_{y' ≠ y_i} ‖z_i − μ(y', maj(y'))‖² + m)

  with margin m = ``margin``; only ∇_{φ_c} R crosses (the ``cond_signal`` record).

The τ choice (``want == "threshold"``, after the last round) evaluates the gated model on the
auditor's validation part for every τ of ``taus`` and 1 (the ungated model) and releases the
chosen τ with its validation worst-group accuracy; under the auditor's DP from one noisy report
per τ (:func:`threshold_events`).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fairsplit.protocol.conditional import GatedModel, contrastive_term, gated_scores, prototypes
from fairsplit.protocol.messages import RoundRequest
from fairsplit.protocol.metrics import fairness_report

from . import common as C
from .base import AuditorMethod, Release, grad_norm

__all__ = ["FairNet", "anchor_term", "choose_threshold", "tau_grid", "threshold_events"]

_PROTOTYPES = "fairnet.prototypes"


def choose_threshold(method: AuditorMethod, gated: GatedModel) -> Release:
    """τ on the auditor's validation part: the largest worst-group accuracy among the τ of
    ``taus`` ∪ {1} whose accuracy is within ``max_accuracy_drop`` of the ungated model's (τ = 1);
    ties go to the larger τ (fewer inputs gated). Releases τ and that validation WGA."""
    ctx, cfg = method.ctx, method.cfg
    val = ctx.data["auditor_val"]
    off, on, p = gated.score_parts(val.inputs, ctx.exp.eval_batch_size, ctx.cfg.device)
    grid = tau_grid(cfg)
    if ctx.gate.dp:  # one noisy report (Gaussian on the per-group counts) per τ: on the plan
        reports = {t: ctx.gate.report("auditor_val", gated_scores(off, on, p, t), (method.name, "tau", t))
                   for t in grid}
    else:
        reports = {t: fairness_report(val.y, gated_scores(off, on, p, t), val.s, ctx.exp.threshold,
                                      ctx.cfg.min_group_size) for t in grid}
    ref = reports[1.0]["accuracy"] or 0.0
    ok = [t for t in grid if (reports[t]["accuracy"] or 0.0) >= ref - cfg.max_accuracy_drop - 1e-12]
    tau = max(ok, key=lambda t: (reports[t]["worst_group_accuracy"] or 0.0, t))
    # under DP n is the report's noisy count
    return Release(metrics={"n": int(reports[tau]["n"]),
                            "objective": float(reports[tau]["worst_group_accuracy"] or 0.0),
                            "signal_norm": 0.0, "tau": tau})


def tau_grid(cfg) -> list[float]:
    """The τ the choice evaluates: ``taus`` and 1 (the ungated model), increasing."""
    return sorted(set(float(t) for t in cfg.taus) | {1.0})


def threshold_events(cfg, noise) -> list[dict]:
    """The DP events of :func:`choose_threshold`: one Gaussian validation report per τ of
    :func:`tau_grid` (multiplier σ_val)."""
    from ..accounting import dp_event

    return dp_event("auditor_val", "gaussian", noise.val, None, len(tau_grid(cfg)))


def anchor_term(mu: torch.Tensor, majority: torch.Tensor, margin: float, lam: float):
    """One anchor's term of :func:`protocol.conditional.contrastive_term`, ``(z (D,), y (0-d)) ->
    λ·max(0, d_pos − d_neg + margin)``, written without data-dependent control flow so that
    ``torch.func.vmap`` can take per-example gradients through it (the mean over anchors is
    ``contrastive_term``). ``mu``: (C, G, D) prototypes; ``majority``: (C,) int64."""
    protos = mu[torch.arange(mu.shape[0]), majority]  # (C, D): each class's majority prototype
    classes = torch.arange(mu.shape[0], device=mu.device)

    def term(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = ((z[None, :] - protos.to(z)) ** 2).sum(-1)  # (C,)
        own = classes == y
        d_pos = (d * own).sum()
        d_neg = torch.where(own, torch.full_like(d, float("inf")), d).min()
        return lam * torch.clamp(d_pos - d_neg + margin, min=0.0)

    return term


class FairNet(AuditorMethod):
    """The auditor's side of ``fairnet``: ∇_{φ_c} of Eq. 2 each conditional round, then τ.

    Under the auditor's DP (:meth:`dp_events`): the prototypes and the majority groups come from
    one release of noisy per-(class, group) counts, clipped feature sums and (``minority =
    "accuracy"``) counts of the ERM model's correct predictions (:meth:`_private_prototypes`);
    each conditional round's anchors are the minority examples of a Poisson sample of rate q =
    ``auditor_batch_size`` / N, their per-example ∇_{φ_c} of the triplet term clipped to
    ``[auditor.privacy] clip_norm`` and noised (one sampled Gaussian step); τ from one noisy
    validation report per τ. ``report_detector_auc`` has no private form.
    """

    name = "fairnet"

    @classmethod
    def dp_events(cls, cfg, exp, n_train: int, noise) -> list[dict]:
        """The prototypes' Gaussian releases (counts, sums, and correct counts for ``minority =
        "accuracy"``; σ_train), one sampled Gaussian step per conditional signal (rate
        ``auditor_batch_size`` / n_train) and the τ choice's validation reports.

        Raises:
            auditor.accounting.NotPrivate: ``report_detector_auc`` (an oracle, not a count).
        """
        from fairsplit.protocol.schedule import planned_requests

        from ..accounting import NotPrivate, dp_event

        if cfg.report_detector_auc:
            raise NotPrivate("fairnet's report_detector_auc has no private form")
        n_signals = sum(1 for r in planned_requests(exp) if r[2] == "signal")
        q = min(1.0, cfg.auditor_batch_size / n_train)
        releases = 3 if cfg.minority == "accuracy" else 2
        return (dp_event("auditor_train", "gaussian", noise.train, None, releases if n_signals else 0)
                + dp_event("auditor_train", "sampled", noise.train, q, n_signals)
                + threshold_events(cfg, noise))

    def _prototypes(self, state: RecordDict) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ (C, G, D), majority (C,)), computed once at the first conditional round, then kept."""
        if _PROTOTYPES in state:
            rec = state[_PROTOTYPES].to_torch_state_dict()
            return rec["mu"], rec["majority"]
        if self.ctx.gate.dp:
            mu, majority, n_min = self._private_prototypes()
            state[_PROTOTYPES] = ArrayRecord({"mu": mu, "majority": majority, "n_min": n_min})
            return mu, majority
        feats, preds = self._erm_features()
        y, s = torch.as_tensor(self.ctx.data["auditor_train"].y), torch.as_tensor(self.ctx.train_codes)
        n_classes = self.ctx.exp.model.num_classes
        mu, counts = prototypes(feats, y, s, n_classes, self.n_groups)
        if self.cfg.minority == "size":
            majority = counts.argmax(1)
        else:  # the group the ERM model serves best within each class (empty cells never chosen)
            correct = (preds == y).double()
            acc = torch.full((n_classes, self.n_groups), -1.0, dtype=torch.float64)
            for c in range(n_classes):
                for g in range(self.n_groups):
                    cell = (y == c) & (s == g)
                    if cell.any():
                        acc[c, g] = correct[cell].mean()
            majority = acc.argmax(1)
        state[_PROTOTYPES] = ArrayRecord({"mu": mu, "majority": majority})
        return mu, majority

    def _erm_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D) with φ_c off, the ERM head's predictions (N,)) of the training part."""
        train, gated, bs = self.ctx.data["auditor_train"], self.ctx.gated, self.ctx.exp.eval_batch_size
        feats, preds = [], []
        gated.eval()
        with torch.no_grad():
            for i in range(0, len(train.inputs), bs):
                f = gated.hidden(self.ctx.model.prepare(train.inputs[i:i + bs], self.ctx.cfg.device))[0]
                feats.append(f.float().cpu())
                preds.append(self.ctx.model.head(f).argmax(-1).cpu())
        return torch.cat(feats), torch.cat(preds)

    def _private_prototypes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The DP prototypes: per-(class, group) counts (sensitivity 1), sums of features clipped
        to the final LayerNorm's bound C (:func:`auditor.methods.private_head.feature_bound`;
        sensitivity C) and, for ``minority = "accuracy"``, counts of correct ERM predictions
        (sensitivity 1), each a Gaussian mechanism of multiplier σ_train; μ = noisy sum / noisy
        count (counts below 1 count as 1), the majority the cell with the largest noisy accuracy
        (or count); and Ñ_min, the noisy count of minority examples (a 0-d tensor, at least 1).

        Raises:
            auditor.accounting.NotPrivate: more than two classes, or no final LayerNorm.
        """
        from ..accounting import NotPrivate
        from . import private_head as H

        ctx = self.ctx
        if ctx.exp.model.num_classes != 2:
            raise NotPrivate("fairnet's private prototypes need two classes")
        feats, preds = self._erm_features()
        bound = H.feature_bound(ctx.model.backbone, feats.shape[1])
        if bound is None:
            raise NotPrivate("no final LayerNorm bounds the features: fairnet has no private form here")
        y, s = torch.as_tensor(ctx.data["auditor_train"].y), torch.as_tensor(ctx.train_codes)
        sigma = ctx.gate.noise.train
        gen = ctx.gate.secret.generator(ctx.fingerprint, self.name, "prototypes")
        stats = H.noisy_cell_stats(H.cell_stats(feats, y, s, self.n_groups, bound), sigma, gen)  # (G, 2)
        n = stats.n.T.clamp(min=1.0)  # (C, G)
        mu = (stats.S.transpose(0, 1) / n[..., None]).float()  # (C, G, D)
        if self.cfg.minority == "size":
            ctx.gate.spend("auditor_train", "gaussian", sigma, count=2)
            majority = n.argmax(1)
        else:
            correct = torch.zeros(self.n_groups * 2, dtype=torch.float64).index_add_(
                0, s * 2 + y, (preds == y).double()).reshape(self.n_groups, 2).T
            correct = correct + sigma * torch.randn(correct.shape, generator=gen, dtype=torch.float64)
            ctx.gate.spend("auditor_train", "gaussian", sigma, count=3)
            majority = (correct / n).argmax(1)
        n_min = (n.sum() - n.gather(1, majority[:, None]).sum()).clamp(min=1.0)
        return mu, majority, n_min.float()

    def _private_signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """∇_{φ_c} R under DP: the minority examples of a Poisson sample (rate q), each one's
        hinge term λ·max(0, d_pos − d_neg + m) (:func:`contrastive_term` of one anchor), clipped
        and noised (:func:`auditor.methods.private_signal.noisy_param_gradient`), divided by the
        expected minority batch q·Ñ_min (Ñ_min from the released noisy counts)."""
        from .. import privacy as P
        from .private_signal import MethodForward, noisy_param_gradient

        ctx, gated, device = self.ctx, self.ctx.gated, self.ctx.cfg.device
        mu, majority = self._prototypes(state)
        train = ctx.data["auditor_train"]
        y_all = np.asarray(train.y)
        n_all = len(y_all)
        q = min(1.0, self.cfg.auditor_batch_size / n_all)
        sigma = ctx.gate.noise.train
        rng = ctx.gate.secret.rng(ctx.fingerprint, self.name, req.round)
        gen = ctx.gate.secret.generator(ctx.fingerprint, self.name, req.round)
        idx = P.poisson_indices(n_all, q, rng)
        idx = idx[ctx.train_codes[idx] != majority.numpy()[y_all[idx]]]  # the sample's minority anchors
        module = MethodForward(gated, "features_cond")
        names = {id(p): n for n, p in module.named_parameters()}
        released = {names[id(p)]: k for k, p in gated.cond.params_by_key().items()}
        x = ctx.model.prepare(C._inputs(train.inputs, idx), device) if len(idx) else torch.zeros(0)
        b_exp = q * float(state[_PROTOTYPES].to_torch_state_dict()["n_min"])
        gated.eval()
        grads, _ = noisy_param_gradient(
            module, released, x, anchor_term(mu.to(device), majority.to(device), self.cfg.margin, self.cfg.lam),
            (torch.as_tensor(y_all[idx]).to(device),), clip_norm=ctx.cfg.privacy.clip_norm, sigma=sigma,
            b_exp=b_exp, generator=gen)
        ctx.gate.spend("auditor_train", "sampled", sigma, q)
        cond = {k: v.detach().cpu() for k, v in grads.items()}
        return Release(cond_gradient=cond, metrics={"n": int(self.cfg.auditor_batch_size), "objective": 0.0,
                                                    "signal_norm": grad_norm(cond), "detector_auc": None})

    def _minority_batch(self, round_: int, majority: torch.Tensor) -> tuple[object, torch.Tensor]:
        """(B raw inputs, their classes (B,) int64): a seeded sample of the training part's
        minority examples (group != the class's majority group) for (seed, round)."""
        train = self.ctx.data["auditor_train"]
        y = np.asarray(train.y)
        minority = np.flatnonzero(self.ctx.train_codes != majority.numpy()[y])
        if len(minority) == 0:
            raise ValueError("the auditor's training part has no minority examples")
        pick = minority[C.batch_indices(len(minority), self.cfg.auditor_batch_size, self.exp.seed, round_, 3)]
        inputs = train.inputs[pick] if isinstance(train.inputs, np.ndarray) else [train.inputs[i] for i in pick]
        return inputs, torch.as_tensor(y[pick])

    def signal(self, req: RoundRequest, state: RecordDict) -> Release:
        """∇_{φ_c} R on the round's minority anchors; metrics: R, the gradient's norm and, with
        ``report_detector_auc``, the developer's detector's AUC for minority membership on a
        seeded batch of ``auditor_batch_size`` training examples."""
        if self.ctx.gate.dp:
            return self._private_signal(req, state)
        gated, device = self.ctx.gated, self.ctx.cfg.device
        mu, majority = self._prototypes(state)
        inputs, y = self._minority_batch(req.round, majority)
        gated.eval()
        z = gated.features_cond(self.ctx.model.prepare(inputs, device))
        objective = contrastive_term(z, y.to(device), mu.to(device), majority.to(device),
                                     self.cfg.margin, self.cfg.lam)
        params = gated.cond.params_by_key()
        grads = torch.autograd.grad(objective, list(params.values()), allow_unused=True)
        cond = {k: (torch.zeros_like(p) if g is None else g).detach().cpu()
                for (k, p), g in zip(params.items(), grads)}
        return Release(cond_gradient=cond, metrics={
            "n": int(len(y)), "objective": float(objective.detach()), "signal_norm": grad_norm(cond),
            "detector_auc": self._detector_auc(req.round, majority) if self.cfg.report_detector_auc else None})

    @torch.no_grad()
    def _detector_auc(self, round_: int, majority: torch.Tensor) -> float | None:
        from sklearn.metrics import roc_auc_score

        b = self.batch(round_, salt=4)
        gated = self.ctx.gated
        _, hid, mask = gated.hidden(self.ctx.model.prepare(b.inputs, self.ctx.cfg.device))
        p = torch.sigmoid(gated.detector(hid, mask)).cpu().numpy()
        member = (b.s != majority[b.y]).numpy()
        if member.all() or not member.any() or not np.isfinite(p).all():
            return None
        return float(roc_auc_score(member, p))

    def choose_threshold(self, req: RoundRequest, state: RecordDict) -> Release:
        """τ on validation (:func:`choose_threshold`)."""
        return choose_threshold(self, self.ctx.gated)
