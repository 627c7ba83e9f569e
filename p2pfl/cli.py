"""The `p2pfl` command line: keygen, sim, report. User-facing output (rich) lives here only."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pfl.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="p2pfl: decentralized peer-to-peer federated learning.")
console = Console()
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


@app.command()
def keygen(out: Path = typer.Option(..., "--out", help="file to write the Ed25519 private key to (mode 0600)"),
           force: bool = typer.Option(False, help="overwrite an existing file")) -> None:
    """Create a peer identity (libp2p Ed25519 key file) and print its peer ID."""
    from p2pfl.gossip.identity import Identity

    if out.exists() and not force:
        _fail(f"{out} exists; pass --force to replace it (its peer ID would be lost)")
    ident = Identity.generate()
    try:
        ident.save(out)
    except OSError as e:
        _fail(f"cannot write {out}: {e.strerror}")
    console.print(ident.peer_id, highlight=False)


def _results_table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"{summary['name']}: {summary['peers']} peers, {summary['topology']}, "
                    f"{summary['rounds']} rounds, seed {summary['seed']}")
    for col in ("", "mean", "min", "max"):
        t.add_column(col, justify="right")
    acc = summary["honest_accuracy"]
    t.add_row("peers' test accuracy", *(f"{acc[k]:.3f}" for k in ("mean", "min", "max")))
    if summary.get("centralized_accuracy") is not None:
        t.add_row("centralized reference", f"{summary['centralized_accuracy']:.3f}", "", "")
    return t


def _run_facts(summary: dict[str, Any]) -> str:
    return (f"consensus distance {summary['consensus_distance']:.3g} · {summary['bytes_sent'] / 1e6:.1f} MB sent · "
            f"{summary['wall_s']:.1f} s ({summary['peer_rounds_per_s']:.0f} peer-rounds/s) · "
            f"rejected frames: {summary['rejected'] or 'none'}")


@app.command()
def sim(
    scenario: Optional[Path] = typer.Argument(None, help="scenario TOML file; the embedded default if omitted"),
    peers: Optional[int] = typer.Option(None, help="number of peers"),
    rounds: Optional[int] = typer.Option(None, help="number of rounds"),
    topology: Optional[str] = typer.Option(None, help="ring, torus, regular:K, erdos:P, exponential, full"),
    dataset: Optional[str] = typer.Option(None, help="digits, mnist1d, synthetic, npz:PATH"),
    partition: Optional[str] = typer.Option(None, help="iid, dirichlet:ALPHA, classes:K"),
    seed: Optional[int] = typer.Option(None, help="seed of everything random in the run"),
    model: Optional[str] = typer.Option(None, help="mlp or cnn"),
    aggregator: Optional[str] = typer.Option(None, help="aggregation rule (mixing = Metropolis-Hastings DFedAvg)"),
    gossip_steps: Optional[int] = typer.Option(None, help="gossip steps Q per round"),
    lr: Optional[float] = typer.Option(None, help="local learning rate"),
    local_epochs: Optional[float] = typer.Option(None, help="local epochs per round"),
    local_steps: Optional[int] = typer.Option(None, help="local steps per round (overrides epochs)"),
    batch_size: Optional[int] = typer.Option(None, help="mini-batch size"),
    wire: Optional[bool] = typer.Option(None, "--wire/--no-wire", help="send every frame through the signed codec"),
    out: Optional[Path] = typer.Option(None, help="run folder (default results/<name>-<time>)"),
) -> None:
    """Simulate a decentralized federation in this process and report the peers' accuracy."""
    from p2pfl.sim import engine
    from p2pfl.sim import scenario as scenarios

    overrides = dict(peers=peers, rounds=rounds, topology=topology, dataset=dataset, partition=partition,
                     seed=seed, model=model, aggregator=aggregator, gossip_steps=gossip_steps, lr=lr,
                     local_epochs=local_epochs, local_steps=local_steps, batch_size=batch_size, wire=wire)
    try:
        s = scenarios.load(scenario, overrides)
        out_dir = out or Path("results") / f"{s.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(f"{s.peers} peers, rounds", total=s.rounds, status="")

            def progress(t: int, info: dict[str, Any]) -> None:
                status = f"acc {info['accuracy_mean']:.3f}" if "accuracy_mean" in info else ""
                bar.update(task, completed=t + 1, status=f"{status}  consensus {info['distance']:.2e}")

            summary = engine.run(s, out_dir, progress)
    except ConfigError as e:
        _fail(str(e))
    console.print(_results_table(summary))
    console.print(_run_facts(summary), highlight=False)
    console.print(f"wrote {out_dir}/metrics.jsonl, summary.json, accuracy.png", highlight=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run folder written by `p2pfl sim`")) -> None:
    """Recompute the table and the plots of a finished run from its metrics.jsonl."""
    from p2pfl.sim.results import report as make_report

    try:
        r = make_report(run_dir)
    except ConfigError as e:
        _fail(str(e))
    t = Table(title=f"{run_dir}: {r['rounds']} rounds evaluated")
    for col in ("round", "mean", "min", "max", "centralized", "consensus distance"):
        t.add_column(col, justify="right")
    tab = r["table"]
    for k, rnd in enumerate(tab["rounds"]):
        t.add_row(str(rnd + 1), f"{tab['mean'][k]:.3f}", f"{tab['min'][k]:.3f}", f"{tab['max'][k]:.3f}",
                  f"{tab['centralized'][k]:.3f}", f"{tab['consensus_distance'][k]:.3g}")
    console.print(t)
    console.print(f"wrote {run_dir}/accuracy.png", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
