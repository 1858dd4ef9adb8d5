"""``fairsplit tune``: FairTune over the split, an Optuna study whose trials are real runs.

FairTune (Dutt et al., ICLR 2024, arXiv 2310.05055) chooses which PEFT parameters to fine-tune,
and the learning rate, by validation fairness. Here the outer loop is an Optuna study (TPE
sampler, RDB storage): each trial samples an experiment from the ``[tune]`` search space
(:mod:`protocol.tune`: LoRA placement per block or group of blocks, rank, lr, optionally the
method and λ), runs it against the auditor, and scores it on the auditor's validation report of
its last round. Every earlier validation report goes to Optuna as an intermediate value
(``trial.report``); when the pruner says so the run is stopped before its next round (the
developer loop's stop file), so pruned trials cost only the rounds they ran. Unlike FairTune's
code, which prunes only after training, unpromising trials end mid-run.

All trials run on one deployment: over Flower (:class:`deploy.launch.LocalDeployment`: one
SuperLink, one auditor SuperNode and executor, one developer executor; each trial a new Flower
run), or co-located (one in-process auditor host). The auditor answers each trial because its
``[tune]`` table admits it, counts it against ``max_runs``, and charges it to its privacy ledger.

Outputs in the study folder: ``study.db`` (Optuna's sqlite storage, resumable with
``--resume``), ``trials/<number>/`` (each run's outputs), ``trials.csv``, ``best.toml`` (the
chosen trial as a run file for ``fairsplit run``), ``summary.json`` and ``plots/``
(``optimization_history.png``, ``param_importances.png``, ``accuracy_vs_gap.png``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import optuna
import tomli_w

from fairsplit.developer.loop import STOP_FILE
from fairsplit.deploy.config import RunFile
from fairsplit.developer.config import DeveloperFile
from fairsplit.protocol.config import ExperimentConfig, experiment_fingerprint
from fairsplit.protocol.trials import mask_groups, trial_experiment
from fairsplit.protocol.tune import TuneConfig, has_lam

__all__ = ["STUDY_NAME", "best_trial", "run_study", "sample_experiment"]

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours (log_line)

STUDY_NAME = "fairsplit"
#: Validation metrics kept per trial (user attributes ``val_<key>`` / ``test_<key>``).
KEPT = ("accuracy", "worst_group_accuracy", "demographic_parity_difference",
        "equalized_odds_difference", "equal_opportunity_difference")


def sample_experiment(trial, base: ExperimentConfig, tune: TuneConfig) -> ExperimentConfig:
    """The trial's experiment: Optuna suggestions for every free key of the search space.

    Parameters (Optuna names): ``g<k>.<module>`` (bool: LoRA on that module in block group k),
    ``r``, ``lr`` (log), ``method``, ``lam`` (log, only for methods with λ). Keys the space
    fixes (one-element lists) are not parameters.

    Raises:
        optuna.TrialPruned: the placement selects no module (nothing to fine-tune but the head).
    """
    space = tune.space
    groups = mask_groups(base.model, space)
    mask = {(g, m): trial.suggest_categorical(f"g{g}.{m}", [True, False])
            for g in range(len(groups)) for m in space.modules}
    if not any(mask.values()):
        raise optuna.TrialPruned("the placement selects no module")
    r = trial.suggest_categorical("r", space.r) if len(space.r) > 1 else space.r[0]
    lo, hi = (space.lr[0], space.lr[-1])
    lr = trial.suggest_float("lr", lo, hi, log=True) if hi > lo else lo
    method = trial.suggest_categorical("method", space.methods) if len(space.methods) > 1 else space.methods[0]
    lam = None
    if has_lam(method):
        lo, hi = space.lam[0], space.lam[-1]
        lam = trial.suggest_float("lam", lo, hi, log=True) if hi > lo else lo
    trial.set_user_attr("groups", [[b[0], b[-1]] for b in groups])
    return trial_experiment(base, space, mask=mask, r=r, lr=lr, method=method, lam=lam,
                            name=f"{base.name} (trial {trial.number})")


def _baseline_params(base: ExperimentConfig, tune: TuneConfig) -> dict:
    """Parameters that reproduce the base's default placement (every module of every block),
    its rank and lr (clamped into the space), and its method when the space has it."""
    space = tune.space
    params: dict = {f"g{g}.{m}": True for g in range(len(mask_groups(base.model, space))) for m in space.modules}
    if len(space.r) > 1:
        params["r"] = base.lora.r if base.lora.r in space.r else min(space.r, key=lambda x: abs(x - base.lora.r))
    if space.lr[-1] > space.lr[0]:
        params["lr"] = min(max(base.lr, space.lr[0]), space.lr[-1])
    if len(space.methods) > 1 and base.method.name in space.methods:
        params["method"] = base.method.name
    method = params.get("method", space.methods[0])
    if has_lam(method) and space.lam[-1] > space.lam[0]:
        lam = getattr(base.method, "lam", None) if base.method.name == method else None
        params["lam"] = min(max(lam or math.sqrt(space.lam[0] * space.lam[-1]), space.lam[0]), space.lam[-1])
    return params


def _pruner(tune: TuneConfig, rounds: int):
    warm = max(1, tune.warmup_rounds)
    pruner = None
    if tune.pruner == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=warm, reduction_factor=3)
    elif tune.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=warm, max_resource=rounds, reduction_factor=3)
    elif tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=warm - 1)
    else:
        return optuna.pruners.NopPruner()
    # successive halving / Hyperband have no startup count: wrap them so the first trials finish
    return _AfterStartup(pruner, tune.pruner_startup_trials)


class _AfterStartup(optuna.pruners.BasePruner):
    """A pruner that defers to ``inner`` only once ``startup`` trials have finished."""

    def __init__(self, inner, startup: int):
        self.inner, self.startup = inner, startup

    def prune(self, study, trial) -> bool:
        done = [t for t in study.get_trials(deepcopy=False)
                if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        return len(done) >= self.startup and self.inner.prune(study, trial)


def _constraints(frozen) -> list[float]:
    return [float(frozen.user_attrs.get("constraint", 1.0))]


def best_trial(study, tune: TuneConfig):
    """The chosen trial: the best objective value among completed trials, and for
    ``constrained`` among the feasible ones (gap ≤ ``max_gap``); when none is feasible, the one
    that violates the bound least. None when no trial completed."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not done:
        return None
    sign = -1.0 if tune.direction() == "maximize" else 1.0
    if tune.objective == "constrained":
        feasible = [t for t in done if t.user_attrs.get("constraint", 1.0) <= 0]
        if not feasible:
            return min(done, key=lambda t: t.user_attrs.get("constraint", 1.0))
        done = feasible
    return min(done, key=lambda t: (sign * t.value, t.number))


