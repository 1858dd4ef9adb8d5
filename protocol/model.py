"""Model spec → the identical backbone + LoRA + head on both parties.

A :class:`FairsplitModel` is a frozen pretrained backbone wrapped by peft with a task LoRA
adapter, followed by a linear classification head on the pooled representation:

* timm vision transformers: pooled features from ``forward_features`` + ``forward_head(pre_logits)``
  (the CLS token for DeiT/ViT), shape (B, D);
* Hugging Face text encoders: attention-masked mean pooling of the last hidden state, (B, D)
  (as sentence-transformers does for all-MiniLM-L6-v2).

Only the LoRA matrices and the head are trainable. :func:`adapter_state` returns the adapter with
peft's ``get_peft_model_state_dict`` keys; that is what travels between the parties.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ExperimentConfig, LoRAConfig, ModelSpec

__all__ = [
    "FairsplitModel",
    "ModelError",
    "adapter_parameters",
    "adapter_state",
    "lora_modules",
    "subtract_weight_update",
    "update_spec",
    "build_model",
    "backbone_blocks",
    "default_target_modules",
    "load_adapter_state",
    "resolve_image_size",
]

log = logging.getLogger(__name__)

#: timm ViT LoRA targets: attention qkv/proj and MLP fc1/fc2 of every block (not patch_embed.proj).
TIMM_VIT_TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
#: BERT-family LoRA targets (LoRA paper's choice of W_q and W_v).
HF_TEXT_TARGETS = ["query", "value"]


class ModelError(ValueError):
    """The model spec cannot be built (bad weights file, key mismatch, unknown name)."""


def default_target_modules(spec: ModelSpec) -> str | list[str]:
    """Default LoRA target modules for a backbone kind (timm ViT regex, or BERT query/value)."""
    return TIMM_VIT_TARGETS if spec.kind == "timm" else list(HF_TEXT_TARGETS)


def _resolve_hf_path(spec: ModelSpec) -> str:
    w = spec.weights
    if w is None:
        return spec.name  # hub id or path; offline environments need a local folder
    if w.startswith("package:"):
        mod = importlib.import_module(w.split(":", 1)[1])
        return str(mod.get_model_path())
    return w


def _load_state_file(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
        return sd.get("model", sd.get("state_dict", sd))
    except Exception as err:  # corrupt file: name it
        raise ModelError(f"cannot read weights file {p}: {err}") from None


def _build_timm(spec: ModelSpec) -> tuple[nn.Module, int, dict[str, Any]]:
    import timm

    kwargs = dict(spec.overrides)
    hub = spec.pretrained and not spec.weights  # the name's pretrained weights, from the HF cache
    if hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    try:
        model = timm.create_model(spec.name, pretrained=hub, **kwargs)
    except Exception as err:
        if hub:
            raise ModelError(
                f"timm cannot load the pretrained weights of {spec.name!r} from the Hugging Face "
                f"cache (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}, cache "
                f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}): {type(err).__name__}: {err}. "
                "Download them once with HF_HUB_OFFLINE=0, or give [experiment.model] weights = "
                "a local file, or pretrained = false") from None
        raise ModelError(f"timm cannot create {spec.name!r} with {kwargs}: {err}") from None
    if hub:
        log.info("loaded the pretrained weights of %s from the Hugging Face cache", spec.name)
    if spec.pretrained and spec.weights:
        sd = _load_state_file(spec.weights)
        result = model.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ModelError(
                f"weights {spec.weights} do not match {spec.name}: missing {result.missing_keys[:5]}"
                f" ({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]}"
                f" ({len(result.unexpected_keys)})"
            )
        log.info("loaded %d tensors from %s (strict)", len(sd), spec.weights)
    model.reset_classifier(0)
    data_cfg = timm.data.resolve_model_data_config(model)
    # The size the backbone was built for: an ``img_size`` override is not reflected in timm's
    # (pretrained) data config.
    native = int(kwargs.get("img_size", data_cfg["input_size"][-1]))
    size = spec.img_size or native
    if size != native:
        if not hasattr(model, "set_input_size"):
            raise ModelError(f"{spec.name} cannot change input size to {size}")
        model.set_input_size(img_size=size)  # interpolates absolute positional embeddings
    info = {"img_size": size, "mean": tuple(data_cfg["mean"]), "std": tuple(data_cfg["std"])}
    return model, int(model.num_features), info


def _build_hf(spec: ModelSpec) -> tuple[nn.Module, int, dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = _resolve_hf_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if spec.pretrained and not spec.overrides:
            model = AutoModel.from_pretrained(path)
        else:
            cfg = AutoConfig.from_pretrained(path)
            for k, v in spec.overrides.items():
                if not hasattr(cfg, k):
                    raise ModelError(f"HF config of {spec.name} has no attribute {k!r}")
                setattr(cfg, k, v)
            model = AutoModel.from_config(cfg)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load text model from {path!r}: {err}") from None
    return model, int(model.config.hidden_size), {"tokenizer": tok, "max_length": spec.max_length}


def resolve_image_size(spec: ModelSpec) -> int | None:
    """Input size in pixels for image backbones (config, else the timm default); None for text."""
    if spec.kind != "timm":
        return None
    if spec.img_size:
        return spec.img_size
    if "img_size" in spec.overrides:
        return int(spec.overrides["img_size"])
    import timm

    cfg = timm.get_pretrained_cfg(spec.name)
    return int(cfg.input_size[-1]) if cfg is not None else 224


def _lora_config(lora: LoRAConfig, spec: ModelSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules or default_target_modules(spec),
        bias="none",
    )


def _additive_mask(padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, L, L) additive attention mask of a (B, L) padding mask: 0 at real tokens,
    ``dtype``'s minimum at padding. transformers takes a 4D mask as it is, but asks of a 2D one
    whether it is all ones, a data-dependent branch ``torch.func.vmap`` refuses (the auditor's
    per-example gradients through text would run one example at a time). Same attention."""
    keep = padding_mask[:, None, None, :].to(dtype)
    length = padding_mask.shape[-1]
    return ((1.0 - keep) * torch.finfo(dtype).min).expand(-1, 1, length, length)


