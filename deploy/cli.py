"""The ``fairsplit`` command line.

    fairsplit demo                         # embedded default, both parties over Flower on loopback
    fairsplit run --config run.toml        # one experiment, both parties locally (Flower)
    fairsplit run --config run.toml --colocated   # same, one process, no Flower (reference)
    fairsplit report OUT [OUT2 ...] --out report.html   # HTML fairness report for a reviewer
    fairsplit certs --out certs             # CA + SuperLink certificate + auditor's key pair
    fairsplit tune --config run.toml --trials 20 --out study   # FairTune: Optuna over real runs
    fairsplit developer --config dev.toml --certs certs   # developer's machine (SuperLink + ServerApp)
    fairsplit auditor --config aud.toml --superlink HOST:PORT --root-certificates ca.pem \\
        --auth-key auditor_supernode        # the auditor's machine (SuperNode + vetted executor)
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fairsplit.deploy.config import RunFile, load_run_file
from fairsplit.developer.config import load_developer_file
from fairsplit.protocol.config import ConfigError
from fairsplit.protocol.methods import METHODS, total_rounds
from fairsplit.protocol.privacy import epsilon_meaning

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fair LoRA fine-tuning; sensitive attributes stay with the auditor.")
console = Console(stderr=True)

HEADLINE = ("accuracy", "auc", "demographic_parity_difference", "equalized_odds_difference",
            "worst_group_accuracy")


#: Libraries whose progress bars and warnings appear only with ``-v``.
QUIET_LIBRARIES = r"(transformers|timm|peft|torch|torchvision|huggingface_hub|flwr|optuna|sklearn|pathspec)(\.|$)"


def _setup_logging(verbose: bool) -> None:
    """Logging at INFO with ``-v``, else WARNING and quiet libraries: no weight-loading progress
    bars (``HF_HUB_DISABLE_PROGRESS_BARS``, which transformers follows too), transformers'
    advice at error level only, and no warnings raised from the libraries'
    modules (:data:`QUIET_LIBRARIES`). Set in the environment, so the Flower processes this
    command starts inherit it."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_LIBRARIES)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")


class RoundProgress:
    """A rich progress bar over rounds showing the latest validation metrics."""

    def __init__(self, rounds: int):
        self.progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[metrics]}"),
                                 console=console)
        self.task = self.progress.add_task("rounds", total=rounds, metrics="training…")

    def __enter__(self) -> "RoundProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, row: dict) -> None:
        """Callback for each ``metrics.jsonl`` row."""
        val = row.get("val") or {}
        if row.get("round", 0) < 1:  # round 0: the auditor's signal/update before training
            return
        loss = row.get("train_loss", row.get("contrastive_loss"))  # FairNet's conditional rounds
        parts = [] if loss is None else [f"loss {loss:.3f}"]
        for key, short in (("accuracy", "acc"), ("demographic_parity_difference", "DPD"),
                           ("equalized_odds_difference", "EOD")):
            if val.get(key) is not None:
                parts.append(f"{short} {val[key]:.3f}")
        self.progress.update(self.task, completed=row["round"], metrics=" · ".join(parts))


