"""Leakage benchmark: how well can a developer who crafts its requests infer the auditor's s?

The attacker follows the message formats exactly (every request passes the payload policy) but
chooses what it sends: heads and adapters crafted to turn a reply into a question about the
auditor's data. Every attack runs against the real :class:`auditor.service.AuditorService`
(``handle``, as over Flower) twice: with ``[auditor.privacy] enabled = false`` (the exact
releases, for controlled studies; "before") and with the default privacy settings ("after").

Attack families (one function each; ``docs/privacy.md``):

* ``report_differencing``: a crafted head that selects one known person (the developer holds the
  auditor's inputs in ``shared_source`` mode); the group whose selection count rises names the
  target's s. Measured as accuracy over targets (chance 0.5).
* ``report_sq``: crafted heads as statistical queries (Hamman et al. 2023): each head selects a
  random half of the inputs; the per-group selection rates over many queries are regressed to
  score each input's s. AUC.
* ``signal_direction``: the penalty signal at a crafted zero head (p = 0.5 everywhere, the most
  sensitive point) gives ∂R/∂W ∝ Σ_i w_{c(i)} f(x_i), a feature-space direction separating the
  groups, summed over rounds (the direction attack of Li et al. 2021, "Label Leakage and
  Protection in Two-party Split Learning", on aggregate gradients); inputs are scored by their
  projection. AUC.
* ``update_pca``: the unlearning update ΔW_s without labels: the first principal component of
  f_{W0+ΔW_s}(x) − f_{W0}(x) over the inputs scores s. AUC.
* ``orthogonality_recovery``: crafted task adapters read A_sᵀA_s out of the orthogonality
  signal, the public initialisation resolves A_s, and the first principal component of the
  inputs projected on what training wrote into A_s scores s. AUC.
* ``error_channel``: a head that yields NaN only for inputs meeting a predicate, and whether the
  reply is an error; plus the error's text. Accuracy of "does any auditor example meet the
  predicate" (chance 0.5) and whether any reply text differs between predicates.

An AUC is sign-agnostic (max(AUC, 1 − AUC)), which favours the attacker. A refused request
(budget, plan, not private) answers nothing; the attacker then guesses.

* ``report_sq_rounds``: the statistical queries of ``report_sq`` with a report every round of
  one run (the run's validation ε spread over them). AUC.
* ``report_sq_offset``: ``report_sq`` against a report without signed per-group rates (DP): each
  random direction mixed with the developer's own ERM direction, so that the unsigned gap the
  report still carries is linear in the selection. AUC.

References (not attacks): a supervised probe for s on W0's features, the first principal
component of them (unsupervised), and ``final_model``: the s-direction the released fair head
alone implies (:func:`final_model_direction`), which any holder of the final model has.

Run: ``python bench/leakage.py [--config run.toml] [--attacks a,b] [--epsilon E] [--json out.json]
[--results docs/results/leakage_utkface.json]``.
Prints the table, the exact releases' worst figure, and, last, ``max_leak_auc=`` (the largest
AUC, or targeted accuracy, at the default, or at ``--epsilon`` with a budget of 5 runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import Ridge
from pydantic import TypeAdapter
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairsplit.auditor.service import AuditorService  # noqa: E402
from fairsplit.deploy.config import RunFile, load_run_file  # noqa: E402
from fairsplit.protocol.config import experiment_fingerprint, parse_config  # noqa: E402
from fairsplit.protocol.data import load_split  # noqa: E402
from fairsplit.protocol.methods import MethodConfig, request_plan  # noqa: E402
from fairsplit.protocol.messages import PROTOCOL_VERSION, RoundRequest, make_request, message_type_for, parse_reply  # noqa: E402
from fairsplit.protocol.model import adapter_state, build_model, head_state, resolve_image_size, state_spec  # noqa: E402
from fairsplit.protocol.policy import sends_head  # noqa: E402
from fairsplit.protocol.privacy import public_error_text  # noqa: E402

__all__ = ["ATTACKS", "Attacker", "synthetic_run", "run_attack", "main"]

log = logging.getLogger(__name__)

#: s's colour tint in the benchmark's synthetic images (1 = the demo's strong shortcut).
TINT = 0.1


def synthetic_run(method: str = "erm", rounds: int = 4, privacy: dict | None = None, tint: float = TINT,
                  **method_cfg) -> RunFile:
    """The benchmark's tiny synthetic experiment (1-block ViT, 1600 examples, 800 on the auditor).

    ``tint``: how visible s is in the images (:class:`protocol.config.SyntheticData`); the
    default makes s partly predictable from W0's features (a supervised probe's AUC is printed
    as a reference), as race is from faces, and not visible to an unsupervised look.
    """
    from fairsplit.deploy.demo import DEMO_CONFIG

    cfg = copy.deepcopy(DEMO_CONFIG)
    cfg["experiment"].update(rounds=rounds, local_steps=1, eval_every=rounds)
    cfg["experiment"]["model"]["overrides"] = {"img_size": 32, "patch_size": 8, "depth": 1,
                                               "embed_dim": 32, "num_heads": 2}
    cfg["experiment"]["partition"] = {"developer_train": 0.5, "auditor_train": 0.3, "auditor_val": 0.1,
                                      "auditor_test": 0.1}
    cfg["experiment"]["method"] = {"name": method, **method_cfg}
    cfg["developer"]["data"]["n"] = 1600
    cfg["auditor"]["data"]["n"] = 1600
    # the auditor's own data is not biased (s ⊥ y), so a task predictor is no s-predictor there
    cfg["auditor"]["data"]["spurious_correlation"] = 0.5
    cfg["developer"]["data"]["tint"] = cfg["auditor"]["data"]["tint"] = tint
    cfg["auditor"]["min_group_size"] = 10
    if privacy is not None:
        cfg["auditor"]["privacy"] = privacy
    return parse_config(RunFile, cfg, "<leakage>")


class Attacker:
    """A developer that sends crafted but well-formed requests to one auditor service.

    ``run``: the experiment; ``private``: use the run's privacy settings (else ``enabled =
    false``); ``state_dir``: the auditor's (a fixed secret is written there for reproducibility).
    The attacker holds W0 (the shared backbone) and, in ``shared_source`` mode, the auditor's
    inputs but never s (``self.s`` is used only to score the attack).
    """

    def __init__(self, run: RunFile, private: bool, state_dir: Path, secret_seed: int = 0):
        privacy = run.auditor.privacy.model_copy(update={"enabled": private})
        self.auditor_cfg = run.auditor.model_copy(update={"privacy": privacy, "state_dir": state_dir})
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "secret.key").write_bytes(np.random.default_rng(secret_seed).bytes(32))
        self.run, self.state_dir = run, state_dir
        self.service = AuditorService(run.experiment, self.auditor_cfg)
        self.model = build_model(run.experiment)
        self.model.eval()
        self.adapter = adapter_state(self.model)
        self.head = head_state(self.model)
        data = load_split(run.auditor.data, run.experiment, "auditor", resolve_image_size(run.experiment.model))
        self.parts = data
        self.inputs = np.concatenate([data[p].inputs for p in ("auditor_train", "auditor_val", "auditor_test")])
        s = np.concatenate([np.asarray(data[p].s).astype(str) for p in ("auditor_train", "auditor_val", "auditor_test")])
        self.group_names = sorted(set(s))
        self.s = (s == self.group_names[-1]).astype(int)
        with torch.no_grad():
            self.feats = self.model.features(self.model.prepare(self.inputs)).double().numpy()
        self.queries = self.refused = 0

    def ask(self, round_: int, split: str, want: str, head=None, adapter=None, service=None):
        """One request; returns the parsed reply, or None if it was refused (the error is kept)."""
        exp = (service or self.service).exp
        req = RoundRequest(round=round_, split=split, want=want, method=exp.method.name,
                           stage=request_plan(exp.method).stage[want],
                           fingerprint=experiment_fingerprint(exp), protocol=PROTOCOL_VERSION)
        head = head if head is not None else self.head
        adapter = adapter if adapter is not None else self.adapter
        content = make_request(adapter, head if sends_head(req) else None, req,
                               adapter_spec=state_spec(self.adapter), head_spec=state_spec(self.head),
                               refit_basis=self.refit_basis(exp.method.dp_subspace_dim) if want == "head" else None)
        self.queries += 1
        try:
            reply = (service or self.service).handle(message_type_for(req), content)
        except Exception as err:  # noqa: BLE001 - a refusal answers nothing
            self.refused += 1
            self.last_error = public_error_text(err)
            return None
        self.last_error = None
        return parse_reply(reply, req, state_spec(self.adapter), head_spec=state_spec(self.head))

    def refit_basis(self, k: int) -> dict[str, torch.Tensor]:
        """The refit basis a head request carries: the top-k principal directions of the
        attacker's features, which in ``shared_source`` mode are the auditor's own inputs (the
        subspace in which the auditor's examples vary most, a basis no honest developer has)."""
        centred = self.feats - self.feats.mean(0)
        vt = np.linalg.svd(centred, full_matrices=False)[2][:k]
        basis = np.zeros((self.feats.shape[1], min(k, self.feats.shape[1])))
        basis[:, :len(vt)] = vt.T  # fewer examples than k: zero columns, as the developer's own
        return {"basis": torch.as_tensor(basis, dtype=torch.float32),
                "mean": torch.as_tensor(self.feats.mean(0), dtype=torch.float32)}

    def report_query(self, head, k: int):
        """Query ``k``'s test-part report at a crafted head, on a fresh experiment when private.

        Without DP the same service answers any number of evaluation requests. With DP each run
        answers its plan once, so every query is a new experiment (seed k) on the same auditor
        state (ledger, run count): what a developer could do if the auditor approved that many.
        """
        if not self.auditor_cfg.privacy.enabled:
            return self.ask(k + 1, "test", "none", head=head)
        exp = self.run.experiment.model_copy(update={"seed": 1000 + k})
        service = AuditorService(exp, self.auditor_cfg)
        return self.ask(exp.rounds, "test", "none", head=head, service=service)


def _auc(scores, s) -> float:
    auc = roc_auc_score(s, scores)
    return float(max(auc, 1 - auc))


def _crafted_head(direction: np.ndarray, threshold: float, dtype) -> dict[str, torch.Tensor]:
    """A head predicting 1 iff f(x)·direction > threshold (steep: ×100)."""
    d = torch.as_tensor(direction, dtype=torch.float64)
    weight = torch.stack([torch.zeros_like(d), 100 * d]).to(dtype)
    bias = torch.tensor([0.0, -100 * threshold], dtype=torch.float64).to(dtype)
    return {"weight": weight, "bias": bias}


def _test_part(att: Attacker, part: str = "auditor_test") -> tuple[np.ndarray, np.ndarray]:
    """W0 features (N, D) of the auditor's ``part`` inputs (which the attacker holds) and, for
    scoring only, their s (N,) in {0, 1}."""
    test = att.parts[part]
    with torch.no_grad():
        f = att.model.features(att.model.prepare(test.inputs)).double().numpy()
    return f, (np.asarray(test.s).astype(str) == att.group_names[-1]).astype(int)


def report_differencing(make, targets: int = 60) -> dict:
    """Select one known test-part person per query; the group whose count is 1 names its s."""
    att = make("erm", 1)
    f, s_true = _test_part(att)
    rng = np.random.default_rng(1)
    correct = 0
    for k, t in enumerate(rng.choice(len(f), targets, replace=False)):
        d = f[t] - f.mean(0)
        d /= np.linalg.norm(d)
        proj = f @ d
        thr = (proj[t] + np.max(proj[np.arange(len(f)) != t])) / 2 if proj[t] == proj.max() else proj[t] - 1e-6
        rep = att.report_query(_crafted_head(d, thr, att.head["weight"].dtype), k)
        if rep is None:
            guess = int(rng.integers(2))
        elif all(g in rep.report["per_group"] for g in att.group_names):
            pg = rep.report["per_group"]
            counts = [(pg[g]["selection_rate"] or 0.0) * (pg[g]["n"] or 0) for g in att.group_names]
            guess = int(np.argmax(counts))
        else:  # no per-group counts cross (DP): the unsigned gap names no group
            guess = int(rng.integers(2))
        correct += int(guess == s_true[t])
    return {"metric": "target_accuracy", "value": correct / targets, "queries": targets}


def _rate_gap(report: dict, group_names: list[str]) -> float | None:
    """Last group's selection rate minus the first's, or None where a noisy report left either
    undefined (a noisy count at or below zero). Without per-group rates (under DP they stay in
    the auditor) the best the report offers: the demographic parity difference, the gap's
    magnitude without its sign."""
    per_group = report["per_group"]
    if not all(g in per_group for g in group_names):
        return report.get("demographic_parity_difference")
    last, first = per_group[group_names[-1]]["selection_rate"], per_group[group_names[0]]["selection_rate"]
    return None if last is None or first is None else last - first


def _random_half_query(att, f, rng, ask, rows: list, answers: list, anchor: np.ndarray | None = None) -> None:
    """One statistical query: a crafted head selecting the half of the inputs ``f`` above the
    median of a random direction (plus, with ``anchor``, the anchor's standardised projection:
    see :func:`report_sq_offset`), sent with ``ask(head)``; the selection goes to ``rows`` and
    the reply's rate gap to ``answers`` (nothing when refused or undefined)."""
    d = rng.normal(size=f.shape[1])
    d /= np.linalg.norm(d)
    if anchor is not None:  # z(f·d) + z(f·a) is f·d' for d' = d/sd(f·d) + a/sd(f·a), up to a shift
        d = d / np.std(f @ d) + anchor / np.std(f @ anchor)
    proj = f @ d
    thr = float(np.median(proj))
    rep = ask(_crafted_head(d, thr, att.head["weight"].dtype))
    gap = None if rep is None else _rate_gap(rep.report, att.group_names)
    if gap is not None:
        rows.append((proj > thr).astype(float))
        answers.append(gap)


def report_sq(make, queries: int = 24, offset: bool = False) -> dict:
    """Random-half crafted heads; ridge regression of the rate differences scores each input."""
    att = make("erm", 1)
    f, s_true = _test_part(att)
    rng = np.random.default_rng(2)
    anchor = None
    if offset:
        w = honest_head(att)["weight"].double().numpy()
        anchor = w[1] - w[0]
    rows, answers = [], []
    for k in range(queries):
        _random_half_query(att, f, rng, lambda head, k=k: att.report_query(head, k), rows, answers, anchor)
    if len(rows) < 2:
        return {"metric": "auc", "value": 0.5, "queries": queries}
    X = np.array(rows)  # (queries, examples): which examples each query selected
    # each answer ≈ Σ_i X_qi (s_i/n1 − (1−s_i)/n0): least squares over the examples' contributions
    coef = Ridge(alpha=1.0, fit_intercept=True).fit(X, np.array(answers)).coef_
    return {"metric": "auc", "value": _auc(coef, s_true), "queries": queries, "answered": len(rows)}


def report_sq_offset(make, queries: int = 24) -> dict:
    """:func:`report_sq` against a report that crosses without its signed per-group rates (DP):
    the demographic parity difference is the gap's magnitude |g_q|, not linear in the
    selection. Each random direction is mixed with the honest head's (the developer's own ERM
    direction, which carries a gap g₀ of one sign): while |g₀| outweighs the random part's
    gap, |g_q| = sign(g₀)·g_q, linear again up to a global sign the sign-agnostic AUC ignores."""
    return report_sq(make, queries, offset=True)


def developer_features(att: Attacker) -> tuple[np.ndarray, np.ndarray]:
    """W0 features (N, D) and labels (N,) of the developer's own training split (its data)."""
    if getattr(att, "_dev", None) is None:
        dev = load_split(att.run.developer.data, att.run.experiment, "developer",
                         resolve_image_size(att.run.experiment.model))["developer_train"]
        with torch.no_grad():
            f = att.model.features(att.model.prepare(dev.inputs)).double().numpy()
        att._dev = (f, np.asarray(dev.y))
    return att._dev


def final_model_direction(att: Attacker, head: dict[str, torch.Tensor]) -> np.ndarray:
    """The s-direction the final model alone implies (D,): the task loss's gradient at the
    released ``head`` on the developer's own data, Σ_i (p_i − y_i)·f_i for the positive logit
    minus the negative's. At a fair head the task loss alone would move the head back along what
    the fairness term held it from (the constraint's normal), so anyone who holds the final model
    and the task objective has this direction; it is the reference a fair release is measured
    against, not an attack on the auditor."""
    f, y = developer_features(att)
    w, b = head["weight"].double().numpy(), head["bias"].double().numpy()
    logits = f @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - np.eye(w.shape[0])[y]).T @ f  # (C, D)
    return g[1] - g[0]


