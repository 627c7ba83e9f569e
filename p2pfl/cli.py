"""The `p2pfl` command line: keygen, sim, report. User-facing output (rich) lives here only."""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import os
import sys
from collections.abc import Callable
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
from p2pfl.settings import LearningSettings

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

_DYNAMIC_HELP = {   # the registries' names, so the help never lists a name that does not exist
    "algorithm": lambda: ", ".join(f"{n} ({algorithms.get(n).summary})" for n in algorithms.names())
    + "; a plugin's with --plugins",
    "aggregator": lambda: ", ".join(sorted(RULES)),
    "attack": lambda: "none, " + ", ".join(sorted(ATTACKS)),
}


def _shared_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` one option per key it shares with the other command (p2pfl.settings.LearningSettings:
    names, help and types come from there), delivered in its **shared; `_shared_overrides` parses them."""
    sig = inspect.signature(command)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for f in dataclasses.fields(LearningSettings):
        help_text = f.metadata["help"] + (f": {_DYNAMIC_HELP[f.name]()}" if f.name in _DYNAMIC_HELP else "")
        kind = _FLAG_KINDS[f.name] if f.name in _FLAG_KINDS else _scalar_kind(f.type)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                        default=typer.Option(None, "--" + f.name.replace("_", "-"), help=help_text)))
    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return command


# flags whose text is parsed into the key's value: tables as JSON objects, lists of ints as 64,32
_FLAG_KINDS: dict[str, Any] = {"algorithm_params": Optional[str], "aggregator_params": Optional[str],
                               "attack_params": Optional[str], "reputation_params": Optional[str], "hidden": Optional[str],
                               "plugins": Optional[list[str]]}


def _scalar_kind(annotation: Any) -> Any:
    text = str(annotation)
    for name, kind in (("int", int), ("float", float), ("str", str), ("bool", bool)):
        if text.startswith(name):
            return Optional[kind]
    raise TypeError(f"no flag type for a key annotated {annotation!r}")


def _shared_overrides(shared: dict[str, Any]) -> dict[str, Any]:
    """The shared flags as setting values (None: not given)."""
    out = dict(shared)
    for key in ("algorithm_params", "aggregator_params", "attack_params", "reputation_params"):
        out[key] = _json_object_flag("--" + key.replace("_", "-"), shared.get(key))
    if shared.get("hidden") is not None:
        try:
            out["hidden"] = tuple(int(h) for h in shared["hidden"].split(",") if h.strip())
        except ValueError:
            raise ConfigError(f"--hidden: expected comma-separated widths such as 64,32, got {shared['hidden']!r}") \
                from None
    out["plugins"] = tuple(shared.get("plugins") or ()) or None
    return out


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
@_shared_flags
def sim(
    scenario: Optional[Path] = typer.Argument(None, help="scenario TOML file; the embedded default if omitted"),
    peers: Optional[int] = typer.Option(None, help="number of peers"),
    topology: Optional[str] = typer.Option(None, help="ring, torus, regular:K, erdos:P, exponential, full"),
    wire: Optional[bool] = typer.Option(None, "--wire/--no-wire", help="send every frame through the signed codec"),
    attackers: Optional[str] = typer.Option(None, help="fraction of Byzantine peers in [0, 1) (0.3), or "
                                                       "comma-separated peer indices (1,5; one peer: 5,)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default results/<name>-<time>)"),
    engine_name: Optional[str] = typer.Option(None, "--engine", help="inproc (one process, virtual time) or procs "
                                                                     "(one real `p2pfl peer` process per peer)"),
    **shared: Any,
) -> None:
    """Simulate a decentralized federation (in this process, or as peer processes) and report the peers' accuracy."""
    from p2pfl.sim import engine
    from p2pfl.sim import scenario as scenarios

    overrides: dict[str, Any] = dict(peers=peers, topology=topology, wire=wire, engine=engine_name)
    try:
        overrides.update(_shared_overrides(shared))
        overrides["attackers"] = _attackers_flag(attackers)
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
    plots = "accuracy.png" + (", consensus.png" if s.engine != "procs" else "; one folder per peer") \
        + (", reputation.png, overlay.png" if s.reputation and s.engine != "procs" else "")
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
    console.print(f"wrote {run_dir}/" + ", ".join(r["figures"]), highlight=False)


@app.command()
@_shared_flags
def peer(
    config: Optional[Path] = typer.Option(None, "--config", help="peer.toml with the same keys as these flags"),
    key: Optional[Path] = typer.Option(None, help="identity key file (missing: generated, saved under --out)"),
    listen: Optional[list[str]] = typer.Option(None, help="multiaddr to listen on [/ip4/0.0.0.0/tcp/0]"),
    bootstrap: Optional[list[str]] = typer.Option(None, help="multiaddr .../p2p/<id> of a peer to join (repeatable)"),
    neighbors: Optional[str] = typer.Option(None, help="comma-separated peer IDs or multiaddrs: a fixed neighbour set"),
    degree: Optional[int] = typer.Option(None, help="neighbours to pick when --neighbors is not given [4]"),
    min_neighbors: Optional[int] = typer.Option(None, help="start round 0 once this many neighbours are up [1]"),
    start_timeout: Optional[float] = typer.Option(None, help="... or after this many seconds [60]"),
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
    shard: Optional[str] = typer.Option(None, help="i/N: train on the i-th of N shards [0/1]"),
    step_timeout: Optional[float] = typer.Option(None, help="seconds to wait for neighbours in one gossip step [30]"),
    delay_ms: Optional[float] = typer.Option(None, help="inject this delay before every outbound frame"),
    bulk_port: Optional[int] = typer.Option(None, help="TCP port of the fast bulk channel for model frames (0: any "
                                                       "free port, -1: off; frames then go over libp2p streams)"),
    metrics_port: Optional[int] = typer.Option(None, help="serve Prometheus metrics on this port (0: off) [0]"),
    metrics_host: Optional[str] = typer.Option(None, help="address the metrics endpoint binds [127.0.0.1]; "
                                                          "0.0.0.0 exposes it to the network"),
    colluders: Optional[str] = typer.Option(None, help="comma-separated peer IDs of the other attackers (spared)"),
    **shared: Any,
) -> None:
    """Run one real peer over libp2p: train on a shard, gossip with neighbours, checkpoint every round."""
    import logging

    from p2pfl.peers import settings as peer_settings

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = dict(
        key=key, listen=tuple(listen or ()), bootstrap=tuple(bootstrap or ()),
        neighbors=tuple(n for n in (neighbors or "").split(",") if n), degree=degree, min_neighbors=min_neighbors,
        start_timeout=start_timeout, out=out, resume=resume, fresh=fresh or None,   # no --fresh: the file's
        network_key=network_key, allow=allow, peer_exchange_dns=peer_exchange_dns or None,
        device=device, threads=threads, shard=shard, step_timeout=step_timeout, delay_ms=delay_ms,
        bulk_port=bulk_port, metrics_port=metrics_port, metrics_host=metrics_host,
        colluders=tuple(c for c in (colluders or "").split(",") if c))
    try:
        overrides.update(_shared_overrides(shared))
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
