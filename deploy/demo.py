"""The embedded default experiment run by ``fairsplit demo`` (synthetic data, tiny ViT, no files)."""

from __future__ import annotations

from protocol.config import RunFile, parse_config

__all__ = ["DEMO_CONFIG", "demo_run_file"]

#: Synthetic images whose sensitive attribute (a colour tint) agrees with the label 85% of the
#: time, a 2-block ViT trained from scratch with LoRA r=4: the ERM baseline learns the shortcut
#: and shows a large demographic parity difference.
DEMO_CONFIG: dict = {
    "experiment": {
        "name": "demo-synthetic",
        "rounds": 4,
        "local_steps": 15,
        "batch_size": 32,
        "lr": 3e-3,
        "seed": 0,
        "model": {
            "kind": "timm",
            "name": "vit_tiny_patch16_224",
            "pretrained": False,
            "overrides": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2},
        },
        "lora": {"r": 4, "lora_alpha": 8.0},
        "partition": {"developer_train": 0.5, "auditor_train": 0.2, "auditor_val": 0.15,
                      "auditor_test": 0.15},
    },
    "developer": {"data": {"kind": "synthetic"}},
    "auditor": {"data": {"kind": "synthetic", "sensitive": True}},
}


def demo_run_file() -> RunFile:
    """The demo experiment as a validated :class:`protocol.config.RunFile`."""
    return parse_config(RunFile, DEMO_CONFIG, "<embedded demo>")