def report_sq_rounds(make, rounds: int = 24) -> dict:
    """Statistical queries with a report every round: one run of ``rounds`` rounds evaluated
    after each (``eval_every`` = 1), a random-half crafted head each round, the validation
    part's per-group rates regressed as in :func:`report_sq`. The run's validation ε is spread
    over its ``rounds`` reports (the plan the auditor calibrates). AUC over the validation part."""
    att = make("erm", rounds, eval_every=1)
    f, s_true = _test_part(att, "auditor_val")
    rng = np.random.default_rng(4)
    rows, answers = [], []
    for r in range(1, rounds + 1):
        _random_half_query(att, f, rng, lambda head, r=r: att.ask(r, "val", "none", head=head), rows, answers)
    if len(rows) < 2:
        return {"metric": "auc", "value": 0.5, "queries": rounds}
    coef = Ridge(alpha=1.0, fit_intercept=True).fit(np.array(rows), np.array(answers)).coef_
    return {"metric": "auc", "value": _auc(coef, s_true), "queries": rounds}


def honest_head(att: Attacker) -> dict[str, torch.Tensor]:
    """The head an honest developer would send: logistic regression on its own (biased) data's
    W0 features, the ERM head of a frozen backbone."""
    from sklearn.linear_model import LogisticRegression

    f, y = developer_features(att)
    lr = LogisticRegression(max_iter=2000).fit(f, y)
    w = torch.as_tensor(lr.coef_[0]) / 2
    b = float(lr.intercept_[0]) / 2
    dtype = att.head["weight"].dtype
    return {"weight": torch.stack([-w, w]).to(dtype), "bias": torch.tensor([-b, b]).to(dtype)}


