"""A FairTune trial's experiment, and the auditor's check that an experiment is one of them.

The search space is the ``[tune]`` table (:mod:`protocol.tune`); this module turns a trial's
values into an experiment (:func:`trial_experiment`: LoRA placement over the backbone's blocks,
r, lr, method and λ, seed) and checks an incoming experiment against the space (:func:`admit`).
Placement needs the backbone's block layout (:func:`block_layout`, from :mod:`protocol.model`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .model import ModelError, backbone_blocks
from .tune import NotAdmitted, TuneSpace, has_lam

__all__ = ["admit", "block_layout", "mask_groups", "placement_names", "trial_experiment"]


# ------------------------------------------------------------------------------------------
# Placement: block layout of the backbone
# ------------------------------------------------------------------------------------------

_LAYOUTS: dict[str, tuple[str, int]] = {}


def block_layout(spec) -> tuple[str, int]:
    """``(prefix, depth)`` of the backbone's repeated blocks: module names are ``prefix.<i>.<m>``.

    timm ViTs: ``("blocks", len(blocks))``; BERT-style text models: ``("encoder.layer", n)``.
    Built once per spec without weights (sizes only).

    Raises:
        protocol.model.ModelError: the backbone has no recognisable block list.
    """
    key = spec.model_dump_json(exclude={"weights", "pretrained"})
    if key not in _LAYOUTS:
        prefix, depth = backbone_blocks(spec)
        if depth < 1:
            raise ModelError(f"{spec.name}: no repeated blocks found for LoRA placement")
        _LAYOUTS[key] = (prefix, depth)
    return _LAYOUTS[key]


def _groups(depth: int, n_groups: int | None) -> list[list[int]]:
    """Contiguous groups of block indices (``n_groups`` None: one per block)."""
    g = depth if n_groups is None else min(n_groups, depth)
    bounds = [round(i * depth / g) for i in range(g + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(g)]


def placement_names(spec, space: TuneSpace, mask: dict[tuple[int, str], bool]) -> list[str]:
    """LoRA target module names for a placement mask over (group index, module).

    Args:
        spec: the experiment's :class:`protocol.config.ModelSpec`.
        mask: ``{(group, module): on}`` for every group of ``space.block_groups`` and module.

    Raises:
        ValueError: the mask selects no module, or misses a (group, module) entry.
    """
    prefix, depth = block_layout(spec)
    names = []
    for g, blocks in enumerate(_groups(depth, space.block_groups)):
        for m in space.modules:
            if (g, m) not in mask:
                raise ValueError(f"placement mask lacks group {g}, module {m!r}")
            if mask[(g, m)]:
                names += [f"{prefix}.{i}.{m}" for i in blocks]
    if not names:
        raise ValueError("the placement selects no module for LoRA")
    return sorted(names, key=_name_order(prefix, space.modules))


def _name_order(prefix: str, modules: list[str]):
    def key(name: str):
        i, m = name[len(prefix) + 1:].split(".", 1)
        return int(i), modules.index(m) if m in modules else len(modules)
    return key


def mask_groups(spec, space: TuneSpace) -> list[list[int]]:
    """The block indices of each placement group."""
    return _groups(block_layout(spec)[1], space.block_groups)


def trial_experiment(base, space: TuneSpace, *, mask: dict[tuple[int, str], bool] | None = None,
                     r: int | None = None, lr: float | None = None, method: str | None = None,
                     lam: float | None = None, seed: int | None = None, name: str | None = None):
    """The base experiment with a trial's values set; None keeps the base's value.

    Returns a new :class:`protocol.config.ExperimentConfig` that :func:`admit` accepts.

    Raises:
        ValueError: a value outside the space (or an empty placement).
    """
    update: dict[str, Any] = {}
    lora_update: dict[str, Any] = {}
    if mask is not None:
        lora_update["target_modules"] = placement_names(base.model, space, mask)
    if r is not None:
        lora_update["r"] = int(r)
    if lora_update:
        update["lora"] = base.lora.model_copy(update=lora_update)
    if lr is not None:
        update["lr"] = float(lr)
    if method is not None:
        update["method"] = space.method_config(method, lam)
    if seed is not None:
        update["seed"] = int(seed)
    if name is not None:
        update["name"] = name
    exp = type(base).model_validate({**base.model_dump(), **{k: (v.model_dump() if isinstance(v, BaseModel) else v)
                                                             for k, v in update.items()}})
    admit(base, space, exp)
    return exp


def _in(v: float, rng: list[float]) -> bool:
    lo, hi = (rng[0], rng[0]) if len(rng) == 1 else rng
    return lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)


def admit(base, space: TuneSpace | None, exp) -> None:
    """Check that ``exp`` is the base experiment or one of the space's trials.

    Every key other than the tuned ones must equal the base's (``name`` is free; model weights
    are each party's own file and are not compared). The tuned keys: ``lora.target_modules``
    (None = the base's default placement, or module names ``prefix.<i>.<module>`` with
    ``module`` in ``space.modules``, whole groups at a time), ``lora.r`` in ``space.r``, ``lr``
    in ``space.lr``, the method in ``space.methods`` with exactly its ``methods_config`` keys and
    λ in ``space.lam``, ``seed`` in ``space.seeds``. Each may also keep the base's value.

    Raises:
        NotAdmitted: naming the first key that differs or falls outside the space.
    """
    a, b = exp.model_dump(mode="json"), base.model_dump(mode="json")
    for d in (a, b):
        d["model"].pop("weights", None)
        d.pop("name", None)
    tuned = {"lora", "lr", "method", "seed"} if space is not None else set()
    for key in sorted(set(a) | set(b)):
        if key not in tuned and a.get(key) != b.get(key):
            raise NotAdmitted(f"experiment.{key} differs from the auditor's experiment and is not "
                              "a key of its [tune] search space")
    if space is None:
        return
    la, lb = a["lora"], b["lora"]
    for key in sorted(set(la) | set(lb)):
        if key not in ("r", "target_modules") and la.get(key) != lb.get(key):
            raise NotAdmitted(f"experiment.lora.{key} differs from the auditor's experiment")
    if la["r"] != lb["r"] and la["r"] not in space.r:
        raise NotAdmitted(f"experiment.lora.r = {la['r']} is not in the search space {space.r}")
    if la["target_modules"] != lb["target_modules"]:
        _admit_placement(exp.model, space, la["target_modules"])
    if a["lr"] != b["lr"] and not _in(a["lr"], space.lr):
        raise NotAdmitted(f"experiment.lr = {a['lr']} is outside the search space {space.lr}")
    if a["seed"] != b["seed"] and a["seed"] not in space.seeds:
        raise NotAdmitted(f"experiment.seed = {a['seed']} is not in the search space's seeds {space.seeds}")
    if a["method"] != b["method"]:
        name = a["method"]["name"]
        if name not in space.methods:
            raise NotAdmitted(f"experiment.method.name = {name!r} is not in the search space {space.methods}")
        lam = a["method"].get("lam")
        expected = space.method_config(name, lam).model_dump(mode="json")
        if a["method"] != expected:
            raise NotAdmitted(f"experiment.method differs from [tune.space] method {name!r} in a key "
                              "other than lam")
        if has_lam(name) and not _in(float(lam), space.lam):
            raise NotAdmitted(f"experiment.method.lam = {lam} is outside the search space {space.lam}")


def _admit_placement(spec, space: TuneSpace, names) -> None:
    if not isinstance(names, list) or not names:
        raise NotAdmitted("experiment.lora.target_modules must list module names of the search space")
    prefix, depth = block_layout(spec)
    chosen: set[tuple[int, str]] = set()
    for n in names:
        head, _, rest = str(n).partition(f"{prefix}.")
        idx, _, module = rest.partition(".")
        if head or not idx.isdigit() or int(idx) >= depth or module not in space.modules:
            raise NotAdmitted(f"experiment.lora.target_modules entry {n!r} is not "
                              f"{prefix}.<block < {depth}>.<one of {space.modules}>")
        chosen.add((int(idx), module))
    for blocks in _groups(depth, space.block_groups):
        for m in space.modules:
            on = {(i, m) in chosen for i in blocks}
            if len(on) > 1:
                raise NotAdmitted(f"experiment.lora.target_modules places {m!r} on part of the block "
                                  f"group {blocks[0]}-{blocks[-1]} (the space masks whole groups)")
