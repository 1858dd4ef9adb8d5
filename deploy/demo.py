"""The embedded default experiment run by ``fairsplit demo`` (synthetic data, tiny ViT, no files)."""

from __future__ import annotations

from fairsplit.deploy.config import RunFile
from fairsplit.protocol.config import parse_config

__all__ = ["DEMO_CONFIG", "FIX_METHOD", "FIX_SETTINGS", "demo_run_file", "demo_runs", "side_by_side"]

#: The method the demo runs beside ERM: the one that cut the gaps most in "Fairness that works"
#: (docs/results.md, biased UTKFace: last-layer fairness fine-tuning, Mao et al. 2023).
FIX_METHOD = "last_layer"
#: The fix's settings beyond the library defaults: none. Under the auditor's DP (the default,
#: ε = 1 per run) last_layer refits the head by DP-SGD on the auditor's own labels
#: (``dp_refit = "sgd"``); on this demo it cut both gaps by 90 % or more at ε = 1 and raised
#: accuracy (docs/privacy.md, "A private last-layer refit"; bench/private_refit.py).
FIX_SETTINGS: dict = {}
#: The demo's comparison: fairlearn names, shown lower-is-better for the gaps.
COMPARED = ("accuracy", "demographic_parity_difference", "equalized_odds_difference", "worst_group_accuracy")

#: Synthetic images with a true but imperfect task feature (stripes, 80 % agreement with the
#: label) and a sensitive attribute s shown as a strong colour tint. In the developer's data the
#: tint agrees with the label 85 % of the time (a shortcut its collection happened to carry); in
#: the population the auditor holds, s and the label are independent (``spurious_correlation``
#: 0.5). A 2-block ViT trained from scratch with LoRA r=4 learns the shortcut: ERM's positive rate
#: follows s in the population (large demographic parity and equalized odds differences) and its
#: accuracy there suffers. Removing the shortcut from the head restores both (the setting of
#: last-layer retraining: Kirichenko et al., ICLR 2023; Mao et al. 2023).
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
    "auditor": {"data": {"kind": "synthetic", "sensitive": True, "spurious_correlation": 0.5}},
}


def demo_run_file() -> RunFile:
    """The demo experiment as a validated :class:`deploy.config.RunFile`."""
    return parse_config(RunFile, DEMO_CONFIG, "<embedded demo>")


def demo_runs() -> tuple[RunFile, RunFile]:
    """ERM and :data:`FIX_METHOD` on the embedded demo. Both files carry a ``[tune]`` table
    admitting exactly these two methods, so one auditor (one deployment) answers both runs."""
    from fairsplit.protocol.methods import method_spec
    from fairsplit.protocol.tune import TuneConfig

    base = demo_run_file()
    exp = base.experiment
    tune = TuneConfig.model_validate({"trials": 1, "space": {"r": [exp.lora.r], "lr": [exp.lr],
                                                             "methods": ["erm", FIX_METHOD],
                                                             "methods_config": {FIX_METHOD: FIX_SETTINGS}}})
    erm = base.model_copy(update={"tune": tune})
    fix = erm.model_copy(update={"experiment": exp.model_copy(update={
        "name": f"{exp.name} ({FIX_METHOD})",
        "method": method_spec(FIX_METHOD).config(name=FIX_METHOD, **FIX_SETTINGS)})})
    return erm, fix


def side_by_side(erm: dict, fix: dict) -> list[tuple[str, str, str, str]]:
    """``(metric, ERM, fix, change)`` rows of the two runs' test metrics; the change of a gap is
    its relative cut (negative: smaller gap), of accuracy metrics the difference in points."""
    rows = []
    for key in COMPARED:
        a, b = erm["metrics"].get(key), fix["metrics"].get(key)
        if a is None or b is None:
            rows.append((key, str(a), str(b), "n/a"))
            continue
        change = (f"{100 * (b - a) / a:+.0f} %" if key.endswith("difference") and a > 0
                  else f"{100 * (b - a):+.1f} points")
        rows.append((key, f"{a:.3f}", f"{b:.3f}", change))
    return rows
