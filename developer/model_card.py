"""The model card (``model/README.md``) beside the saved peft adapter: a Hugging Face model card.

Written with ``huggingface_hub``'s :class:`ModelCard` / :class:`ModelCardData`: the YAML metadata
(``library_name: peft``, ``base_model``, tags, and a ``model-index`` whose results are the
auditor's test metrics) and a body a reviewer can read: what was trained and how, the privacy
the auditor's releases had, and the evaluation, overall and by sensitive group. Every number is
an aggregate the auditor released (under differential privacy, computed from noisy counts); the
developer holds no attribute, so it has nothing else to report.
"""

from __future__ import annotations

from pathlib import Path

from fairsplit.protocol.config import ExperimentConfig
from fairsplit.protocol.fileio import atomic_write_bytes
from fairsplit.protocol.metrics import METRIC_DEFINITIONS

__all__ = ["CARD_METRICS", "write_model_card"]

#: Headline metrics of the card (fairlearn's names), with :data:`METRIC_DEFINITIONS`' definitions.
CARD_METRICS = {k: METRIC_DEFINITIONS[k] for k in (
    "accuracy", "balanced_accuracy", "worst_group_accuracy", "demographic_parity_difference",
    "equalized_odds_difference", "equal_opportunity_difference")}


def _base_model(exp: ExperimentConfig) -> str:
    if exp.model.kind == "timm":
        try:
            import timm

            cfg = timm.models.get_pretrained_cfg(exp.model.name)
            if cfg is not None and cfg.hf_hub_id:
                return cfg.hf_hub_id
        except Exception:  # noqa: BLE001 - an unknown name: keep it as given
            pass
    return exp.model.name


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def write_model_card(folder: Path, exp: ExperimentConfig, results: dict) -> Path:
    """Write ``folder/README.md`` (replacing peft's template) for a finished run.

    Args:
        folder: the saved model folder (``out_dir/model``).
        exp: the run's experiment.
        results: the run's ``results.json`` dict (``metrics``: the auditor's test report).

    Returns the card's path. The file is replaced atomically.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics = results.get("metrics") or {}
    task = "image-classification" if exp.model.kind == "timm" else "text-classification"
    dataset = str(results.get("dataset", "unknown"))
    evals = [EvalResult(task_type=task, dataset_type=dataset, dataset_name=f"{dataset} (auditor's test part)",
                        dataset_split="auditor_test", metric_type=k, metric_name=k.replace("_", " "),
                        metric_value=round(float(metrics[k]), 6))
             for k in CARD_METRICS if metrics.get(k) is not None]
    base = _base_model(exp) if exp.model.pretrained else None  # a random init has no base model
    data = ModelCardData(library_name="peft", base_model=base, model_name=exp.name,
                         tags=["lora", "peft", "fairness", "fairsplit", exp.method.name],
                         eval_results=evals or None)
    privacy = results.get("privacy") or {}
    if privacy.get("dp"):
        priv = (f"Differentially private: this experiment's releases spent ε = {privacy['epsilon_run']:.2f} "
                f"(δ = {privacy['delta']:g}); the developer's ledger stood at ε = "
                f"{privacy['epsilon_total']:.2f} of its budget {privacy['epsilon_budget']:g}. Every "
                "rate below is computed from noisy counts.")
    else:
        priv = "Exact releases (the auditor ran without differential privacy)."
    lora = exp.lora
    targets = "the backbone's default" if lora.target_modules is None else (
        f"{len(lora.target_modules)} modules" if isinstance(lora.target_modules, list) else str(lora.target_modules))
    lines = [
        f"# {exp.name}", "",
        f"A LoRA adapter and a {exp.model.num_classes}-class linear head for `{exp.model.name}` "
        + (f"({'weights from the local file ' + Path(exp.model.weights).name if exp.model.weights else base}), "
           if exp.model.pretrained else "(randomly initialised), ") +
        "fine-tuned with fairsplit: the developer trained on its task data, which holds no "
        "sensitive attribute; a fairness auditor holding the attributes evaluated the model (and, "
        "for fairness methods, supplied the training signal) on its own data, releasing only "
        "aggregates.", "",
        "## Training", "",
        f"- method: `{exp.method.name}` (λ = {results.get('lam')})",
        f"- LoRA: r = {lora.r}, lora_alpha = {lora.lora_alpha}, dropout = {lora.lora_dropout}, on {targets}",
        f"- {exp.rounds} rounds × {exp.local_steps} steps × batch {exp.batch_size}, lr {exp.lr:g}, seed {exp.seed}",
        *([f"- FairNet: then {exp.method.cond_rounds} rounds of the conditional LoRA, gated by the "
           f"developer's attribute-free bias detector at τ = {(results.get('final') or {}).get('tau')} "
           "(chosen by the auditor on validation); `fairnet_cond_lora.safetensors` and "
           "`fairnet_detector.safetensors` beside the adapter, `protocol.conditional.GatedModel` "
           "applies them"] if hasattr(exp.method, "cond_rounds") else []),
        f"- experiment fingerprint: `{results.get('fingerprint', '')}`", "",
        "## Privacy", "", priv, "",
        "## Evaluation", "",
        f"On the auditor's held-out test part (n = {metrics.get('n', 'n/a')}); fairlearn's definitions, "
        "decision threshold " + f"{exp.threshold:g}.", "",
        "| metric | value | definition |", "| --- | ---: | --- |",
        *[f"| {k} | {_fmt(metrics.get(k))} | {d} |" for k, d in CARD_METRICS.items()], "",
        "### By sensitive group", "",
        *(["| group | n | accuracy | selection rate | TPR | FPR |", "| --- | ---: | ---: | ---: | ---: | ---: |",
           *[f"| {g} | {s.get('n')} | {_fmt(s.get('accuracy'))} | {_fmt(s.get('selection_rate'))} | "
             f"{_fmt(s.get('tpr'))} | {_fmt(s.get('fpr'))} |"
             for g, s in sorted((metrics.get("per_group") or {}).items())]]
          if metrics.get("per_group") else
          ["Not released: under the auditor's differential privacy the per-group table stays with the "
           "auditor; the aggregate metrics above are computed from its noisy counts."]), "",
        "## Use", "",
        "```python",
        "from peft import PeftModel",
        "from safetensors.torch import load_file",
        "model = PeftModel.from_pretrained(backbone, \"model\")  # the base model above",
        "head = load_file(\"model/head.safetensors\")          # weight (C, D), bias (C,)",
        "```", "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = Path(folder) / "README.md"
    atomic_write_bytes(path, str(card).encode("utf-8"))
    return path
