"""Per-example clipped, noised gradients of the developer's trainable parameters (DP-SGD releases).

The DP forms of the per-round signals (``penalty``, ``adversarial``, ``entropy``) share one
mechanism (Abadi et al. 2016, Alg. 1): every example i of a Poisson sample contributes the
gradient of its own term ℓ_i with respect to the developer's trainable parameters (the LoRA
adapter, and the head where the method's row releases it), each example's gradient is clipped to
L2 norm C over all parameters together, the sum gets N(0, σ²C²·I), and the released signal is
that sum divided by the expected batch B = qN, so that at σ = 0 without clipping it equals the
mean gradient of the exact signal. Per-example gradients come from ``torch.func`` (``vmap`` of
``grad`` over ``functional_call``), which works with peft's LoRA where Opacus hooks do not.

The auditor's own sensitive probe (``adversarial``, ``entropy``) is trained the same way: DP-SGD
steps on its features, its weights kept in the auditor's state and never released
(:func:`dp_probe_steps`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flwr.app import ArrayRecord, ConfigRecord

from fairsplit.protocol.model import FairsplitModel, adapter_parameters, build_model
from fairsplit.protocol.schedule import planned_requests

from .. import privacy as P
from ..accounting import dp_event
from ..context import Release
from . import common as C
from .base import grad_norm
from .probe import PROBE, PROBE_META

__all__ = ["MethodForward", "dp_probe_steps", "noisy_mean_gradient", "noisy_param_gradient", "private_probe_signal", "probe_signal_events",
           "sensitive_training_events", "train_sensitive_adapter_dp"]


class MethodForward(nn.Module):
    """``owner.<method>(x)`` as a module's forward, for ``torch.func.functional_call`` and
    per-example gradients of a model's features rather than its logits (``model.features``,
    ``GatedModel.features_cond``). The owner's parameters are named ``owner.<name>``."""

    def __init__(self, owner: nn.Module, method: str):
        super().__init__()
        self.owner = owner
        self._method = method

    def forward(self, x):
        return getattr(self.owner, self._method)(x)


def noisy_param_gradient(module: nn.Module, released: dict[str, str], x, loss_of: Callable[..., torch.Tensor],
                         extras: tuple, *, clip_norm: float, sigma: float, b_exp: float,
                         generator: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """(1/B)·(Σ_i clip_C(∇ℓ_i) + N(0, σ²C²·I)) over ``module``'s parameters named in ``released``.

    Args:
        module: ``forward(batch)`` gives the per-example outputs (B, ...).
        released: parameter path in ``module`` → the key the gradient is released under.
        x: the prepared batch, B examples (a tensor, or a dict of tensors; B may be 0).
        loss_of: ``(out_i, *extra_i) -> scalar``: example i's term from its output row and its
            rows of ``extras`` (tensors with the batch on dim 0).
        clip_norm: C, per example, over all released parameters together.
        sigma: the noise multiplier σ (0: no noise).
        b_exp: B = qN, the expected batch the sum is divided by.
    Returns:
        (release key → gradient, fraction of examples clipped).
    """
    from torch.func import functional_call

    params = {n: p.detach() for n, p in module.named_parameters() if n in released}
    rest = {n: t.detach() for n, t in [*module.named_parameters(), *module.named_buffers()] if n not in released}

    def loss_fn(prm, xi, *extra):
        xb = {k: v.unsqueeze(0) for k, v in xi.items()} if isinstance(xi, dict) else xi.unsqueeze(0)
        out = functional_call(module, {**rest, **prm}, (xb,))
        return loss_of(out[0].float(), *extra)

    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    if n:
        grads = P.per_example_grads(loss_fn, params, dict(x) if hasattr(x, "items") else x, *extras)
    else:
        grads = {k: torch.zeros((0, *v.shape)) for k, v in params.items()}
    sums, clipped = P.clipped_noisy_sum(grads, clip_norm, sigma, generator)
    return {released[path]: total / b_exp for path, total in sums.items()}, clipped


def noisy_mean_gradient(model: FairsplitModel, x, loss_of: Callable[..., torch.Tensor], extras: tuple,
                        *, clip_norm: float, sigma: float, b_exp: float, generator: torch.Generator,
                        head: bool, output: str = "logits"
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, float]:
    """:func:`noisy_param_gradient` over the developer's adapter (and the head if ``head``).

    Args:
        model: the auditor's copy of the developer's model at the received adapter and head.
        x: the prepared batch (``model.prepare``), B examples (B may be 0).
        loss_of: ``(out, *extra_i) -> scalar``: example i's term from its model output ``out``
            ((num_classes,) logits, or (D,) features when ``output = "features"``) and its rows of
            ``extras``.
        extras, clip_norm, sigma, b_exp, generator: as :func:`noisy_param_gradient`.
        head: also release the head's gradient.
    Returns:
        (adapter key → gradient, head key → gradient or None, fraction of examples clipped).
    """
    adapter = adapter_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    module, prefix = (model, "") if output == "logits" else (MethodForward(model, "features"), "owner.")
    released = {prefix + names[id(p)]: f"adapter:{k}" for k, p in adapter.items()}
    if head:
        released.update({f"{prefix}head.{k}": f"head:{k}" for k in dict(model.head.named_parameters())})
    out, clipped = noisy_param_gradient(module, released, x, loss_of, extras, clip_norm=clip_norm, sigma=sigma,
                                        b_exp=b_exp, generator=generator)
    ga = {k: out[f"adapter:{k}"].to(p.dtype) for k, p in adapter.items()}
    gh = {k: out[f"head:{k}"] for k in dict(model.head.named_parameters())} if head else None
    return ga, gh, clipped


def dp_probe_steps(probe: nn.Linear, model: FairsplitModel, inputs, s_all: torch.Tensor, *, steps: int,
                   q: float, lr: float, clip_norm: float, sigma: float, rng: np.random.Generator,
                   generator: torch.Generator, device="cpu") -> nn.Linear:
    """``steps`` DP-SGD steps of the sensitive probe g (CE(g(f_φ(x)), s)) on the auditor's data.

    Each step draws a Poisson sample of rate ``q`` from ``inputs`` (N examples, groups ``s_all``
    (N,) int64), computes the features f_φ(x) at the received model (no gradient to φ), clips
    each example's probe gradient (weight (G, D) and bias (G,) together) to ``clip_norm``, adds
    N(0, σ²C²) to the sum, divides by qN and takes a plain SGD step of size ``lr``: one sampled
    Gaussian mechanism of multiplier σ per step. The probe is updated in place and returned.
    """
    n_all = len(s_all)
    b_exp = q * n_all

    def loss_fn(prm, f, si):
        return F.cross_entropy((f @ prm["weight"].T + prm["bias"]).unsqueeze(0), si.unsqueeze(0))

    for _ in range(steps):
        idx = P.poisson_indices(n_all, q, rng)
        params = {k: v.detach().float().cpu() for k, v in probe.state_dict().items()}
        if len(idx):
            feats = C._features(model, C._inputs(inputs, idx), device).float().cpu()
            feats = torch.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)
            grads = P.per_example_grads(loss_fn, params, feats, s_all[idx])
        else:
            grads = {k: torch.zeros((0, *v.shape)) for k, v in params.items()}
        sums, _ = P.clipped_noisy_sum(grads, clip_norm, sigma, generator)
        with torch.no_grad():
            for k, p in probe.named_parameters():
                p -= lr * (sums[k] / b_exp).to(p)
    return probe


