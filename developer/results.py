"""Atomic writing of a run's outputs: ``results.json``, ``metrics.jsonl``, the final adapter.

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

__all__ = ["atomic_write_bytes", "atomic_write_json", "append_jsonl", "save_final_model"]


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (NaN/inf written as null)."""
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n").encode())


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line and fsync (a line is either fully written or absent after a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_clean(obj)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def save_final_model(model, out_dir: Path) -> Path:
    """Save the adapter in peft's format plus ``head.safetensors`` into ``out_dir/model``.

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
