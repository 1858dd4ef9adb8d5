"""The ``fairsplit`` command line.

    fairsplit demo                         # embedded default, both parties over Flower on loopback
    fairsplit run --config run.toml        # one experiment, both parties locally (Flower)
    fairsplit run --config run.toml --colocated   # same, one process, no Flower (reference)
    fairsplit developer --config dev.toml  # the developer's machine (SuperLink + ServerApp)
    fairsplit auditor --config aud.toml --superlink HOST:PORT   # the auditor's machine (SuperNode)
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from protocol.config import ConfigError, RunFile, load_developer_file, load_run_file

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fair LoRA fine-tuning; sensitive attributes stay with the auditor.")
console = Console(stderr=True)

HEADLINE = ("accuracy", "auc", "demographic_parity_difference", "equalized_odds_difference",
            "worst_group_accuracy")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


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
        if "train_loss" not in row:  # round 0: the auditor's signal/update before training
            return
        parts = [f"loss {row['train_loss']:.3f}"]
        for key, short in (("accuracy", "acc"), ("demographic_parity_difference", "DPD"),
                           ("equalized_odds_difference", "EOD")):
            if val.get(key) is not None:
                parts.append(f"{short} {val[key]:.3f}")
        self.progress.update(self.task, completed=row["round"], metrics=" · ".join(parts))


def _summary(results: dict, out: Path) -> None:
    table = Table(title=f"{results['method']} on {results['dataset']} ({results['transport']}): test metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in HEADLINE:
        v = results["metrics"].get(k)
        table.add_row(k, "n/a" if v is None else f"{v:.4f}")
    table.add_row("wall_time_s", f"{results['wall_time_s']:.1f}")
    table.add_row("bytes to / from auditor", f"{results['bytes_to_auditor']:,} / {results['bytes_from_auditor']:,}")
    console.print(table)
    console.print(f"results: {out / 'results.json'}")


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(code=2)


def _execute(run: RunFile, out: Path, colocated: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with RoundProgress(run.experiment.rounds) as bar:
        if colocated:
            from .colocated import run_colocated

            results = run_colocated(run, out, on_round=bar.update)
        else:
            from .launch import run_local

            results = run_local(run, out, on_round=bar.update)
    _summary(results, out)
    return results


@app.command()
def demo(out: Path = typer.Option(Path("fairsplit-demo"), help="output folder"),
         colocated: bool = typer.Option(False, help="one process, no Flower"),
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run the embedded default: synthetic data with a spurious sensitive feature, tiny ViT, ERM."""
    _setup_logging(verbose)
    from .demo import demo_run_file

    run = demo_run_file()
    console.print("[bold]fairsplit demo[/bold]: developer and auditor as separate Flower processes"
                  if not colocated else "[bold]fairsplit demo[/bold] (co-located)")
    try:
        _execute(run, out, colocated)
    except Exception as err:  # noqa: BLE001 - shown to the user, exit code 2
        _fail(err)


@app.command("run")
def run_cmd(config: Path = typer.Option(..., "--config", "-c", help="run TOML with [experiment], [developer], [auditor]"),
            out: Path = typer.Option(Path("fairsplit-out"), help="output folder"),
            colocated: bool = typer.Option(False, help="one process, no Flower (reference runner)"),
            verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run one experiment with both parties on this machine."""
    _setup_logging(verbose)
    try:
        run = load_run_file(config)
        _execute(run, out, colocated)
    except ConfigError as err:
        _fail(err)
    except Exception as err:  # noqa: BLE001
        _fail(err)


@app.command()
def developer(config: Path = typer.Option(..., "--config", "-c", help="developer TOML ([experiment] + [developer])"),
              out: Path = typer.Option(Path("fairsplit-out"), help="output folder"),
              host: str = typer.Option("127.0.0.1", help="SuperLink listen address (0.0.0.0 for other machines)"),
              port: int = typer.Option(9092, help="SuperLink port (Fleet, Control and Runtime APIs)"),
              verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """The developer's machine: SuperLink + the training ServerApp; waits for the auditor."""
    _setup_logging(verbose)
    from .launch import run_developer

    try:
        f = load_developer_file(config)
        console.print(f"SuperLink on {host}:{port}; waiting for the auditor's SuperNode…")
        with RoundProgress(f.experiment.rounds) as bar:
            results = run_developer(config, out, host=host, port=port, on_round=bar.update)
        _summary(results, out)
    except Exception as err:  # noqa: BLE001
        _fail(err)


@app.command()
def auditor(config: Path = typer.Option(..., "--config", "-c", help="auditor TOML ([experiment] + [auditor])"),
            superlink: str = typer.Option("127.0.0.1:9092", help="the developer's SuperLink host:port"),
            logs: Path = typer.Option(Path("fairsplit-auditor-logs"), help="log folder"),
            verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """The auditor's machine: a SuperNode that dials out and answers until stopped (Ctrl-C)."""
    _setup_logging(verbose)
    from .launch import run_auditor

    try:
        console.print(f"auditor SuperNode dialling {superlink}; Ctrl-C to stop")
        run_auditor(config, superlink, logs)
    except Exception as err:  # noqa: BLE001
        _fail(err)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(bench_app, name="bench")


def parse_lams(spec: str, methods: list[str]) -> dict[str, list[float]]:
    """Parse a λ grid: ``"0.1,1"`` for every non-ERM method, or ``"m=0.1,1;m2=1"`` per method.

    Raises:
        ValueError: a value is not a number, or a method is not among ``methods``.
    """
    def values(text: str) -> list[float]:
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"λ values must be numbers, got {text!r}") from None

    if "=" not in spec:
        return {m: values(spec) for m in methods if m != "erm"}
    grid = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, vals = part.partition("=")
        if name.strip() not in methods:
            raise ValueError(f"--lams names {name.strip()!r}, which is not in --methods")
        grid[name.strip()] = values(vals)
    return grid


@bench_app.command("fairness")
def bench_fairness(config: Path = typer.Option(..., "--config", "-c", help="run TOML"),
                   methods: str = typer.Option("erm,unlearning,adversarial,orthogonality,entropy",
                                               help="comma-separated methods"),
                   seeds: int = typer.Option(3, help="seeds per (method, λ)"),
                   lams: Optional[str] = typer.Option(
                       None, help="λ grid: '0.1,1' for every non-ERM method, or per method "
                                  "'adversarial=0.1,1;entropy=0.1'"),
                   out: Path = typer.Option(Path("fairsplit-bench"), help="output folder"),
                   title: str = typer.Option("", help="table title"),
                   verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Every method (and a λ grid) over seeds, co-located: table.md, table.csv, pareto.png."""
    _setup_logging(verbose)
    from .bench import DEFAULT_LAMS, run_fairness_bench, write_outputs

    try:
        run = load_run_file(config)
        names = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [m for m in names if m not in DEFAULT_LAMS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(DEFAULT_LAMS)}")
        grid = parse_lams(lams, names) if lams else None
        rows = run_fairness_bench(run, names, seeds, out, grid, log=console.print)
        write_outputs(rows, out, title or run.experiment.name)
        console.print((out / "table.md").read_text())
    except Exception as err:  # noqa: BLE001
        _fail(err)


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