def probe_signal_events(cfg, exp, n_train: int, noise) -> list[dict]:
    """The DP events of a probe-based signal (``adversarial``, ``entropy``) in one run of ``exp``:
    per signal request one sampled Gaussian step for the released gradient, and the probe's
    DP-SGD steps (``auditor_steps`` before the first signal, ``dp_probe_steps`` before each
    later one), all of multiplier σ_train at rate q = ``auditor_batch_size`` / n_train."""
    n_signals = sum(1 for r in planned_requests(exp) if r[2] == "signal")
    q = min(1.0, cfg.auditor_batch_size / n_train)
    probe_steps = cfg.auditor_steps + (n_signals - 1) * cfg.dp_probe_steps if n_signals else 0
    return (dp_event("auditor_train", "sampled", noise.train, q, n_signals)
            + dp_event("auditor_train", "sampled", noise.train, q, probe_steps))


def private_probe_signal(method, req, state, term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                         ) -> Release:
    """The DP form of a probe-based signal (:func:`probe_signal_events` lists what it spends).

    The probe g (kept in ``state``, never released) takes its DP-SGD steps (:func:`dp_probe_steps`;
    the first signal starts it from a seeded initialisation with ``auditor_steps`` steps, each
    later one continues it with ``dp_probe_steps``); then a Poisson sample of rate q =
    ``auditor_batch_size`` / N gives the released adapter gradient :func:`noisy_mean_gradient`
    of ℓ_i = ``term(g(f_φ(x_i)) (G,), s_i)`` (clip ``[auditor.privacy] clip_norm``). The draws
    come from the auditor's secret: a re-sent round gets the same answer.

    Returns:
        :class:`auditor.context.Release` with the adapter gradient; metrics ``n`` (the expected
        batch), ``objective`` 0.0 and ``sensitive_accuracy`` None (not released under DP: every
        data-dependent number crosses through a DP mechanism), ``signal_norm`` (of the noisy
        gradient).
    """
    ctx, cfg, model, device = method.ctx, method.cfg, method.ctx.model, method.ctx.cfg.device
    sigma = ctx.gate.noise.train
    train = ctx.data["auditor_train"]
    n_all = len(train)
    q = min(1.0, cfg.auditor_batch_size / n_all)
    s_all = torch.as_tensor(ctx.train_codes)
    rng = ctx.gate.secret.rng(ctx.fingerprint, method.name, req.round)
    gen = ctx.gate.secret.generator(ctx.fingerprint, method.name, req.round)
    first = PROBE not in state
    with torch.random.fork_rng():
        torch.manual_seed(ctx.exp.seed + req.round)
        probe = nn.Linear(model.feature_dim, method.n_groups)
    if not first:
        probe.load_state_dict(state[PROBE].to_torch_state_dict())
    steps = cfg.auditor_steps if first else cfg.dp_probe_steps
    dp_probe_steps(probe, model, train.inputs, s_all, steps=steps, q=q, lr=cfg.auditor_lr,
                   clip_norm=cfg.dp_probe_clip, sigma=sigma, rng=rng, generator=gen, device=device)
    if steps:
        ctx.gate.spend("auditor_train", "sampled", sigma, q, steps)
    state[PROBE] = ArrayRecord({k: v.detach().clone() for k, v in probe.state_dict().items()})
    state[PROBE_META] = ConfigRecord({"fitted_round": req.round})
    probe = probe.to(device)
    for p in probe.parameters():
        p.requires_grad_(False)
    idx = P.poisson_indices(n_all, q, rng)
    x = model.prepare(C._inputs(train.inputs, idx), device) if len(idx) else torch.zeros(0)
    model.eval()
    ga, _, _ = noisy_mean_gradient(
        model, x, lambda f, si: term(probe(f.unsqueeze(0))[0], si), (s_all[idx].to(device),),
        clip_norm=ctx.cfg.privacy.clip_norm, sigma=sigma, b_exp=q * n_all, generator=gen, head=False,
        output="features")
    ctx.gate.spend("auditor_train", "sampled", sigma, q)
    return Release(adapter_gradient=ga, metrics={
        "n": int(cfg.auditor_batch_size), "objective": 0.0, "sensitive_accuracy": None,
        "signal_norm": grad_norm(ga)})