def signal_direction(att_factory, rounds: int = 8, honest: bool = False) -> dict:
    """Penalty signals at the crafted zero head (or the honest head), summed over rounds;
    project the inputs on them."""
    att = att_factory("penalty", rounds)
    zero = honest_head(att) if honest else {k: torch.zeros_like(v) for k, v in att.head.items()}
    direction = np.zeros(att.feats.shape[1])
    for r in range(rounds):
        rep = att.ask(r, "none", "signal", head=zero)
        if rep is None:
            continue
        g = rep.head_signal["weight"].double().numpy()
        direction += g[1] - g[0]
    if not direction.any():
        return {"metric": "auc", "value": 0.5, "queries": rounds}
    return {"metric": "auc", "value": _auc(att.feats @ direction, att.s), "queries": rounds}


def gradient_decoding(att_factory, iters: int = 60, method: str = "adversarial") -> dict:
    """Per-example decoding of the adversarial signal (a gradient-inversion attack in the manner
    of Zhu et al. 2019, "Deep Leakage from Gradients", using the signal's known structure).
    ``method = "entropy"``: the same decoding against entropy's signal, whose per-example
    coefficient is the probe's entropy gradient at example i (a function of the probe's score,
    which tracks s) rather than its sign-bearing CE residual.

    The released signal is g = Σ_i J_iᵀ v_i over the round's batch, with J_i = ∂f_φ(x_i)/∂φ,
    which the attacker computes itself (it holds the inputs and the adapter it crafted: random
    LoRA A and B, so every adapter entry carries gradient), and, for two groups,
    v_i = −(λ/B)·(p_i − s_i)·(w₁ − w₀): one unknown direction u and one coefficient c_i per
    example, negative exactly when s_i = 1. Alternating least squares on g = Σ_i c_i J_iᵀ u
    recovers the c_i; their signs name each example's s. The batch is the one the exact auditor
    draws (its seeded draw is simulable without DP); under DP the Poisson sample is the
    auditor's secret, and the attacker decodes against the same guess. AUC of c over the batch.
    """
    from torch.func import functional_call, jacrev, vmap

    from fairsplit.auditor.methods.common import batch_indices
    from fairsplit.protocol.model import adapter_parameters, load_adapter_state

    att = att_factory(method, 1)
    gen = torch.Generator().manual_seed(7)
    crafted = {k: 0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in att.adapter.items()}
    rep = att.ask(0, "none", "signal", adapter=crafted)
    if rep is None:
        return {"metric": "auc", "value": 0.5, "queries": 1}
    model = copy.deepcopy(att.model)
    load_adapter_state(model, crafted)
    model.eval()
    n_train = len(att.parts["auditor_train"])
    idx = batch_indices(n_train, att.run.experiment.method.auditor_batch_size, att.run.experiment.seed, 0)
    x = model.prepare(att.parts["auditor_train"].inputs[idx])
    adapter = adapter_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    path = {k: names[id(p)] for k, p in adapter.items()}
    params = {path[k]: p.detach() for k, p in adapter.items()}
    rest = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in params}

    class Feat(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, xb):
            return self.m.features(xb)

    feat = Feat(model)

    def f_one(prm, xi):
        return functional_call(feat, {f"m.{n}": t for n, t in {**rest, **prm}.items()}, (xi.unsqueeze(0),))[0]

    jac = vmap(jacrev(f_one), in_dims=(None, 0))(params, x)  # path → (B, D, *shape)
    keys = list(adapter)
    J = torch.cat([jac[path[k]].flatten(2) for k in keys], dim=2).double()  # (B, D, P)
    g = torch.cat([rep.signal[k].flatten() for k in keys]).double()  # (P,)
    u = torch.randn(J.shape[1], generator=gen, dtype=torch.float64)
    for _ in range(iters):
        M = torch.einsum("bdp,d->pb", J, u)  # (P, B): column i is J_iᵀ u
        c = torch.linalg.lstsq(M, g.unsqueeze(1)).solution[:, 0]
        K = torch.einsum("bdp,b->pd", J, c)  # (P, D)
        u = torch.linalg.lstsq(K, g.unsqueeze(1)).solution[:, 0]
        u = u / (u.norm() + 1e-300)
    s_batch = att.s[idx]
    return {"metric": "auc", "value": _auc(c.numpy(), s_batch), "queries": 1,
            "n_pos": int(s_batch.sum()), "n_neg": int(len(s_batch) - s_batch.sum())}


