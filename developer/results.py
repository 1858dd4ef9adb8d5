"""Atomic writing of a run's outputs: ``results.json``, ``metrics.jsonl``, the final adapter, the
developer's checkpoint.

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from protocol.fileio import append_line, atomic_write_bytes

__all__ = [
    "CHECKPOINT_FILE",
    "append_jsonl",
    "atomic_write_bytes",
    "atomic_write_json",
    "load_checkpoint",
    "save_checkpoint",
    "save_final_model",
    "write_jsonl",
]

#: The developer's checkpoint inside ``out_dir/checkpoint/``.
CHECKPOINT_FILE = "checkpoint.pt"


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (NaN/inf written as null)."""
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n").encode())


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line and fsync (a line is either fully written or absent after a crash)."""
    append_line(path, json.dumps(_clean(obj)))


def write_jsonl(path: Path, rows: list) -> None:
    """Replace ``path`` atomically with one JSON line per row (NaN/inf written as null)."""
    atomic_write_bytes(path, "".join(json.dumps(_clean(r)) + "\n" for r in rows).encode())


def save_checkpoint(folder: Path, checkpoint: dict) -> Path:
    """Write ``checkpoint`` as ``folder/checkpoint.pt`` (``torch.save``), atomically.

    The whole checkpoint is serialised in memory, written to a temp file in ``folder``,
    fsynced and moved over the previous one with one ``os.replace``: after a crash the folder
    holds either the previous checkpoint or the new one. Returns the file's path.
    """
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    path = Path(folder) / CHECKPOINT_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(folder: Path) -> dict | None:
    """Read ``folder/checkpoint.pt`` (tensors and plain values only: ``weights_only=True``).

    Returns None when there is no checkpoint. Raises whatever ``torch.load`` raises on an
    unreadable file (never the case for one written by :func:`save_checkpoint`).
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_final_model(model, out_dir: Path, extra: dict[str, dict] | None = None) -> Path:
    """Save the adapter in peft's format plus ``head.safetensors`` into ``out_dir/model``.

    ``extra``: more tensors to save beside them, file stem → state dict (FairNet's
    ``fairnet_cond_lora`` and ``fairnet_detector``, as ``<stem>.safetensors``).

    The folder is written under a temporary name and renamed into place. Returns its path.
    Load it back with ``peft.PeftModel.from_pretrained(backbone, out_dir / "model")`` and
    ``safetensors.torch.load_file(out_dir / "model" / "head.safetensors")``.
    """
    out_dir = Path(out_dir)
    final = out_dir / "model"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".model."))
    try:
        model.backbone.save_pretrained(str(tmp))
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
                  str(tmp / "head.safetensors"))
        for stem, state in (extra or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      str(tmp / f"{stem}.safetensors"))
        if final.exists():
            old = out_dir / f".model.old.{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