class FairsplitModel(nn.Module):
    """Frozen backbone + peft LoRA adapter + linear head.

    ``features(batch)`` → (B, D) pooled representation; ``forward(batch)`` → (B, num_classes)
    logits. ``batch`` is what :meth:`prepare` returns: a float tensor (B, 3, H, W) for images, or
    a dict of token tensors (B, L) for text.
    """

    def __init__(self, spec: ModelSpec, backbone: nn.Module, feature_dim: int, info: dict[str, Any]):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, spec.num_classes)
        self.feature_dim = feature_dim
        self.info = info
        if spec.kind == "timm":
            self.register_buffer("_mean", torch.tensor(info["mean"]).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("_std", torch.tensor(info["std"]).view(1, 3, 1, 1), persistent=False)

    # -- inputs ---------------------------------------------------------------------------
    def prepare(self, inputs: np.ndarray | list[str], device: str | torch.device = "cpu") -> Any:
        """Turn raw inputs into a model batch.

        Images: ``uint8`` (B, H, W, 3) → float (B, 3, H, W), scaled to [0, 1] and normalised with
        the backbone's mean/std. Text: list of B strings → tokenizer dict (padded, truncated to
        ``max_length``).
        """
        if self.spec.kind == "timm":
            x = torch.as_tensor(np.ascontiguousarray(inputs)).to(device)
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"images must be (B, H, W, 3) uint8, got {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            return (x - self._mean) / self._std
        tok = self.info["tokenizer"](
            list(inputs), padding=True, truncation=True, max_length=self.info["max_length"],
            return_tensors="pt",
        )
        return {k: v.to(device) for k, v in tok.items()}

    # -- forward --------------------------------------------------------------------------
    def features(self, batch: Any) -> torch.Tensor:
        """Pooled representation, (B, D)."""
        if self.spec.kind == "timm":
            base = self.backbone
            feats = base.forward_features(batch)
            return base.forward_head(feats, pre_logits=True)
        dtype = next(self.backbone.parameters()).dtype
        out = self.backbone(**{**batch, "attention_mask": _additive_mask(batch["attention_mask"], dtype)})
        hidden = out.last_hidden_state  # (B, L, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def forward(self, batch: Any) -> torch.Tensor:
        """Logits, (B, num_classes)."""
        return self.head(self.features(batch))

    @torch.no_grad()
    def predict_features(self, inputs: np.ndarray | list[str], batch_size: int = 128,
                         device: str | torch.device = "cpu") -> torch.Tensor:
        """Pooled representation of each input, float32 (N, D) on the CPU, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            out = [self.features(self.prepare(inputs[i:i + batch_size], device)).float().cpu()
                   for i in range(0, len(inputs), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.head.in_features)

    @torch.no_grad()
    def predict_scores(self, inputs: np.ndarray | list[str], batch_size: int = 128,
                       device: str | torch.device = "cpu") -> np.ndarray:
        """Positive-class probability for each input, float64 (N,), in eval mode."""
        was_training = self.training
        self.eval()
        scores = []
        for i in range(0, len(inputs), batch_size):
            logits = self(self.prepare(inputs[i:i + batch_size], device))
            scores.append(torch.softmax(logits.float(), -1)[:, 1].cpu().numpy())
        self.train(was_training)
        return np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)


def backbone_blocks(spec: ModelSpec) -> tuple[str, int]:
    """``(prefix, depth)`` of the backbone's repeated blocks, built without weights (sizes only):
    ``("blocks", n)`` for timm ViTs, ``("encoder.layer", n)`` for BERT-style text models.

    Raises:
        ModelError: the backbone cannot be built or has no such block list.
    """
    bare = spec.model_copy(update={"pretrained": False})
    with torch.random.fork_rng():
        backbone = (_build_timm(bare) if spec.kind == "timm" else _build_hf(bare))[0]
    for prefix in ("blocks", "encoder.layer", "layers", "transformer.h"):
        mod = backbone
        for part in prefix.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > 0:
            return prefix, len(mod)
    raise ModelError(f"{spec.name}: no block list (blocks / encoder.layer) for LoRA placement")


def build_model(exp: ExperimentConfig, seed: int | None = None) -> FairsplitModel:
    """Build backbone + LoRA + head from the experiment's model spec.

    The backbone (when randomly initialised), the LoRA ``A`` matrices and the head are initialised
    from ``seed`` (default ``exp.seed``), so both parties build bit-identical models. Backbone
    parameters are frozen.

    Raises:
        ModelError: unknown backbone, unreadable weights, or weights whose keys do not match.
    """
    from peft import get_peft_model

    spec = exp.model
    # Seed before building: a randomly initialised backbone must be identical on both parties.
    torch.manual_seed(exp.seed if seed is None else seed)
    backbone, dim, info = _build_timm(spec) if spec.kind == "timm" else _build_hf(spec)
    torch.manual_seed((exp.seed if seed is None else seed) + 1)
    try:
        peft_model = get_peft_model(backbone, _lora_config(exp.lora, spec))
    except ValueError as err:
        raise ModelError(f"LoRA targets {exp.lora.target_modules!r} invalid for {spec.name}: {err}") from None
    model = FairsplitModel(spec, peft_model, dim, info)
    for name, p in model.named_parameters():
        p.requires_grad = ("lora_" in name) or name.startswith("head.")
    return model


def adapter_state(model: FairsplitModel) -> dict[str, torch.Tensor]:
    """The LoRA adapter (peft ``get_peft_model_state_dict`` keys), detached CPU tensors."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model.backbone)
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def load_adapter_state(model: FairsplitModel, state: dict[str, torch.Tensor]) -> None:
    """Load an adapter produced by :func:`adapter_state` (keys/shapes must already be checked).

    Raises:
        ModelError: peft reports unexpected keys.
    """
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(model.backbone, state)
    unexpected = getattr(res, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter has unexpected keys: {unexpected[:5]}")


def adapter_parameters(model: FairsplitModel) -> dict[str, nn.Parameter]:
    """The adapter's trainable parameters, keyed like :func:`adapter_state` (peft keys).

    Raises:
        ModelError: the parameter names do not map one-to-one onto the adapter's keys.
    """
    params = {}
    for name, p in model.backbone.named_parameters():
        if "lora_" in name:
            params[name.replace(".default", "")] = p
    if set(params) != set(adapter_state(model)):
        raise ModelError("adapter parameters do not match the peft state-dict keys")
    return params


def lora_modules(model: FairsplitModel) -> dict[str, nn.Module]:
    """The LoRA-wrapped modules (peft ``LoraLayer``), keyed by module name (no adapter suffix)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.backbone.named_modules() if isinstance(m, LoraLayer)}


def update_spec(model: FairsplitModel) -> dict[str, "TensorSpec"]:
    """Contract of an unlearning update: one dense ΔW (d_out, d_in) per LoRA target module."""
    return {name: TensorSpec(tuple(m.get_base_layer().weight.shape),
                             str(m.get_base_layer().weight.dtype).removeprefix("torch."))
            for name, m in lora_modules(model).items()}


def subtract_weight_update(model: FairsplitModel, update: dict[str, torch.Tensor], lam: float) -> None:
    """Task-arithmetic negation in place: W ← W − λ·ΔW for each LoRA target module's base weight.

    Both parties apply it for ``unlearning`` (the developer to train, the auditor to evaluate
    the same model). ``update`` maps module names (see :func:`lora_modules`) to ΔW (d_out, d_in).

    Raises:
        KeyError: a module of the update is not a LoRA target of this model.
    """
    modules = lora_modules(model)
    with torch.no_grad():
        for name, delta in update.items():
            weight = modules[name].get_base_layer().weight
            weight.sub_(lam * delta.to(weight))


def head_state(model: FairsplitModel) -> dict[str, torch.Tensor]:
    """The classification head, ``{"weight": (C, D), "bias": (C,)}``."""
    return {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one tensor in a payload."""

    shape: tuple[int, ...]
    dtype: str


def state_spec(state: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """Key → (shape, dtype) of a state dict, the contract the codec checks against."""
    return {k: TensorSpec(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