def update_pca(att_factory) -> dict:
    """ΔW_s's first principal component of the feature change, no labels."""
    from fairsplit.protocol.model import subtract_weight_update

    att = att_factory("unlearning", 2)
    rep = att.ask(0, "none", "unlearning_update")
    if rep is None:
        return {"metric": "auc", "value": 0.5, "queries": 1}
    moved = build_model(att.run.experiment)
    moved.eval()
    subtract_weight_update(moved, rep.update, -1.0)  # W0 + ΔW_s
    with torch.no_grad():
        diff = moved.features(moved.prepare(att.inputs)).double().numpy() - att.feats
    diff -= diff.mean(0)
    _, _, vt = np.linalg.svd(diff, full_matrices=False)
    return {"metric": "auc", "value": _auc(diff @ vt[0], att.s), "queries": 1}


def _module_inputs(att: Attacker, keys: list[str]) -> dict[str, torch.Tensor]:
    """The token-mean input (N, D_in) of each LoRA-wrapped module named by an adapter key
    (``….lora_A.weight``) over the attacker's inputs, at W0 (the attacker's own forward)."""
    named = dict(att.model.named_modules())
    acts: dict[str, torch.Tensor] = {}

    def keep(key):
        def hook(module, inputs, output):
            x = inputs[0].detach().double()
            acts[key] = x.mean(1) if x.ndim == 3 else x
        return hook

    hooks = [named["backbone." + k.removesuffix(".lora_A.weight")].register_forward_hook(keep(k)) for k in keys]
    try:
        with torch.no_grad():
            att.model.features(att.model.prepare(att.inputs))
    finally:
        for h in hooks:
            h.remove()
    return acts


