"""Developer training throughput: fairsplit's trainer against a plain timm + peft loop.

    python bench/throughput.py [--config examples/utkface_erm.toml] [--steps 3] [--batch-size B]
                               [--img-size S] [--reps 10] [--threads 1] [--synthetic] [--json PATH]

Arm A is ``developer.trainer.DeveloperTrainer.train_round`` (ERM, no signal) for ``--steps``
optimizer steps. Arm B is the loop anyone would write with timm and peft alone:
``timm.create_model(name, num_classes=2, img_size=S)`` (weights from the same file), peft
``get_peft_model`` with the same LoRA config, the head unfrozen, the same AdamW param groups and
learning rates, and per step: uint8 batch → normalised float tensor, forward, cross-entropy,
backward, step, ``loss.item()``. Both arms get the same model architecture, LoRA config, batch
size, optimizer, data array, batch order (seeded permutation) and torch thread count, in one
process. After one warm-up round of each, repetitions are interleaved (A B, B A, A B, ...) so both
see the same machine load; each reports its median samples/s. One torch thread by default (as the
bench configs give each party): on a shared, loaded machine two OpenMP threads per process made
single repetitions swing tenfold, one thread kept them within a few per cent.

Data: the developer's training part of the config's UTKFace source (``../shared``) when present,
else synthetic images of the same size (printed). Weights: the config's file when present, else
random init for both arms (printed). Image models (``kind = "timm"``) only.

Last line: ``throughput_ratio=<median fairsplit samples/s / median plain samples/s>``; 1.0 means
no overhead, below 1 means fairsplit's trainer is slower.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import REPO, machine_info, print_table, write_json  # noqa: E402

DEFAULT_CONFIG = REPO / "examples" / "utkface_erm.toml"


class PlainLoop:
    """A plain timm + peft LoRA training loop (no fairsplit code in the training path)."""

    def __init__(self, exp, img_size: int, weights: str | None, data_inputs: np.ndarray, data_y: np.ndarray):
        import timm
        from peft import LoraConfig, get_peft_model

        spec, lora = exp.model, exp.lora
        kwargs = dict(spec.overrides)
        kwargs["img_size"] = img_size
        torch.manual_seed(exp.seed)
        if weights:
            model = timm.create_model(spec.name, pretrained=True, num_classes=spec.num_classes,
                                      pretrained_cfg_overlay={"file": weights}, **kwargs)
        else:
            model = timm.create_model(spec.name, pretrained=False, num_classes=spec.num_classes, **kwargs)
        cfg = timm.data.resolve_model_data_config(model)
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
        from fairsplit.protocol.model import default_target_modules  # the same target list, nothing else

        self.model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
            target_modules=lora.target_modules or default_target_modules(spec), bias="none"))
        head = list(self.model.get_base_model().get_classifier().parameters())
        for p in head:
            p.requires_grad = True
        lora_params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        self.optimizer = torch.optim.AdamW(
            [{"params": lora_params, "lr": exp.lr}, {"params": head, "lr": exp.head_lr or exp.lr}],
            weight_decay=exp.weight_decay)
        self.inputs, self.y = data_inputs, data_y
        self.batch_size = min(exp.batch_size, len(data_y))
        self.rng = np.random.default_rng(exp.seed)
        self.order = np.zeros(0, dtype=np.int64)
        self.pos = 0

    def train(self, steps: int) -> float:
        """``steps`` optimizer steps; returns the mean loss."""
        self.model.train()
        total = 0.0
        for _ in range(steps):
            if self.pos + self.batch_size > len(self.order):
                self.order = self.rng.permutation(len(self.y))
                self.pos = 0
            idx = self.order[self.pos:self.pos + self.batch_size]
            self.pos += self.batch_size
            x = torch.as_tensor(self.inputs[idx]).permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - self.mean) / self.std
            y = torch.as_tensor(self.y[idx])
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item()
        return total / steps


def _data(run, exp, img_size: int, force_synthetic: bool, min_n: int):
    """(Dataset, description): the developer's UTKFace part, else synthetic images."""
    from fairsplit.protocol.config import SyntheticData, UTKFaceData
    from fairsplit.protocol.data import load_split, make_synthetic

    src = run.developer.data
    reason = "--synthetic given"
    if not force_synthetic:
        if isinstance(src, UTKFaceData) and Path(src.root).is_dir():
            cache = Path(run.developer.cache_dir) if run.developer.cache_dir else None
            ds = load_split(src, exp, "developer", img_size, cache)["developer_train"]
            return ds, f"UTKFace developer_train part, {len(ds)} images at {img_size} px ({src.root})"
        reason = (f"UTKFace folder {src.root} not found" if isinstance(src, UTKFaceData)
                  else f"developer data kind {src.kind!r} is not UTKFace")
    ds = make_synthetic(SyntheticData(kind="synthetic", n=max(min_n, 256), image_size=img_size), with_sensitive=False)
    ds.attr = None
    return ds, f"SYNTHETIC images ({len(ds)} at {img_size} px): {reason}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run file (model, LoRA, optimizer, data)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per repetition")
    ap.add_argument("--batch-size", type=int, help="default: the config's batch_size")
    ap.add_argument("--img-size", type=int, help="default: the config's model image size")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per arm (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both arms (default 1; 0 = torch's default)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic images even if UTKFace is present")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.reps < 1:
        ap.error("--steps and --reps must be >= 1")

    from fairsplit.developer.trainer import DeveloperTrainer
    from fairsplit.deploy.config import load_run_file
    from fairsplit.protocol.model import resolve_image_size

    run = load_run_file(args.config)
    exp = run.experiment
    if exp.model.kind != "timm":
        ap.error("throughput is measured for image models (model.kind = 'timm') only")
    img_size = args.img_size or resolve_image_size(exp.model)
    batch = args.batch_size or exp.batch_size
    weights = exp.model.weights if exp.model.pretrained and exp.model.weights else None
    weights_note = f"weights {weights}"
    if weights and not Path(weights).is_file():
        weights_note = f"RANDOM init (weights file {weights} not found)"
        weights = None
    elif not weights:
        weights_note = "random init (no weights in the config)"
    spec = exp.model.model_copy(update={"img_size": img_size, "pretrained": weights is not None})
    exp = exp.model_copy(update={"model": spec, "batch_size": batch, "local_steps": args.steps,
                                 "method": exp.method.model_copy(update={"name": "erm"})})
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    data, data_note = _data(run, exp, img_size, args.synthetic, batch * args.steps)
    dev_cfg = run.developer.model_copy(update={"num_threads": threads, "device": "cpu"})
    fairsplit = DeveloperTrainer(exp, dev_cfg, data=data)
    plain = PlainLoop(exp, img_size, weights, data.inputs, data.y)
    n_lora = sum(p.numel() for n, p in fairsplit.model.named_parameters() if p.requires_grad)
    n_plain = sum(p.numel() for p in plain.model.parameters() if p.requires_grad)
    if n_lora != n_plain:
        raise SystemExit(f"arms differ: {n_lora} vs {n_plain} trainable parameters")

    samples = args.steps * min(batch, len(data))

    def time_a() -> float:
        t = time.perf_counter()
        fairsplit.train_round()
        return samples / (time.perf_counter() - t)

    def time_b() -> float:
        t = time.perf_counter()
        plain.train(args.steps)
        return samples / (time.perf_counter() - t)

    print(f"# {spec.name} at {img_size} px, LoRA r={exp.lora.r} alpha={exp.lora.lora_alpha}, "
          f"{n_lora:,} trainable parameters (LoRA + head), batch {batch}, {args.steps} steps per rep, "
          f"{args.reps} reps, {threads} torch threads")
    print(f"# data: {data_note}")
    print(f"# {weights_note}")
    t0 = time.perf_counter()
    time_a(), time_b()  # warm-up (allocator, kernels, optimizer state)
    rows = []
    for i in range(args.reps):
        if i % 2 == 0:
            a, b = time_a(), time_b()
        else:
            b, a = time_b(), time_a()
        rows.append({"rep": i + 1, "order": "A B" if i % 2 == 0 else "B A",
                     "fairsplit": a, "plain": b, "ratio": a / b})
    med_a = statistics.median(r["fairsplit"] for r in rows)
    med_b = statistics.median(r["plain"] for r in rows)
    ratio = med_a / med_b
    paired = statistics.median(r["ratio"] for r in rows)
    print_table(rows + [{"rep": "median", "fairsplit": med_a, "plain": med_b, "ratio": ratio}],
                [("rep", "rep"), ("order", "order"), ("fairsplit", "fairsplit samples/s (A)"),
                 ("plain", "plain timm+peft samples/s (B)"), ("ratio", "A / B")])
    print(f"median fairsplit {med_a:.2f} samples/s, median plain {med_b:.2f} samples/s, ratio of medians "
          f"{ratio:.4f}, median of paired ratios {paired:.4f} ({time.perf_counter() - t0:.1f} s incl. warm-up)")
    if args.json:
        write_json(args.json, {
            "command": "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "config": str(args.config), "model": spec.name, "img_size": img_size, "batch_size": batch,
            "steps": args.steps, "reps": args.reps, "threads": threads, "lora_r": exp.lora.r,
            "trainable_params": n_lora, "data": data_note, "weights": weights_note,
            "machine": machine_info(), "reps_table": rows,
            "fairsplit_samples_per_s": med_a, "plain_samples_per_s": med_b,
            "median_paired_ratio": paired, "throughput_ratio": ratio,
        })
    print(f"throughput_ratio={ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
