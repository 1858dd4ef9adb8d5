"""Tensor contracts of the records that cross, and their byte limits: the unlearning update's
contract from the adapter's (:func:`update_spec_from_adapter`), a head's from the head itself
(:func:`head_spec_from_state`), the refit basis's from the head's (:func:`refit_basis_spec`), the most bytes an array record may hold
(:func:`array_record_limit`), and what a record holds (:func:`record_nbytes`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from .codec import MAX_NPY_HEADER_BYTES, PayloadError
from .model import TensorSpec, state_spec

__all__ = ["array_record_limit", "head_spec_from_state", "record_nbytes", "refit_basis_spec",
           "update_spec_from_adapter"]


def array_record_limit(spec: Mapping[str, TensorSpec]) -> int:
    """Most bytes an ``ArrayRecord`` matching ``spec`` may hold (array buffers, as Flower counts).

    Per array: the exact data bytes of its shape and dtype plus :data:`MAX_NPY_HEADER_BYTES`.

    Raises:
        PayloadError: a contract dtype that is not a NumPy dtype.
    """
    total = 0
    for k, s in spec.items():
        try:
            itemsize = np.dtype(s.dtype).itemsize
        except TypeError:
            raise PayloadError(f"contract of {k!r}: dtype {s.dtype!r} is not a NumPy dtype") from None
        total += math.prod(s.shape) * itemsize + MAX_NPY_HEADER_BYTES
    return total


def update_spec_from_adapter(adapter_spec: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """The unlearning-update contract implied by the adapter contract.

    For every LoRA module ``M`` with ``M.lora_A.weight`` (r, d_in) and ``M.lora_B.weight``
    (d_out, r) in the adapter, the update holds ``M``: (d_out, d_in) in the adapter's dtype. Equal
    to :func:`protocol.model.update_spec` when the base weights have the adapter's dtype.

    Raises:
        PayloadError: an adapter key that is not a LoRA ``A``/``B`` weight, a module with only
            one of the two, or shapes that do not compose.
    """
    parts: dict[str, dict[str, TensorSpec]] = {}
    for key, s in adapter_spec.items():
        for tag in ("lora_A", "lora_B"):
            suffix = f".{tag}.weight"
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[tag] = s
                break
        else:
            raise PayloadError(f"adapter key {key!r} is not a LoRA A/B weight; no update contract")
    out = {}
    for module, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise PayloadError(f"adapter module {module!r} lacks lora_A or lora_B; no update contract")
        a, b = ab["lora_A"], ab["lora_B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise PayloadError(f"adapter module {module!r}: A {a.shape} and B {b.shape} do not compose")
        out[module] = TensorSpec((b.shape[0], a.shape[1]), a.dtype)
    return out


def head_spec_from_state(head: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The contract of a head the sender holds: ``weight`` (C, D) and ``bias`` (C,), one dtype.

    Raises:
        PayloadError: other keys, non-tensors, or shapes/dtypes that are not a linear head's.
    """
    if set(head) != {"weight", "bias"}:
        raise PayloadError(f"head: keys {sorted(map(str, head))} differ from the declared ['bias', 'weight']")
    w, b = head["weight"], head["bias"]
    if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise PayloadError("head: weight and bias must be tensors")
    if w.ndim != 2 or tuple(b.shape) != (w.shape[0],) or w.dtype != b.dtype:
        raise PayloadError(f"head: weight {tuple(w.shape)} {w.dtype} and bias {tuple(b.shape)} {b.dtype} "
                           "are not a linear head's (C, D) and (C,) of one dtype")
    return state_spec(dict(head))


def refit_basis_spec(head_spec: Mapping[str, TensorSpec], k: int) -> dict[str, TensorSpec]:
    """The contract of the developer's refit basis (last_layer's head-refit request): ``basis``
    (D, min(k, D)) and ``mean`` (D,), float32, with D the head's feature dimension.

    Raises:
        PayloadError: a head contract that is not a linear head's, or k < 1.
    """
    w = head_spec.get("weight")
    if w is None or len(w.shape) != 2:
        raise PayloadError("refit basis: the head contract has no weight (C, D)")
    if k < 1:
        raise PayloadError(f"refit basis: dimension {k} < 1")
    d = int(w.shape[1])
    return {"basis": TensorSpec((d, min(int(k), d)), "float32"), "mean": TensorSpec((d,), "float32")}


def record_nbytes(record: Any) -> int:
    """Bytes of a record's values: array buffers; config keys and values (UTF-8, numbers 8).

    Unlike Flower's ``count_bytes`` it never raises (empty lists, odd values count 0 or their
    ``len``).
    """
    def value_bytes(v: Any) -> int:
        if isinstance(v, str):
            return len(v.encode("utf-8", "surrogatepass"))
        if isinstance(v, (bytes, bytearray)):
            return len(v)
        if isinstance(v, bool):
            return 1
        if isinstance(v, (int, float)):
            return 8
        if isinstance(v, (list, tuple)):
            return sum(value_bytes(x) for x in v)
        return 0

    if isinstance(record, ArrayRecord):
        return sum(len(a.data) if isinstance(getattr(a, "data", None), (bytes, bytearray)) else 0
                   for a in record.values())
    if isinstance(record, ConfigRecord):
        return sum(value_bytes(k) + value_bytes(v) for k, v in record.items())
    return 0