def orthogonality_recovery(att_factory) -> dict:
    """The orthogonality signal recovers the auditor's sensitive A_s; does A_s carry s?

    The released gradient is ∇_{A_t} R = 2λ·A_t A_sᵀ A_s per module. Crafted task adapters whose
    A_t rows are unit vectors (r of them per round, B_t = 0) read A_sᵀA_s row block by row block,
    one signal per round of one run (the signals are post-processing of A_s: under DP they cost
    nothing beyond A_s's one DP-SGD training). A_sᵀA_s fixes A_s up to a rotation Q; A_s's
    initialisation is public (seed ``experiment.seed + 101``, as the auditor builds it), so Q is
    the orthogonal Procrustes fit of the recovered rows to it, and ΔA_s = A_s − A_s(init) is what
    training on s wrote. Inputs are scored by the first principal component of their module
    inputs (token means) projected on ΔA_s's rows, all modules together (no labels). AUC.

    Also returned (not attacks): ``gram_error``, the relative error of the recovered A_sᵀA_s
    (0: the release reveals A_s); ``probe_subspace`` and ``probe_random``, a supervised probe's
    cross-validated AUC for s on the inputs projected on A_s's rows and on random rows of the
    same rank (does A_s's span hold more of s than any span of its size?).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    first = att_factory("orthogonality", 1)
    keys = [k for k in first.adapter if k.endswith("lora_A.weight")]
    r = first.adapter[keys[0]].shape[0]
    rounds = -(-max(first.adapter[k].shape[1] for k in keys) // r)
    att = att_factory("orthogonality", rounds)
    lam = float(att.run.experiment.method.lam)
    gram = {k: torch.zeros(att.adapter[k].shape[1], att.adapter[k].shape[1], dtype=torch.float64) for k in keys}
    for j in range(rounds):
        crafted = {k: torch.zeros_like(v) for k, v in att.adapter.items()}
        rows = {k: [c for c in range(j * r, (j + 1) * r) if c < gram[k].shape[0]] for k in keys}
        for k in keys:
            for i, c in enumerate(rows[k]):
                crafted[k][i, c] = 1.0
        rep = att.ask(j, "none", "signal", adapter=crafted)
        if rep is None:
            return {"metric": "auc", "value": 0.5, "queries": j + 1, "gram_error": None}
        for k in keys:
            gram[k][rows[k]] = rep.signal[k].double()[: len(rows[k])] / (2 * lam)
    init = adapter_state(build_model(att.run.experiment, seed=att.run.experiment.seed + 101))
    acts = _module_inputs(att, keys)
    gen = torch.Generator().manual_seed(3)
    moved, spans, rand, errors = [], [], [], []
    for k in keys:
        m = (gram[k] + gram[k].T) / 2
        ev, vec = torch.linalg.eigh(m)
        top = ev.argsort(descending=True)[:r]
        rows_k = ev[top].clamp(min=0).sqrt()[:, None] * vec[:, top].T  # (r, D) = Q·A_s
        a0 = init[k].double()
        u, _, vt = torch.linalg.svd(a0 @ rows_k.T)
        a_s = (u @ vt) @ rows_k
        errors.append(float((a_s.T @ a_s - m).norm() / m.norm().clamp_min(1e-300)))
        moved.append(acts[k] @ (a_s - a0).T)
        spans.append(acts[k] @ a_s.T)
        rand.append(acts[k] @ torch.randn(r, a0.shape[1], generator=gen, dtype=torch.float64).T)

    def standardised(cols):
        z = torch.cat(cols, 1).numpy()
        return (z - z.mean(0)) / (z.std(0) + 1e-12)

    def probe(cols) -> float:
        p = cross_val_predict(LogisticRegression(max_iter=3000), standardised(cols), att.s, cv=5,
                              method="predict_proba")[:, 1]
        return float(roc_auc_score(att.s, p))

    z = standardised(moved)
    pc = np.linalg.svd(z, full_matrices=False)[2][0]
    return {"metric": "auc", "value": _auc(z @ pc, att.s), "queries": rounds, "gram_error": max(errors),
            "probe_subspace": probe(spans), "probe_random": probe(rand)}


def error_channel(make, probes: int = 20) -> dict:
    """A head whose score is NaN exactly for inputs meeting a predicate; is the reply an error?

    The head's positive row is +c on feature j and −c on feature k (c = 3.4e38 / t): both
    products overflow, to +inf and −inf, and their sum is NaN, exactly when f_j and f_k both
    exceed t. Half the probes put t above every input. Ground truth (whether any test input
    scores NaN) is computed by the harness with the auditor's inputs; the attacker guesses "yes"
    iff the reply is an error.
    """
    att = make("erm", 1)
    rng = np.random.default_rng(3)
    test = att.parts["auditor_test"]
    with torch.no_grad():
        f32 = att.model.features(att.model.prepare(test.inputs)).float()
    f = f32.double().numpy()
    correct, texts = 0, set()
    dims = np.argsort(-np.median(f, 0))
    for k in range(probes):
        j, i = rng.choice(dims[:4], 2, replace=False)
        both = np.minimum(f[:, j], f[:, i])
        t = float(np.quantile(both, 0.9)) if k % 2 == 0 else float(both.max() * 1.5 + 1.0)
        t = max(t, 1.5)
        weight = torch.zeros(2, f.shape[1])
        weight[1, j], weight[1, i] = 3.4e38 / t, -3.4e38 / t
        head = {"weight": weight.to(att.head["weight"].dtype), "bias": torch.zeros(2).to(att.head["bias"].dtype)}
        with torch.no_grad():
            scores = torch.softmax(f32 @ head["weight"].T + head["bias"], -1)[:, 1]
        meets = bool((~torch.isfinite(scores)).any())
        rep = att.report_query(head, k)
        texts.add(att.last_error or "ok")
        correct += int((rep is None) == meets)
    return {"metric": "accuracy", "value": correct / probes, "queries": probes,
            "distinct_replies": len(texts)}


def head_delta(att_factory, honest: bool = False) -> dict:
    """last_layer's refitted head at a crafted zero incoming head (or the honest head): its
    change is a feature-space direction; inputs are scored by their projection on it.
    ``final_model``: the AUC of the same released head's :func:`final_model_direction`, the
    reference this attack is held to."""
    att = att_factory("last_layer", 1)
    sent = honest_head(att) if honest else {k: torch.zeros_like(v) for k, v in att.head.items()}
    rep = att.ask(1, "none", "head", head=sent)
    if rep is None:
        return {"metric": "auc", "value": 0.5, "queries": 1, "final_model": 0.5}
    w = (rep.head["weight"] - sent["weight"]).double().numpy()
    return {"metric": "auc", "value": _auc(att.feats @ (w[1] - w[0]), att.s), "queries": 1,
            "final_model": _auc(att.feats @ final_model_direction(att, rep.head), att.s)}


def references(att: Attacker) -> dict:
    """What s-information the inputs carry before any release (not attacks):

    ``probe_auc``: a supervised linear probe for s on W0's features (cross-validated; it uses
    s, which the developer never has); ``pca_auc``: the first principal component of the
    attacker's own features, the release-free version of a direction attack;
    ``random_auc_mean``/``random_auc_sd``: the AUC of isotropic random directions in feature
    space (500 draws), what a direction that carries no release reaches on features that carry s.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    p = cross_val_predict(LogisticRegression(max_iter=2000), att.feats, att.s, cv=5, method="predict_proba")[:, 1]
    centred = att.feats - att.feats.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    rand = np.random.default_rng(0).standard_normal((att.feats.shape[1], 500))
    random_aucs = [_auc(att.feats @ rand[:, k], att.s) for k in range(rand.shape[1])]
    return {"probe_auc": float(roc_auc_score(att.s, p)), "pca_auc": _auc(centred @ vt[0], att.s),
            "random_auc_mean": float(np.mean(random_aucs)), "random_auc_sd": float(np.std(random_aucs))}