def _summary(results: dict, out: Path) -> None:
    table = Table(title=escape(f"{results['method']} on {results['dataset']} ({results['transport']}): test metrics"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in HEADLINE:
        v = results["metrics"].get(k)
        table.add_row(k, "n/a" if v is None else f"{v:.4f}")
    table.add_row("wall_time_s", f"{results['wall_time_s']:.1f}")
    table.add_row("bytes to / from auditor", f"{results['bytes_to_auditor']:,} / {results['bytes_from_auditor']:,}")
    privacy = results.get("privacy") or {}
    if privacy.get("dp"):
        table.add_row("ε this run / developer total (δ)",
                      f"{privacy['epsilon_run']:.2f} / {privacy['epsilon_total']:.2f} ({privacy['delta']:g})")
    elif privacy:
        table.add_row("ε", "not private (exact releases)")
    console.print(table)
    console.print(f"results: {out / 'results.json'}", markup=False)


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(str(err))}")  # the message literally: [bracketed] text stays
    raise typer.Exit(code=2)


def _execute(run: RunFile, out: Path, colocated: bool, insecure: bool = False,
             resume: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if insecure and not colocated:
        console.print(INSECURE_WARNING)
    with RoundProgress(total_rounds(run.experiment)) as bar:
        if colocated:
            from .colocated import run_colocated

            results = run_colocated(run, out, on_round=bar.update, resume=resume)
        else:
            from .launch import run_local

            results = run_local(run, out, on_round=bar.update, insecure=insecure, resume=resume)
    _summary(results, out)
    return results


@app.command()
def demo(out: Path = typer.Option(Path("fairsplit-demo"), help="output folder"),
         colocated: bool = typer.Option(False, help="one process, no Flower"),
         insecure: bool = typer.Option(False, "--insecure", help="no TLS / node authentication"),
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """The embedded default: synthetic data with a spurious sensitive feature, a tiny ViT; ERM
    and the fairness method side by side, over Flower, and an HTML report."""
    _setup_logging(verbose)
    from .demo import FIX_METHOD, demo_runs, side_by_side
    from .report import build_report

    erm, fix = demo_runs()
    console.print("[bold]fairsplit demo[/bold]: ERM, then " + FIX_METHOD + ", developer and auditor as "
                  "separate Flower processes" if not colocated else "[bold]fairsplit demo[/bold] (co-located)")
    try:
        out = out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        erm = erm.model_copy(update={"auditor": erm.auditor.model_copy(update={"state_dir": out / "auditor"})})
        fix = fix.model_copy(update={"auditor": erm.auditor})
        if insecure and not colocated:
            console.print(INSECURE_WARNING)
        results = []
        if colocated:
            from fairsplit.auditor.host import AuditorHost

            from .colocated import run_colocated

            host = AuditorHost(erm.experiment, erm.auditor, erm.tune)
            host.check()
            for run, name in ((erm, "erm"), (fix, FIX_METHOD)):
                with RoundProgress(total_rounds(run.experiment)) as bar:
                    results.append(run_colocated(run, out / name, on_round=bar.update, host=host))
        else:
            from .launch import LocalDeployment

            with LocalDeployment(erm, out, insecure=insecure) as deployment:
                for run, name in ((erm, "erm"), (fix, FIX_METHOD)):
                    with RoundProgress(total_rounds(run.experiment)) as bar:
                        results.append(deployment.run(run, out / name, on_round=bar.update))
        table = Table(title=escape(f"demo: ERM against {FIX_METHOD} (auditor's test part)"))
        for col, justify in (("metric", "left"), ("erm", "right"), (FIX_METHOD, "right"), ("change", "right")):
            table.add_column(col, justify=justify)
        for row in side_by_side(*results):
            table.add_row(*row)
        console.print(table)
        privacy = results[1].get("privacy") or {}
        if privacy.get("dp"):
            console.print(f"privacy of each run: {epsilon_meaning(privacy['epsilon_run'], privacy['delta'])}.",
                          markup=False)
        report = build_report([out / "erm", out / FIX_METHOD], out / "report.html", out / "auditor" / "audit.jsonl")
        console.print(f"report: {report}; models (with model cards): {out / 'erm' / 'model'}, "
                      f"{out / FIX_METHOD / 'model'}", markup=False)
    except Exception as err:  # noqa: BLE001 - shown to the user, exit code 2
        _fail(err)


@app.command("run")
def run_cmd(config: Path = typer.Option(..., "--config", "-c", help="run TOML with [experiment], [developer], [auditor]"),
            out: Path = typer.Option(Path("fairsplit-out"), help="output folder"),
            colocated: bool = typer.Option(False, help="one process, no Flower (reference runner)"),
            insecure: bool = typer.Option(False, "--insecure", help="no TLS / node authentication"),
            resume: bool = typer.Option(False, "--resume", help="continue from OUT's last checkpoint"),
            method: Optional[str] = typer.Option(
                None, help="run this method instead of [experiment.method], with its [bench.methods.<name>] "
                           "settings (e.g. a benchmark config's chosen method)"),
            lam: Optional[float] = typer.Option(None, help="λ for --method"),
            seed: Optional[int] = typer.Option(None, help="override [experiment] seed"),
            verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run one experiment with both parties on this machine (TLS + node auth unless --insecure)."""
    _setup_logging(verbose)
    try:
        run = load_run_file(config)
        if lam is not None and method is None:
            raise ValueError("--lam needs --method")
        if method is not None:
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
            run.experiment.method = run.bench.method_config(method, lam)
        if seed is not None:
            run.experiment.seed = seed
        _execute(run, out, colocated, insecure, resume)
    except ConfigError as err:
        _fail(err)
    except Exception as err:  # noqa: BLE001
        _fail(err)


INSECURE_WARNING = ("[yellow]warning:[/yellow] --insecure: no TLS and no SuperNode authentication; "
                    "payloads cross the network in the clear. Use only on a private test network.")


@app.command()
def certs(out: Path = typer.Option(..., "--out", help="folder for the keys and certificates (mode 0700)"),
          san: list[str] = typer.Option([], "--san", help="extra host name / IP the auditor dials "
                                                           "(repeatable; localhost and 127.0.0.1 are always in)"),
          only: str = typer.Option("all", "--only", help="all | superlink (developer's CA + server "
                                                          "certificate) | supernode (auditor's key pair)")) -> None:
    """Generate TLS credentials for the SuperLink and the auditor's SuperNode key pair."""
    from .certs import generate

    try:
        paths = generate(out, san, only)  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001
        _fail(err)
    for name, path in paths.items():
        console.print(f"{name:>14}: {path}", markup=False)
    if only in ("all", "supernode"):
        console.print("Give the developer only [bold]auditor_supernode.pub[/bold]; the private key "
                      "stays on the auditor's machine.")
    if only in ("all", "superlink"):
        console.print("Give the auditor only [bold]ca.pem[/bold]; ca.key and superlink.key stay "
                      "with the developer.")


@app.command("app-hash")
def app_hash() -> None:
    """Print the SHA-256 of the fairsplit Flower App bundle (to pin as approved_app_sha256)."""
    from fairsplit.auditor.executor import fab_sha256

    from .flower import APP_DIR

    print(fab_sha256(APP_DIR))


@app.command()
def tune(config: Path = typer.Option(..., "--config", "-c", help="run TOML with [experiment], [developer], "
                                     "[auditor] and [tune] (the search space); or a developer TOML with "
                                     "[tune], against a remote auditor (--certs, like `fairsplit developer`)"),
         trials: Optional[int] = typer.Option(None, "--trials", help="trials in the study (default: [tune] trials)"),
         out: Path = typer.Option(Path("fairsplit-tune"), "--out", help="study folder (study.db, trials/, "
                                  "trials.csv, best.toml, plots/)"),
         objective: Optional[str] = typer.Option(None, "--objective", help="worst_group_accuracy | gap | "
                                                 "constrained (default: [tune] objective)"),
         pruner: Optional[str] = typer.Option(None, "--pruner", help="successive_halving | hyperband | "
                                              "median | none (default: [tune] pruner)"),
         colocated: bool = typer.Option(False, help="both parties in this process, no Flower"),
         insecure: bool = typer.Option(False, "--insecure", help="no TLS / node authentication"),
         resume: bool = typer.Option(False, "--resume", help="continue the study in OUT"),
         host: str = typer.Option("127.0.0.1", help="remote auditor: SuperLink listen address"),
         port: int = typer.Option(9092, help="remote auditor: SuperLink port"),
         certs_dir: Optional[Path] = typer.Option(None, "--certs", help="remote auditor: the SuperLink's TLS folder"),
         auditor_key: Optional[Path] = typer.Option(None, "--auditor-key", help="remote auditor: its SuperNode "
                                                    "public key (default: CERTS/auditor_supernode.pub)"),
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """FairTune: choose LoRA placement, rank, lr (and method, λ) by the auditor's validation fairness.

    Every trial is a real run on one deployment (a new Flower run each; the SuperLink, the
    auditor's SuperNode and both executors stay up); unpromising trials are stopped mid-run.
    With a developer file (no [auditor] table) the trials go to a remote auditor, whose own file
    must hold the same [tune] table.
    """
    _setup_logging(verbose)
    import tomllib

    from .tune import run_study

    try:
        try:
            remote = "auditor" not in tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            remote = False  # load_run_file reports the problem
        run = load_developer_file(config) if remote else load_run_file(config)
        if run.tune is None:
            raise ValueError(f"{config} has no [tune] table; see the README's section on the search space")
        if objective is not None and objective not in ("worst_group_accuracy", "gap", "constrained"):
            raise ValueError(f"--objective must be worst_group_accuracy, gap or constrained, got {objective!r}")
        if pruner is not None and pruner not in ("successive_halving", "hyperband", "median", "none"):
            raise ValueError(f"--pruner must be successive_halving, hyperband, median or none, got {pruner!r}")
        out = out.resolve()
        if not remote and run.auditor.state_dir is None:  # one ledger and run count for the study
            run = run.model_copy(update={"auditor": run.auditor.model_copy(update={"state_dir": out / "auditor"})})
        say = lambda text: console.print(text, markup=False)  # noqa: E731
        if insecure and not colocated:
            console.print(INSECURE_WARNING)
        if remote:
            summary = _tune_remote(run, out, trials, resume, objective, pruner, say, host, port,
                                   certs_dir, auditor_key, insecure)
        elif colocated:
            from fairsplit.auditor.host import AuditorHost

            from .colocated import run_colocated

            host_ = AuditorHost(run.experiment, run.auditor, run.tune)
            summary = run_study(run, out, lambda r, folder, cb: run_colocated(r, folder, on_round=cb, host=host_),
                                trials, resume, objective, pruner, say)
        else:
            from .launch import LocalDeployment

            out.mkdir(parents=True, exist_ok=True)
            with LocalDeployment(run, out, insecure=insecure) as deployment:
                summary = run_study(run, out, lambda r, folder, cb: deployment.run(r, folder, on_round=cb),
                                    trials, resume, objective, pruner, say)
        _tune_summary(summary, out)
    except Exception as err:  # noqa: BLE001
        _fail(err)


def _developer_credentials(certs_dir: Path | None, auditor_key: Path | None, insecure: bool):
    """The SuperLink's TLS files and the auditor's public key (``(None, None)`` when insecure).

    Raises:
        ValueError: no ``--certs`` without ``--insecure``.
        FileNotFoundError: a TLS file or the auditor's key is missing.
    """
    from .flower import TLS

    if insecure:
        return None, None
    if certs_dir is None:
        raise ValueError("give --certs DIR (see `fairsplit certs`) or, for tests, --insecure")
    tls = TLS.from_dir(certs_dir)
    auditor_key = auditor_key or certs_dir / "auditor_supernode.pub"
    if not auditor_key.is_file():
        raise FileNotFoundError(f"the auditor's public key {auditor_key} does not exist")
    return tls, auditor_key


def _tune_remote(dev, out: Path, trials, resume, objective, pruner, say, host, port, certs_dir,
                 auditor_key, insecure) -> dict:
    """A study whose trials go to a remote auditor: the developer's side only (SuperLink +
    executor), as ``fairsplit developer``."""
    import tempfile

    from .flower import ProcessGroup
    from .launch import DeveloperSide, _dump_toml
    from .tune import run_study

    tls, auditor_key = _developer_credentials(certs_dir, auditor_key, insecure)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"SuperLink on {host}:{port}; waiting for the auditor's SuperNode…", markup=False)
    with ProcessGroup() as group, tempfile.TemporaryDirectory() as home:
        side = DeveloperSide(group, port, out / "logs", Path(home), host=host, tls=tls,
                             database=out / "superlink.db")
        if tls is not None:
            side.register(auditor_key)

        def runner(r, folder, cb):
            cfg = _dump_toml(r, Path(folder) / "parties" / "developer.toml")
            return side.run(cfg, folder, on_round=cb, node_timeout=600)

        return run_study(dev, out, runner, trials, resume, objective, pruner, say)


def _tune_summary(summary: dict, out: Path) -> None:
    table = Table(title=escape(f"FairTune study: {summary['trials']} trials ({summary['complete']} complete, "
                               f"{summary['pruned']} pruned), objective {summary['objective']}"))
    table.add_column("")
    for name in ("default placement", "chosen"):
        table.add_column(name, justify="right")
    rows = [("trial", "number", "{}"), ("LoRA modules", "target_modules", "{}"),
            ("val accuracy", "val_accuracy", "{:.4f}"), ("val worst-group accuracy", "val_worst_group_accuracy", "{:.4f}"),
            (f"val {summary['gap']}", f"val_{summary['gap']}", "{:.4f}"),
            ("test accuracy", "test_accuracy", "{:.4f}"), ("test worst-group accuracy", "test_worst_group_accuracy", "{:.4f}"),
            (f"test {summary['gap']}", f"test_{summary['gap']}", "{:.4f}")]
    for label, key, fmt in rows:
        cells = []
        for which in ("baseline", "best"):
            t = summary.get(which) or {}
            v = t.get(key)
            cells.append("n/a" if v is None else fmt.format(v))
        table.add_row(label, *cells)
    console.print(table)
    console.print(f"study: {out / 'study.db'}; best: {out / 'best.toml'}; plots: {out / 'plots'}", markup=False)


@app.command()
def developer(config: list[Path] = typer.Option(..., "--config", "-c", help="developer TOML ([experiment] + "
                                                "[developer]); repeat for several runs on one deployment"),
              out: Path = typer.Option(Path("fairsplit-out"), help="output folder"),
              host: str = typer.Option("127.0.0.1", help="SuperLink listen address (0.0.0.0 for other machines)"),
              port: int = typer.Option(9092, help="SuperLink port (Fleet, Control and Runtime APIs)"),
              certs_dir: Optional[Path] = typer.Option(None, "--certs", help="folder with ca.pem, "
                                                       "superlink.pem, superlink.key (fairsplit certs)"),
              auditor_key: Optional[Path] = typer.Option(None, "--auditor-key", help="the auditor's SuperNode "
                                                         "public key (default: CERTS/auditor_supernode.pub)"),
              insecure: bool = typer.Option(False, "--insecure", help="no TLS, no node authentication"),
              resume: bool = typer.Option(False, "--resume", help="continue from OUT's last checkpoint"),
              resend_after: float = typer.Option(120.0, "--resend-after", help="seconds without a reply "
                                                 "before a request is sent to the auditor again"),
              verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """The developer's machine: SuperLink + the training ServerApp; waits for the auditor.

    Several --config run one after another on the same SuperLink (each a new Flower run; the
    auditor keeps answering if its [tune] table admits them); outputs in OUT/<i>-<config stem>.
    """
    _setup_logging(verbose)
    from .launch import run_developer

    try:
        if insecure:
            console.print(INSECURE_WARNING)
        tls, auditor_key = _developer_credentials(certs_dir, auditor_key, insecure)
        files = [load_developer_file(c) for c in config]
        console.print(f"SuperLink on {host}:{port} ({'insecure' if insecure else 'TLS, node auth'}); "
                      "waiting for the auditor's SuperNode…", markup=False)
        bars: list[RoundProgress] = []

        def on_start(i: int, path: Path) -> None:
            if bars:
                bars[-1].__exit__(None, None, None)
            if len(config) > 1:
                console.print(f"run {i + 1} of {len(config)}: {path}", markup=False)
            bars.append(RoundProgress(total_rounds(files[i].experiment)).__enter__())

        try:
            results = run_developer(config, out, host=host, port=port, tls=tls,
                                    auditor_key=None if insecure else auditor_key, resume=resume,
                                    on_round=lambda row: bars[-1].update(row), resend_after=resend_after,
                                    on_start=on_start)
        finally:
            if bars:
                bars[-1].__exit__(None, None, None)
        for res in results if isinstance(results, list) else [results]:
            _summary(res, out)
    except Exception as err:  # noqa: BLE001
        _fail(err)


@app.command()
def auditor(config: Path = typer.Option(..., "--config", "-c", help="auditor TOML ([experiment] + [auditor])"),
            superlink: str = typer.Option("127.0.0.1:9092", help="the developer's SuperLink host:port"),
            root_certificates: Optional[Path] = typer.Option(None, "--root-certificates",
                                                             help="the developer's CA certificate (ca.pem)"),
            auth_key: Optional[Path] = typer.Option(None, "--auth-key", help="this SuperNode's private key "
                                                    "(auditor_supernode from `fairsplit certs --only supernode`)"),
            insecure: bool = typer.Option(False, "--insecure", help="no TLS, no node authentication"),
            logs: Path = typer.Option(Path("fairsplit-auditor-logs"), help="log folder"),
            refused_grace: float = typer.Option(90.0, "--refused-grace", help="seconds to keep "
                                                "dialling while the SuperLink refuses this key (not "
                                                "registered yet, or a killed SuperNode with it still "
                                                "online, up to 60 s) before giving up"),
            verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """The auditor's machine: a SuperNode that dials out, and the auditor's vetted executor.

    Answers until stopped (Ctrl-C). Runs only the app build the auditor approved. Stops with
    the cause (exit status 2) when the SuperNode cannot connect: a wrong CA, a bad key file, or
    a key the SuperLink still refuses after --refused-grace seconds; keeps dialling while the
    SuperLink is unreachable.
    """
    _setup_logging(verbose)
    from .launch import run_auditor

    try:
        if insecure:
            console.print(INSECURE_WARNING)
            root_certificates = auth_key = None
        else:
            missing = [n for n, v in (("--root-certificates", root_certificates), ("--auth-key", auth_key))
                       if v is None or not Path(v).is_file()]
            if missing:
                raise ValueError(f"TLS needs existing files for {', '.join(missing)} (or --insecure)")
        from fairsplit.auditor.config import load_auditor_file

        from .launch import auditor_state_dir

        state_dir = auditor_state_dir(load_auditor_file(config), superlink)
        console.print(f"auditor state (privacy ledger, run registry, answers): {state_dir}", markup=False)
        console.print(f"auditor SuperNode dialling {superlink}; Ctrl-C to stop", markup=False)
        run_auditor(config, superlink, logs, root_certificates, auth_key, refused_grace)
    except Exception as err:  # noqa: BLE001
        _fail(err)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(bench_app, name="bench")


def parse_lams(spec: str, methods: list[str]) -> dict[str, list[float]]:
    """Parse a λ grid: ``"0.1,1"`` for every method with a λ, or ``"m=0.1,1;m2=1"`` per method.

    Raises:
        ValueError: a value is not a number, or a method is not among ``methods``.
    """
    def values(text: str) -> list[float]:
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"λ values must be numbers, got {text!r}") from None

    if "=" not in spec:
        return {m: values(spec) for m in methods if "lam" in METHODS[m].config.model_fields}
    grid = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, vals = part.partition("=")
        if name.strip() not in methods:
            raise ValueError(f"--lams names {name.strip()!r}, which is not in --methods")
        grid[name.strip()] = values(vals)
    return grid


@bench_app.command("fairness")
def bench_fairness(config: Path = typer.Option(..., "--config", "-c", help="run TOML"),
                   methods: str = typer.Option(",".join(METHODS), help="comma-separated methods"),
                   seeds: int = typer.Option(3, help="seeds of each method at its chosen λ"),
                   lams: Optional[str] = typer.Option(
                       None, help="λ grid: '0.1,1' for every method with a λ, or per method "
                                  "'adversarial=0.1,1;entropy=0.1' (default: the method table's; "
                                  "with several values λ is chosen on validation, seed 0)"),
                   out: Path = typer.Option(Path("fairsplit-bench"), help="output folder"),
                   title: str = typer.Option("", help="table title"),
                   epsilon: Optional[str] = typer.Option(
                       None, help="override the auditor's privacy: a target ε per run (its budget "
                                  "raised to fit the study), or 'inf' for exact releases"),
                   verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Every method, λ chosen on validation, over seeds, co-located: table.md, summary.json, pareto.png."""
    _setup_logging(verbose)
    from .bench import run_fairness_bench, write_outputs

    try:
        run = load_run_file(config)
        if epsilon is not None:
            run = with_epsilon(run, epsilon)
        names = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [m for m in names if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        grid = parse_lams(lams, names) if lams else None
        from rich.progress import TimeRemainingColumn

        with Progress(TextColumn("[bold]runs"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                      TextColumn("ETA"), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("runs", total=None)
            rows = run_fairness_bench(run, names, seeds, out, grid,
                                      log=lambda text: bar.console.print(text, markup=False),
                                      progress=lambda done, total: bar.update(task, completed=done, total=total))
        write_outputs(rows, out, title or run.experiment.name, dataset=str(config))
        console.print((out / "table.md").read_text(), markup=False)
    except Exception as err:  # noqa: BLE001
        _fail(err)


def with_epsilon(run, epsilon: str):
    """``run`` with ``[auditor.privacy]`` set for one ε: ``'inf'`` turns DP off; a number is the
    target ε per run (each co-located run has its own auditor, so its own ledger; the budget is
    set to fit).

    Raises:
        ValueError: not a positive number or ``inf``.
    """
    try:
        value = float(epsilon)
    except ValueError:
        raise ValueError(f"--epsilon must be a positive number or 'inf', got {epsilon!r}") from None
    if not value > 0:
        raise ValueError(f"--epsilon must be a positive number or 'inf', got {epsilon!r}")
    pc = run.auditor.privacy
    pc = (pc.model_copy(update={"enabled": False}) if math.isinf(value) else
          pc.model_copy(update={"enabled": True, "calibrate": True, "target_epsilon": value,
                                "epsilon_budget": max(pc.epsilon_budget, value)}))
    return run.model_copy(update={"auditor": run.auditor.model_copy(update={"privacy": pc})})


@app.command("report")
def report_cmd(runs: list[Path] = typer.Argument(..., help="run folders (each with results.json)"),
               out: Path = typer.Option(Path("report.html"), "--out", help="the HTML file to write"),
               auditor_log: Optional[Path] = typer.Option(None, "--auditor-log", help="the auditor's "
                                                          "audit.jsonl (default: RUN_DIR/auditor/audit.jsonl)"),
               verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Write a self-contained HTML fairness report on finished runs (for a compliance reviewer)."""
    _setup_logging(verbose)
    from .report import build_report

    try:
        path = build_report(list(runs), out, auditor_log)
    except Exception as err:  # noqa: BLE001
        _fail(err)
    console.print(f"report: {path}", markup=False)


@app.command("show")
def show(results: Path = typer.Argument(..., help="results.json")) -> None:
    """Print a results.json's headline metrics."""
    data = json.loads(Path(results).read_text())
    _summary(data, Path(results).parent)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
    sys.exit(0)