def train_sensitive_adapter_dp(exp, inputs, s_codes: np.ndarray, n_groups: int, *, sigma: float, clip_norm: float,
                               rng: np.random.Generator, generator: torch.Generator, device="cpu"
                               ) -> FairsplitModel:
    """The auditor's sensitive LoRA φ_s + head (predicting s from x) trained with DP-SGD.

    As :func:`auditor.methods.common.train_sensitive_adapter` (same initialisation, LoRA
    config, ``method.sensitive_steps`` AdamW steps at lr ``exp.lr``), but each step is a
    Poisson sample of rate q = ``method.auditor_batch_size`` / N whose per-example gradients of
    CE(φ_s(x_i), s_i) (LoRA and head together) are clipped to ``clip_norm`` and noised
    (:func:`noisy_mean_gradient`): ``sensitive_steps`` sampled Gaussian mechanisms of multiplier
    σ. Everything computed from φ_s afterwards (A_s, ΔW_s) is post-processing.
    """
    n_all = len(s_codes)
    q = min(1.0, exp.method.auditor_batch_size / n_all)
    st = torch.as_tensor(s_codes)
    with torch.random.fork_rng():
        model = build_model(exp, seed=exp.seed + 101).to(device)
        model.head = nn.Linear(model.feature_dim, n_groups).to(device)
    adapter = adapter_parameters(model)
    head = dict(model.head.named_parameters())
    opt = torch.optim.AdamW([*adapter.values(), *head.values()], lr=exp.lr)
    model.eval()  # no dropout: one example's gradient must not depend on a random draw
    for _ in range(exp.method.sensitive_steps):
        idx = P.poisson_indices(n_all, q, rng)
        x = model.prepare(C._inputs(inputs, idx), device) if len(idx) else torch.zeros(0)
        ga, gh, _ = noisy_mean_gradient(
            model, x, lambda logits, si: F.cross_entropy(logits.unsqueeze(0), si.unsqueeze(0)),
            (st[idx].to(device),), clip_norm=clip_norm, sigma=sigma, b_exp=q * n_all, generator=generator,
            head=True)
        for k, p in adapter.items():
            p.grad = ga[k].to(p)
        for k, p in head.items():
            p.grad = gh[k].to(p)
        opt.step()
    return model


def sensitive_training_events(cfg, exp, n_train: int, noise) -> list[dict]:
    """The DP events of the sensitive LoRA's trainings in one run of ``exp`` (``orthogonality``:
    one at the first signal, then one whenever ``sensitive_refresh_every`` rounds have passed;
    ``sensitive_steps`` sampled Gaussian steps each, rate ``auditor_batch_size`` / n_train)."""
    rounds = [r[0] for r in planned_requests(exp) if r[2] == "signal"]
    every = getattr(cfg, "sensitive_refresh_every", 0)
    trainings, fitted = 0, None
    for r in rounds:
        if fitted is None or (every > 0 and r - fitted >= every):
            trainings, fitted = trainings + 1, r
    q = min(1.0, cfg.auditor_batch_size / n_train)
    return dp_event("auditor_train", "sampled", noise.train, q, trainings * cfg.sensitive_steps)