Runner = Callable[[RunFile, Path, Callable[[dict], None]], dict]


def _record(trial, res: dict, exp: ExperimentConfig, tune: TuneConfig) -> None:
    rows = [r for r in res.get("per_round", []) if r.get("val")]
    last_val = rows[-1]["val"] if rows else {}
    for k in KEPT:
        trial.set_user_attr(f"val_{k}", last_val.get(k))
        trial.set_user_attr(f"test_{k}", (res.get("metrics") or {}).get(k))
    privacy = res.get("privacy") or {}
    trial.set_user_attr("epsilon_run", privacy.get("epsilon_run"))
    trial.set_user_attr("epsilon_total", privacy.get("epsilon_total"))
    trial.set_user_attr("stopped_after_round", res.get("stopped_after_round"))
    trial.set_user_attr("wall_time_s", res.get("wall_time_s"))
    trial.set_user_attr("target_modules", len(exp.lora.target_modules or []))
    trial.set_user_attr("experiment", json.loads(exp.model_dump_json()))
    trial.set_user_attr("fingerprint", experiment_fingerprint(exp))
    trial.set_user_attr("constraint", tune.violation(last_val) if last_val else 1.0)


def run_study(run: "RunFile | DeveloperFile", out: Path, runner: Runner, trials: int | None = None,
              resume: bool = False, objective: str | None = None, pruner: str | None = None,
              log_line: Callable[[str], None] = lambda s: None,
              enqueue: list[dict] | None = None) -> dict:
    """Run (or continue) the study of ``run``'s ``[tune]`` table; returns ``summary.json``'s dict.

    Args:
        run: a run file (or a developer file, for a remote auditor) with ``[tune]``; its
            ``[experiment]`` is the base of the space.
        out: the study folder.
        runner: ``(trial run file, run folder, on_round) -> results``: one run on the shared
            deployment (Flower or co-located).
        trials: total trials of the study (default ``[tune] trials``); with ``resume`` the
            trials already in ``out/study.db`` count.
        objective / pruner: override ``[tune]``'s.
        log_line: called with one line per finished trial.
        enqueue: parameter sets (Optuna names, see :func:`sample_experiment`) to try first,
            after the baseline; unnamed parameters are sampled.

    Raises:
        ValueError: no ``[tune]`` table; ``out`` already has a study and not ``resume``.
        deploy.flower.FlowerError / developer.loop.AuditorError: a run failed (the trial is
            stored as failed; ``--resume`` continues).
    """
    if run.tune is None:
        raise ValueError("the config has no [tune] table (the search space)")
    tune = run.tune
    if objective is not None:
        tune = tune.model_copy(update={"objective": objective})
    if pruner is not None:
        tune = tune.model_copy(update={"pruner": pruner})
    run = run.model_copy(update={"tune": tune})
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    db = out / "study.db"
    if db.exists() and not resume:
        raise ValueError(f"{db} already holds a study; continue it with --resume or choose another --out")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate, group
        sampler = optuna.samplers.TPESampler(
            seed=tune.sampler_seed, n_startup_trials=max(2, min(10, (trials or tune.trials) // 3)),
            multivariate=True, group=True,
            constraints_func=_constraints if tune.objective == "constrained" else None)
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{db}", load_if_exists=resume,
                                direction=tune.direction(), sampler=sampler,
                                pruner=_pruner(tune, run.experiment.rounds))
    study.set_user_attr("objective", tune.objective)
    study.set_user_attr("gap", tune.gap)
    study.set_user_attr("max_gap", tune.max_gap)
    total = trials or tune.trials
    for t in study.trials:  # a study interrupted mid-trial (killed): that trial failed
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    finished = [t for t in study.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    if tune.baseline and not any(t.user_attrs.get("baseline") for t in finished + waiting):
        study.enqueue_trial(_baseline_params(run.experiment, tune), user_attrs={"baseline": True})
    for params in enqueue or []:
        study.enqueue_trial(params)

    def objective_fn(trial) -> float:
        exp = sample_experiment(trial, run.experiment, tune)
        folder = out / "trials" / f"{trial.number:03d}"
        pruned: list[int] = []

        def on_round(row: dict) -> None:
            val = row.get("val")
            value = tune.intermediate(val) if val else None
            if value is None or pruned or row.get("round", 0) >= run.experiment.rounds:
                return
            trial.report(value, row["round"])
            if trial.should_prune():
                pruned.append(row["round"])
                (folder / STOP_FILE).touch()

        res = runner(run.model_copy(update={"experiment": exp}), folder, on_round)
        _record(trial, res, exp, tune)
        line = _trial_line(trial, res, tune)
        if res.get("stopped_after_round") is not None:
            log_line(line + " (pruned)")
            raise optuna.TrialPruned(f"pruned after round {res['stopped_after_round']}")
        value = tune.value(res["per_round"][-1]["val"])
        if value is None:
            raise RuntimeError(f"trial {trial.number}: the last validation report has no "
                               f"{tune.objective} value")
        log_line(line)
        return value

    remaining = max(0, total - len(finished))
    if remaining:
        study.optimize(objective_fn, n_trials=remaining, catch=())
    summary = write_outputs(study, run, out, tune)
    return summary


def _trial_line(trial, res: dict, tune: TuneConfig) -> str:
    attrs = trial.user_attrs
    def f(k):
        v = attrs.get(k)
        return "n/a" if v is None else f"{v:.3f}"
    return (f"trial {trial.number}: {attrs.get('target_modules')} LoRA modules, "
            f"r={attrs['experiment']['lora']['r']}, lr={attrs['experiment']['lr']:.2e}, "
            f"{attrs['experiment']['method']['name']}: val acc {f('val_accuracy')}, "
            f"WGA {f('val_worst_group_accuracy')}, {tune.gap} {f('val_' + tune.gap)}")


def write_outputs(study, run: RunFile, out: Path, tune: TuneConfig) -> dict:
    """``trials.csv``, ``best.toml``, ``summary.json`` and the plots; returns the summary."""
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    if "user_attrs_experiment" in df.columns:
        df = df.drop(columns=["user_attrs_experiment"])
    df.to_csv(out / "trials.csv", index=False)
    best = best_trial(study, tune)
    baseline = next((t for t in study.trials if t.user_attrs.get("baseline")
                     and t.state == optuna.trial.TrialState.COMPLETE), None)

    def brief(t):
        if t is None:
            return None
        keep = {k: v for k, v in t.user_attrs.items() if k != "experiment"}
        return {"number": t.number, "value": t.value, "params": t.params, **keep,
                "target_modules_list": t.user_attrs["experiment"]["lora"]["target_modules"]}

    states = [t.state.name for t in study.trials]
    summary = {"objective": tune.objective, "gap": tune.gap, "max_gap": tune.max_gap,
               "direction": tune.direction(), "trials": len(study.trials),
               "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
               "failed": states.count("FAIL"), "best": brief(best), "baseline": brief(baseline)}
    if best is not None:
        exp = ExperimentConfig.model_validate(best.user_attrs["experiment"])
        exp = exp.model_copy(update={"model": exp.model.model_copy(update={"weights": run.experiment.model.weights})})
        best_run = run.model_copy(update={"experiment": exp, "tune": None})
        data = best_run.model_dump(mode="json", exclude_none=True)
        (out / "best.toml").write_text(f"# fairsplit tune: trial {best.number} of {len(study.trials)}, "
                                       f"objective {tune.objective} = {best.value:.4f} (validation)\n"
                                       + tomli_w.dumps(data))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _plots(study, out / "plots", tune, best, baseline)
    return summary


def _plots(study, folder: Path, tune: TuneConfig, best, baseline) -> None:
    """Optuna's matplotlib plots (history, importances) and accuracy against the gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import warnings

    from optuna.visualization import matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        if done:
            ax = ovm.plot_optimization_history(study)
            ax.set_title(f"optimisation history ({tune.objective}, validation)")
            ax.figure.savefig(folder / "optimization_history.png", dpi=110, bbox_inches="tight")
            plt.close(ax.figure)
        if len(done) >= 2 and len({tuple(sorted(t.params.items())) for t in done}) >= 2:
            try:
                ax = ovm.plot_param_importances(study)
                ax.figure.savefig(folder / "param_importances.png", dpi=110, bbox_inches="tight")
                plt.close(ax.figure)
            except (ValueError, RuntimeError) as err:  # too few distinct trials
                log.warning("parameter importances not plotted: %s", err)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for state, marker in ((optuna.trial.TrialState.COMPLETE, "o"), (optuna.trial.TrialState.PRUNED, "x")):
        pts = [(t.user_attrs.get(f"val_{tune.gap}"), t.user_attrs.get("val_accuracy"))
               for t in study.trials if t.state == state]
        pts = [p for p in pts if None not in p]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=f"{state.name.lower()} ({len(pts)})", alpha=0.7)
    for t, label, colour in ((baseline, "default placement", "black"), (best, "chosen", "red")):
        if t is not None and t.user_attrs.get(f"val_{tune.gap}") is not None:
            ax.scatter([t.user_attrs[f"val_{tune.gap}"]], [t.user_attrs["val_accuracy"]], s=120,
                       facecolors="none", edgecolors=colour, linewidths=2, label=label)
    if tune.objective == "constrained":
        ax.axvline(tune.max_gap, color="grey", linestyle="--", label=f"{tune.gap} bound")
    ax.set_xlabel(f"{tune.gap} (validation, last report)")
    ax.set_ylabel("accuracy (validation, last report)")
    ax.set_title("trials: accuracy against the gap")
    ax.legend(fontsize=7)
    fig.savefig(folder / "accuracy_vs_gap.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