ATTACKS = {
    "report_differencing": ("reports (crafted heads)", report_differencing),
    "report_sq": ("reports (crafted heads)", report_sq),
    "report_sq_rounds": ("reports every round (crafted heads, one run)", report_sq_rounds),
    "report_sq_offset": ("reports (crafted heads mixed with the honest head)", report_sq_offset),
    "report_sq_offset_budget": ("reports (as report_sq_offset, 48 asked: the whole budget)",
                                lambda f: report_sq_offset(f, queries=48)),
    "signal_direction": ("penalty signal (crafted head, over rounds)", signal_direction),
    "update_pca": ("unlearning ΔW_s", update_pca),
    "orthogonality_recovery": ("orthogonality signal (crafted A_t, one run: A_s recovered)", orthogonality_recovery),
    "gradient_decoding": ("adversarial signal (crafted adapter, per-example decoding)", gradient_decoding),
    "gradient_decoding_entropy": ("entropy signal (crafted adapter, per-example decoding)",
                                  lambda f: gradient_decoding(f, method="entropy")),
    "head_delta": ("last_layer head (crafted incoming head)", head_delta),
    "signal_direction_honest": ("penalty signal (honest head, over rounds)",
                                lambda f: signal_direction(f, honest=True)),
    "head_delta_honest": ("last_layer head (honest incoming head)", lambda f: head_delta(f, honest=True)),
    "error_channel": ("error replies (NaN predicate)", error_channel),
}


