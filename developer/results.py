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

from fairsplit.protocol.fileio import append_line, atomic_write_bytes

__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointUnreadable",
    "CheckpointWriteError",
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


class CheckpointUnreadable(ValueError):
    """The checkpoint to resume from is truncated, corrupt or cannot be read; the message names
    the file, what is wrong and what to do."""


class CheckpointWriteError(OSError):
    """Writing the checkpoint failed (a full disk, a quota, an I/O error); the previous
    checkpoint, if any, is intact. ``errno`` is the failed call's."""


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
    fsynced and moved over the previous one with one ``os.replace``: after a crash or a failed
    write the folder holds either the previous checkpoint or the new one, and no temp file is
    left by a failed write. Returns the file's path.

    Raises:
        CheckpointWriteError: the file could not be written (e.g. ``ENOSPC``, no space left);
            the message names it and says that the previous checkpoint is intact.
    """
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    path = Path(folder) / CHECKPOINT_FILE
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as err:
        kept = (f"the previous checkpoint in that file is intact (round {checkpoint.get('round', '?')}'s "
                "was not saved), so --resume continues from it"
                if path.is_file() else "no earlier checkpoint exists there")
        wrapped = CheckpointWriteError(
            f"could not write the checkpoint {path} ({len(buf.getbuffer())} bytes): {err}; "
            f"{kept}. Free space or fix the folder, then run again with --resume")
        wrapped.errno = err.errno
        raise wrapped from err
    return path


def load_checkpoint(folder: Path) -> dict | None:
    """Read ``folder/checkpoint.pt`` (tensors and plain values only: ``weights_only=True``).

    Returns None when there is no checkpoint.

    Raises:
        CheckpointUnreadable: the file exists but cannot be read, is truncated or corrupt, or
            holds something other than a checkpoint (never the case for one written by
            :func:`save_checkpoint`); the message names the file and what to do.
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return None
    advice = ("start the run without --resume (it begins afresh and overwrites the checkpoint), "
              "or restore the file from a backup, or use another output folder")
    try:
        size = path.stat().st_size
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointUnreadable(
            f"cannot read the checkpoint {path}: {err.strerror or err}; {advice}") from err
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        detail = str(err).strip().split(". ")[0].splitlines()[0][:160] if str(err).strip() else ""
        first = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        what = "empty" if size == 0 else f"truncated or corrupt ({size} bytes)"
        raise CheckpointUnreadable(
            f"the checkpoint {path} is {what} and cannot be resumed from ({first}); {advice}") from err
    if not isinstance(ckpt, dict):
        raise CheckpointUnreadable(
            f"{path} holds a {type(ckpt).__name__}, not a fairsplit checkpoint; {advice}")
    return ckpt


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
