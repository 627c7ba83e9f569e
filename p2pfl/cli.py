"""The `p2pfl` command line: keygen, sim, report. User-facing output (rich) lives here only."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pfl import algorithms
from p2pfl.errors import ConfigError, P2PFLError
from p2pfl.robust import RULES
from p2pfl.robust.attacks import ATTACKS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="p2pfl: decentralized peer-to-peer federated learning.")
console = Console()
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)   # one line, even past 80 columns
    raise typer.Exit(2)


@app.command()
def keygen(out: Path = typer.Option(..., "--out", help="file to write the Ed25519 private key to (mode 0600)"),
           force: bool = typer.Option(False, help="overwrite an existing file")) -> None:
    """Create a peer identity (libp2p Ed25519 key file) and print its peer ID."""
    from p2pfl.files import save_identity
    from p2pfl.gossip.identity import Identity

    if out.exists() and not force:
        _fail(f"{out} exists; pass --force to replace it (its peer ID would be lost)")
    ident = Identity.generate()
    try:
        save_identity(ident, out)
    except OSError as e:
        _fail(f"cannot write {out}: {e.strerror}")
    console.print(ident.peer_id, highlight=False)


def _results_table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"{summary['name']}: {summary['peers']} peers, {summary['topology']}, "
                    f"{summary['rounds']} rounds, seed {summary['seed']}"
                    + (f", {summary['algorithm']} (rho {summary['rho']:g}, Q {summary['gossip_steps']})"
                       if "algorithm" in summary else ""))
    for col in ("", "mean", "min", "max"):
        t.add_column(col, justify="right")
    acc = summary["honest_accuracy"]
    label = "peers' test accuracy"
    if summary.get("attackers"):
        label = f"honest peers' accuracy ({summary['attackers']} {summary['attack']} attackers excluded)"
    t.add_row(label, *(f"{acc[k]:.3f}" for k in ("mean", "min", "max")))
    if summary.get("centralized_accuracy") is not None:
        t.add_row("centralized reference", f"{summary['centralized_accuracy']:.3f}", "", "")
    return t


def _run_facts(summary: dict[str, Any]) -> str:
    return (f"consensus distance {summary['consensus_distance']:.3g} · {summary['bytes_sent'] / 1e6:.1f} MB sent · "
            f"{summary['wall_s']:.1f} s ({summary['peer_rounds_per_s']:.0f} peer-rounds/s) · "
            f"rejected frames: {summary['rejected'] or 'none'}")


def _attackers_flag(value: str | None) -> float | list[int] | None:
    """--attackers: "0.3" is a fraction, "1,5" (or "5,") a list of peer indices."""
    if value is None:
        return None
    try:
        if "," in value:
            return [int(v) for v in value.split(",") if v.strip()]
        return float(value)
    except ValueError:
        raise ConfigError(f"--attackers: expected a fraction (0.3) or peer indices (1,5), got {value!r}") from None


_ALGORITHM_HELP = ("algorithm: " + ", ".join(f"{n} ({algorithms.get(n).summary})" for n in algorithms.names())
                   + "; a plugin's with --plugins")


def _json_object_flag(flag: str, value: str | None) -> dict[str, Any] | None:
    """--attack-params / --algorithm-params: a JSON object, e.g. '{"sigma": 10}' (the TOML key is a table)."""
    if value is None:
        return None
    try:
        params = json.loads(value)
    except ValueError:
        params = None
    if not isinstance(params, dict):
        raise ConfigError(f"{flag}: expected a JSON object such as '{{\"sigma\": 10}}', got {value!r}")
    return params


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
    aggregator: Optional[str] = typer.Option(None, help="aggregation rule: " + ", ".join(sorted(RULES))
                                                        + " (mixing = Metropolis-Hastings DFedAvg)"),
    algorithm: Optional[str] = typer.Option(None, help=_ALGORITHM_HELP),
    algorithm_params: Optional[str] = typer.Option(None, help="the algorithm's own parameters as a JSON object"),
    plugins: Optional[list[str]] = typer.Option(None, help="module or .py file that registers more algorithms "
                                                           "(repeatable)"),
    rho: Optional[float] = typer.Option(None, help="SAM radius (0 = SGD); wins over the preset"),
    gossip_steps: Optional[int] = typer.Option(None, help="gossip steps Q per round (Q > 1: -MGS)"),
    lr: Optional[float] = typer.Option(None, help="local learning rate"),
    lr_decay: Optional[float] = typer.Option(None, help="lr at round t is lr * lr_decay**t"),
    momentum: Optional[float] = typer.Option(None, help="local SGD momentum; wins over the preset"),
    weight_decay: Optional[float] = typer.Option(None, help="local SGD weight decay"),
    local_epochs: Optional[float] = typer.Option(None, help="local epochs per round"),
    local_steps: Optional[int] = typer.Option(None, help="local steps per round (overrides epochs)"),
    batch_size: Optional[int] = typer.Option(None, help="mini-batch size"),
    wire: Optional[bool] = typer.Option(None, "--wire/--no-wire", help="send every frame through the signed codec"),
    f: Optional[int] = typer.Option(None, "--f", help="Byzantine inputs the aggregation rule must tolerate"),
    attack: Optional[str] = typer.Option(None, help="none, " + ", ".join(sorted(ATTACKS))),
    attackers: Optional[str] = typer.Option(None, help="fraction of Byzantine peers in [0, 1) (0.3), or "
                                                       "comma-separated peer indices (1,5; one peer: 5,)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default results/<name>-<time>)"),
    engine_name: Optional[str] = typer.Option(None, "--engine", help="inproc (one process, virtual time) or procs "
                                                                     "(one real `p2pfl peer` process per peer)"),
) -> None:
    """Simulate a decentralized federation (in this process, or as peer processes) and report the peers' accuracy."""
    from p2pfl.sim import engine
    from p2pfl.sim import scenario as scenarios

    overrides: dict[str, Any] = dict(peers=peers, rounds=rounds, topology=topology, dataset=dataset, partition=partition,
                     seed=seed, model=model, aggregator=aggregator, gossip_steps=gossip_steps, lr=lr,
                     local_epochs=local_epochs, local_steps=local_steps, batch_size=batch_size, wire=wire,
                     algorithm=algorithm, rho=rho, lr_decay=lr_decay, momentum=momentum, weight_decay=weight_decay,
                     f=f, attack=attack, engine=engine_name, plugins=tuple(plugins or ()) or None)
    try:
        overrides["attackers"] = _attackers_flag(attackers)
        overrides["algorithm_params"] = _json_object_flag("--algorithm-params", algorithm_params)
        s = scenarios.load(scenario, overrides)
        out_dir = out or Path("results") / f"{s.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(f"{s.peers} peers, rounds", total=s.rounds, status="")

            def progress(t: int, info: dict[str, Any]) -> None:
                status = f"acc {info['accuracy_mean']:.3f}" if "accuracy_mean" in info else ""
                if "distance" in info:
                    status += f"  consensus {info['distance']:.2e}"
                bar.update(task, completed=t + 1, status=f"{status}  {info.get('note', '')}")

            if s.engine == "procs":
                from p2pfl.sim import procs

                bar.update(task, description=f"{s.peers} peer processes, slowest peer's rounds")
                summary = procs.run(s, out_dir, progress)
            else:
                summary = engine.run(s, out_dir, progress)
    except P2PFLError as e:      # a bad key, or (procs) a peer process that failed
        _fail(str(e))
    console.print(_results_table(summary))
    console.print(_run_facts(summary), highlight=False)
    plots = "accuracy.png" + (", consensus.png" if s.engine != "procs" else "; one folder per peer")
    console.print(f"wrote {out_dir}/metrics.jsonl, summary.json, {plots}", highlight=False)


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
    console.print(f"wrote {run_dir}/accuracy.png, consensus.png", highlight=False)