def run_attack(name: str, private: bool, base: RunFile | None = None, secret_seed: int = 0) -> dict:
    """Run one attack against a fresh auditor (temp ``state_dir``); returns its result row."""
    payload, fn = ATTACKS[name]
    base = base or synthetic_run()
    with tempfile.TemporaryDirectory() as tmp:
        def factory(method: str, rounds: int, eval_every: int | None = None) -> Attacker:
            extra = {"lam": 1.0, "auditor_batch_size": 64} if method == "penalty" else {}
            if method == "last_layer":
                extra = {"alphas": [0.0, 1.0, 4.0], "refit_steps": 50}
            if method == "unlearning":
                extra = {"lam": 1.0, "auditor_batch_size": 64, "sensitive_steps": 30}
            exp = base.experiment.model_copy(update={
                "rounds": rounds, "eval_every": eval_every or rounds,
                "method": TypeAdapter(MethodConfig).validate_python({"name": method, **extra})})
            return Attacker(base.model_copy(update={"experiment": exp}), private, Path(tmp) / method, secret_seed)

        out = fn(factory)
    return {"attack": name, "payload": payload, "dp": private, **out}


def results_summary(base: RunFile, ref: dict, rows: list[dict]) -> dict:
    """The DP arm as ``{"epsilon", "attacks": {name: value}, "targeted_accuracy", "references":
    {"unsupervised", "supervised_probe", "final_model"}}``; ``final_model`` is the AUC of the
    honest refit's :func:`final_model_direction` (the ``head_delta_honest`` row; None if that
    attack was not run)."""
    dp = {r["attack"]: r for r in rows if r["dp"]}
    final = dp.get("head_delta_honest", {}).get("final_model")
    return {"epsilon": base.auditor.privacy.target_epsilon,
            "epsilon_budget": base.auditor.privacy.epsilon_budget,
            "attacks": {k: r["value"] for k, r in dp.items() if k != "report_differencing"},
            "targeted_accuracy": dp.get("report_differencing", {}).get("value"),
            "targets": dp.get("report_differencing", {}).get("queries"),
            "references": {"unsupervised": ref["pca_auc"], "supervised_probe": ref["probe_auc"],
                           "final_model": final}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, help="run TOML (default: the tiny synthetic experiment)")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--results", type=Path, help="write the DP arm in the form of "
                    "docs/results/leakage_utkface.json (epsilon, attacks, targeted_accuracy, references)")
    ap.add_argument("--epsilon", type=float, default=None, help="the auditor's target ε per run "
                    "for the DP arm (default: the config's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    base = load_run_file(args.config) if args.config else synthetic_run()
    if args.epsilon is not None:
        from fairsplit.deploy.cli import with_epsilon

        base = with_epsilon(base, str(args.epsilon))
        pc = base.auditor.privacy  # the budget as the default's, relative to one run's ε
        base = base.model_copy(update={"auditor": base.auditor.model_copy(update={
            "privacy": pc.model_copy(update={"epsilon_budget": 5 * args.epsilon})})})
    with tempfile.TemporaryDirectory() as tmp:
        ref = references(Attacker(base, False, Path(tmp)))
    print(f"reference (not attacks): supervised probe on W0 AUC {ref['probe_auc']:.3f}, "
          f"unsupervised PCA AUC {ref['pca_auc']:.3f}")
    rows = []
    for name in args.attacks.split(","):
        for private in (False, True):
            rows.append(run_attack(name, private, base))
            r = rows[-1]
            print(f"{r['attack']:<20} {'DP' if private else 'exact':<6} {r['metric']:<16} "
                  f"{r['value']:.3f}  queries {r['queries']}", flush=True)
    print()
    print("| payload | attack | exact releases | default (DP) | queries |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.attacks.split(","):
        a, b = [r for r in rows if r["attack"] == name]
        print(f"| {a['payload']} | {name} ({a['metric']}) | {a['value']:.3f} | {b['value']:.3f} | {a['queries']} |")
    if args.json:
        args.json.write_text(json.dumps({"references": ref, "rows": rows}, indent=1))
    if args.results:
        args.results.write_text(json.dumps(results_summary(base, ref, rows), indent=1) + "\n")
    def worst(dp: bool) -> float:
        return max((r["value"] for r in rows if r["dp"] == dp and r["metric"] in ("auc", "target_accuracy")),
                   default=0.5)

    print(f"exact releases: max_leak_auc={worst(False):.3f}")
    print(f"max_leak_auc={worst(True):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