@app.command()
def peer(
    config: Optional[Path] = typer.Option(None, "--config", help="peer.toml with the same keys as these flags"),
    key: Optional[Path] = typer.Option(None, help="identity key file (missing: generated, saved under --out)"),
    listen: Optional[list[str]] = typer.Option(None, help="multiaddr to listen on [/ip4/0.0.0.0/tcp/0]"),
    bootstrap: Optional[list[str]] = typer.Option(None, help="multiaddr .../p2p/<id> of a peer to join (repeatable)"),
    neighbors: Optional[str] = typer.Option(None, help="comma-separated peer IDs or multiaddrs: a fixed neighbour set"),
    degree: Optional[int] = typer.Option(None, help="neighbours to pick when --neighbors is not given [4]"),
    min_neighbors: Optional[int] = typer.Option(None, help="start round 0 once this many neighbours are up [1]"),
    start_timeout: Optional[float] = typer.Option(None, help="... or after this many seconds [60]"),
    rounds: Optional[int] = typer.Option(None, help="rounds to run [30]"),
    out: Optional[Path] = typer.Option(None, help="folder for metrics.jsonl, summary.json, checkpoint.pt [peer-out]"),
    resume: Optional[Path] = typer.Option(None, help="restart from the checkpoint in this folder"),
    fresh: bool = typer.Option(False, "--fresh", help="start over, overwriting a checkpoint in --out "
                                                      "(without it, an existing one is refused)"),
    network_key: Optional[Path] = typer.Option(None, help="file with a 64-hex-char private-network key"),
    allow: Optional[Path] = typer.Option(None, help="file with the peer IDs allowed to join, one a line"),
    peer_exchange_dns: bool = typer.Option(False, "--peer-exchange-dns", help="also dial DNS names that other "
                                                                              "peers pass on (off: IP addresses only)"),
    device: Optional[str] = typer.Option(None, help="cuda, cpu or auto [auto]"),
    threads: Optional[int] = typer.Option(None, help="torch threads (0: torch's default)"),
    dataset: Optional[str] = typer.Option(None, help="digits, mnist1d, synthetic, npz:PATH"),
    shard: Optional[str] = typer.Option(None, help="i/N: train on the i-th of N shards [0/1]"),
    partition: Optional[str] = typer.Option(None, help="iid, dirichlet:ALPHA, classes:K (as in sim)"),
    seed: Optional[int] = typer.Option(None, help="seed of the data split and the initial model (same on all peers)"),
    model: Optional[str] = typer.Option(None, help="mlp or cnn"),
    aggregator: Optional[str] = typer.Option(None, help="aggregation rule: " + ", ".join(sorted(RULES))),
    aggregator_params: Optional[str] = typer.Option(None, help="the rule's parameters as a JSON object, "
                                                               "e.g. '{\"tau\": 1.0}'"),
    gossip_steps: Optional[int] = typer.Option(None, help="gossip steps Q per round"),
    algorithm: Optional[str] = typer.Option(None, help=_ALGORITHM_HELP),
    algorithm_params: Optional[str] = typer.Option(None, help="the algorithm's own parameters as a JSON object"),
    plugins: Optional[list[str]] = typer.Option(None, help="module or .py file that registers more algorithms "
                                                           "(repeatable)"),
    rho: Optional[float] = typer.Option(None, help="SAM radius (0 = SGD); wins over the preset"),
    momentum: Optional[float] = typer.Option(None, help="local SGD momentum; wins over the preset"),
    lr: Optional[float] = typer.Option(None, help="local learning rate"),
    lr_decay: Optional[float] = typer.Option(None, help="lr at round t is lr * lr_decay**t"),
    weight_decay: Optional[float] = typer.Option(None, help="local SGD weight decay"),
    local_epochs: Optional[float] = typer.Option(None, help="local epochs per round"),
    local_steps: Optional[int] = typer.Option(None, help="local steps per round (overrides epochs)"),
    batch_size: Optional[int] = typer.Option(None, help="mini-batch size"),
    step_timeout: Optional[float] = typer.Option(None, help="seconds to wait for neighbours in one gossip step [30]"),
    delay_ms: Optional[float] = typer.Option(None, help="inject this delay before every outbound frame"),
    bulk_port: Optional[int] = typer.Option(None, help="TCP port of the fast bulk channel for model frames (0: any "
                                                       "free port, -1: off; frames then go over libp2p streams)"),
    metrics_port: Optional[int] = typer.Option(None, help="serve Prometheus metrics on this port (0: off) [0]"),
    metrics_host: Optional[str] = typer.Option(None, help="address the metrics endpoint binds [127.0.0.1]; "
                                                          "0.0.0.0 exposes it to the network"),
    attack: Optional[str] = typer.Option(None, help="make this peer Byzantine: " + ", ".join(sorted(ATTACKS))
                                                    + " [none]"),
    attack_params: Optional[str] = typer.Option(None, help="the attack's parameters as a JSON object, "
                                                           "e.g. '{\"sigma\": 10}'"),
    colluders: Optional[str] = typer.Option(None, help="comma-separated peer IDs of the other attackers (spared)"),
) -> None:
    """Run one real peer over libp2p: train on a shard, gossip with neighbours, checkpoint every round."""
    import logging

    from p2pfl.peers import settings as peer_settings

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = dict(
        key=key, listen=tuple(listen or ()), bootstrap=tuple(bootstrap or ()),
        neighbors=tuple(n for n in (neighbors or "").split(",") if n), degree=degree, min_neighbors=min_neighbors,
        start_timeout=start_timeout, rounds=rounds, out=out, resume=resume, fresh=fresh or None,   # no --fresh: the file's
        network_key=network_key, allow=allow, peer_exchange_dns=peer_exchange_dns or None,
        device=device, threads=threads, dataset=dataset, shard=shard, partition=partition, seed=seed, model=model,
        aggregator=aggregator, gossip_steps=gossip_steps, algorithm=algorithm, rho=rho, momentum=momentum,
        lr_decay=lr_decay, weight_decay=weight_decay, lr=lr, local_epochs=local_epochs, local_steps=local_steps,
        batch_size=batch_size, step_timeout=step_timeout, delay_ms=delay_ms, bulk_port=bulk_port,
        metrics_port=metrics_port, metrics_host=metrics_host, attack=attack,
        colluders=tuple(c for c in (colluders or "").split(",") if c))
    try:
        overrides["attack_params"] = _json_object_flag("--attack-params", attack_params)
        overrides["algorithm_params"] = _json_object_flag("--algorithm-params", algorithm_params)
        overrides["aggregator_params"] = _json_object_flag("--aggregator-params", aggregator_params)
        overrides["plugins"] = tuple(plugins or ())
        s = peer_settings.load(config, {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()})
        from p2pfl.peers import node  # importing libp2p resets its loggers: quiet them afterwards

        if not os.environ.get("LIBP2P_DEBUG"):
            logging.getLogger("libp2p").setLevel(logging.CRITICAL)   # we report dial failures in one line
        summary = node.run(s, report=lambda line: print(line, flush=True))
    except ConfigError as e:
        _fail(str(e))
    acc = summary["accuracy"]
    print(f"done: round {summary['rounds_done']}/{summary['rounds']}"
          + (f", accuracy {acc:.3f}" if acc is not None else "") + f"; wrote {s.out}/summary.json", flush=True)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
