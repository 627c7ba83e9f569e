"""The `p2pfl` command line: keygen, sim, report. User-facing output (rich) lives here only."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pfl import algorithms
from p2pfl.cli_backbone import app as backbone_app
from p2pfl.errors import ConfigError, P2PFLError
from p2pfl.robust import RULES
from p2pfl.robust.attacks import ATTACKS
from p2pfl.settings import LearningSettings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="p2pfl: decentralized peer-to-peer federated learning.",
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console()
err = Console(stderr=True)
app.add_typer(backbone_app, name="backbone")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)   # one line, even past 80 columns
    raise typer.Exit(code)


def _print_version(value: bool) -> None:
    if value:
        from p2pfl import __version__

        console.print(f"p2pfl {__version__} (decentralized peer-to-peer federated learning)", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """p2pfl: decentralized peer-to-peer federated learning."""


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
    label = f"peers' test {summary.get('metric', 'accuracy')}"
    if summary.get("attackers"):
        label = f"honest peers' accuracy ({summary['attackers']} {summary['attack']} attackers excluded)"
    t.add_row(label, *(f"{acc[k]:.3f}" for k in ("mean", "min", "max")))
    if summary.get("centralized_accuracy") is not None:
        t.add_row("centralized reference", f"{summary['centralized_accuracy']:.3f}", "", "")
    return t


def _run_facts(summary: dict[str, Any]) -> list[str]:
    """The footer under the table: short lines (each fits 80 columns but the rejection counts), so a
    terminal never wraps one mid-phrase. The rate covers the rounds only, the time everything."""
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(summary["rejected"].items())) or "none"
    lines = [f"consensus distance {summary['consensus_distance']:.3g} · {summary['bytes_sent'] / 1e6:.1f} MB sent",
             f"rejected frames: {rejected}"]
    train = summary.get("train_s")
    timing = f"time: {summary['wall_s']:.1f} s in all"
    if train is not None:   # the rate is over the rounds' time, not setup, start-up or the reference
        timing += f"; the rounds took {train:.1f} s ({summary['peer_rounds_per_s']:.0f} peer-rounds/s)"
    return lines + [timing]


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
    names, help and types come from there), delivered in its **shared; `_shared_overrides` parses them.
    Each help ends with the default that applies ([16]: `sim` without a file runs the embedded default
    scenario, whose values win over the dataclass's), and a list option reads `<str>` (repeatable),
    never a Python type."""
    sig = inspect.signature(command)
    defaults = _flag_defaults(command.__name__)
    params = [_readable_list_option(p) for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for f in dataclasses.fields(LearningSettings):
        help_text = f.metadata["help"] + (f": {_DYNAMIC_HELP[f.name]()}" if f.name in _DYNAMIC_HELP else "")
        kind = _FLAG_KINDS[f.name] if f.name in _FLAG_KINDS else _scalar_kind(f.type)
        params.append(_readable_list_option(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
            default=typer.Option(None, "--" + f.name.replace("_", "-"), help=help_text + _shown(defaults.get(f.name))))))
    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return command


def _flag_defaults(command: str) -> dict[str, Any]:
    """The value each shared key has when its flag is not given (`sim`: the embedded default scenario's)."""
    values = {f.name: f.default for f in dataclasses.fields(LearningSettings) if f.default is not dataclasses.MISSING}
    if command == "sim":
        from importlib import resources

        from p2pfl.config import parse_toml
        values.update(parse_toml(resources.files("p2pfl.sim").joinpath("default.toml").read_text(), "default"))
    return values


def _shown(default: Any) -> str:
    """The " [16]" ending a help text: a default as shown (nothing for an unset or empty one)."""
    if default is None or default == () or default == {}:
        return ""
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    return f" [{default}]"


def _readable_list_option(p: inspect.Parameter) -> inspect.Parameter:
    """A repeatable option (list[X]) gets the metavar <x> and says it repeats, instead of <list[x]>."""
    info = p.default
    args = [a for a in typing.get_args(p.annotation) if a is not type(None)]
    if not isinstance(info, typer.models.OptionInfo) or info.metavar is not None or not args \
            or typing.get_origin(args[0]) is not list:
        return p
    item = typing.get_args(args[0])[0]
    info.metavar = f"<{getattr(item, '__name__', 'value')}>"
    if info.help and "repeatable" not in info.help:
        info.help += " (repeatable)"
    return p


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


@contextlib.contextmanager
def _progress(s: Any) -> Iterator[Callable[[int, dict[str, Any]], None]]:
    """The run's progress callback: a bar on a terminal; one plain line a round otherwise (a log, CI,
    or a program waiting for the run to start)."""
    def status(info: dict[str, Any]) -> str:
        text = f"acc {info['accuracy_mean']:.3f}" if "accuracy_mean" in info else ""
        if "distance" in info:
            text += f"  consensus {info['distance']:.2e}"
        return f"{text}  {info.get('note', '')}".strip()

    what = f"{s.peers} procs, slowest" if s.engine == "procs" else f"{s.peers} peers"
    if not console.is_terminal:
        last = [-1]

        def line(t: int, info: dict[str, Any]) -> None:
            if t > last[0] or "note" not in info:   # a procs note alone (peer up, restarted) is not a round
                last[0] = max(last[0], t)
                print(f"round {t + 1}/{s.rounds} ({what}): {status(info)}", flush=True)
        yield line
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console) as bar:
        task = bar.add_task(f"{what}, round", total=s.rounds, status="")
        yield lambda t, info: bar.update(task, completed=t + 1, status=status(info))


@app.command()
@_shared_flags
def sim(
    scenario: Optional[Path] = typer.Argument(None, help="scenario TOML file; the embedded default if omitted"),
    peers: Optional[int] = typer.Option(None, help="number of peers [16]"),
    topology: Optional[str] = typer.Option(None, help="ring, torus, regular:K, erdos:P, exponential, full [ring]"),
    wire: Optional[bool] = typer.Option(None, "--wire/--no-wire", help="send every frame through the signed codec "
                                                                                "[off]"),
    attackers: Optional[str] = typer.Option(None, help="fraction of Byzantine peers in [0, 1) (0.3), or "
                                                       "comma-separated peer indices (1,5; one peer: 5,) [0]"),
    out: Optional[Path] = typer.Option(None, help="run folder (default results/<name>-<time>)"),
    engine_name: Optional[str] = typer.Option(None, "--engine", help="inproc (one process, virtual time) or procs "
                                                                     "(one real `p2pfl peer` process per peer) [inproc]"),
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
        setup = engine.Setup.build(s)   # the topology and the split are checked here, before the bar
        with _progress(s) as progress:
            if s.engine == "procs":
                from p2pfl.sim import procs

                summary = procs.run(s, out_dir, progress, setup=setup)
            else:
                summary = engine.run(s, out_dir, progress, setup=setup)
    except engine.Interrupted as stop:   # Ctrl-C: the rounds so far are written; exit as the procs engine does
        done = stop.summary.get("rounds_done", 0)
        err.print(f"interrupted after round {done}/{s.rounds}: wrote {out_dir}/metrics.jsonl, summary.json",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except P2PFLError as e:      # a bad key, or (procs) a peer process that failed
        _fail(str(e))
    console.print(_results_table(summary))
    for line in _run_facts(summary):
        console.print(line, highlight=False, soft_wrap=True)
    plots = ", ".join(n for n in ("accuracy.png", "consensus.png", "reputation.png", "overlay.png") if (out_dir / n).exists())
    console.print(f"wrote {out_dir}/", highlight=False, soft_wrap=True)
    console.print(f"  metrics.jsonl, summary.json, {plots}" + ("; one folder per peer" if s.engine == "procs" else ""),
                  highlight=False)


def _cell(value: float, spec: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run folder written by `p2pfl sim` (or one peer's --out)"),
           baseline: Optional[Path] = typer.Option(None, help="another run folder (e.g. the same scenario with "
                                                              "--attack none --attackers 0) drawn beside this "
                                                              "one in accuracy.png")) -> None:
    """Recompute the table and the plots of a finished run from its metrics.jsonl."""
    from p2pfl.sim.results import report as make_report

    try:
        r = make_report(run_dir, baseline)
    except ConfigError as e:
        _fail(str(e))
    tab = r["table"]
    columns = {"centralized": tab["centralized"], "consensus distance": tab["consensus_distance"]}
    shown = {k: v for k, v in columns.items() if not all(math.isnan(x) for x in v)}   # a peer's folder has none
    t = Table(title=f"{run_dir}: {r['rounds']} rounds evaluated")
    for col in ("round", "mean", "min", "max", *shown):
        t.add_column(col, justify="right")
    for k, rnd in enumerate(tab["rounds"]):
        t.add_row(str(rnd + 1), f"{tab['mean'][k]:.3f}", f"{tab['min'][k]:.3f}", f"{tab['max'][k]:.3f}",
                  *(_cell(v[k], ".3f" if name == "centralized" else ".3g") for name, v in shown.items()))
    console.print(t)
    if r["baseline_final"] is not None:
        console.print(f"baseline {baseline}: final mean accuracy {r['baseline_final']:.3f} "
                      f"(this run: {tab['mean'][-1]:.3f})", highlight=False, soft_wrap=True)
    console.print(f"wrote {run_dir}/{', '.join(r['plots'])}", highlight=False, soft_wrap=True)


@app.command()
@_shared_flags
def peer(
    config: Optional[Path] = typer.Option(None, "--config", help="peer.toml with the same keys as these flags"),
    key: Optional[Path] = typer.Option(None, help="identity key file (missing: generated, saved under --out)"),
    listen: Optional[list[str]] = typer.Option(None, metavar="<multiaddr>", help="address to listen on, e.g. "
                                                                                 "/ip4/0.0.0.0/tcp/4001 "
                                                                                 "(repeatable) [/ip4/0.0.0.0/tcp/0]"),
    bootstrap: Optional[list[str]] = typer.Option(None, metavar="<multiaddr>", help="address .../p2p/<id> of a peer "
                                                                                    "to join (repeatable)"),
    neighbors: Optional[str] = typer.Option(None, help="comma-separated peer IDs or multiaddrs: a fixed neighbour set"),
    degree: Optional[int] = typer.Option(None, help="neighbours to pick when --neighbors is not given [4]"),
    min_neighbors: Optional[int] = typer.Option(None, help="start round 0 once this many neighbours are up [1]"),
    start_timeout: Optional[float] = typer.Option(None, help="... for this many seconds; with no neighbour by "
                                                             "then, exit 1 (unless --alone) [60]"),
    alone: bool = typer.Option(False, "--alone", help="may train without neighbours: with nothing to dial, start "
                                                      "at once; else start at --start-timeout even if nobody came"),
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
    # P2PFL_LOG=INFO (or DEBUG) shows the peer's membership decisions: links, removals, set-asides
    level = os.environ.get("P2PFL_LOG", "WARNING").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        _fail(f"P2PFL_LOG: unknown level {level!r}; allowed: DEBUG, INFO, WARNING, ERROR")
    logging.getLogger("p2pfl").setLevel(level)
    overrides: dict[str, Any] = dict(
        key=key, listen=tuple(listen or ()), bootstrap=tuple(bootstrap or ()),
        neighbors=tuple(n for n in (neighbors or "").split(",") if n), degree=degree, min_neighbors=min_neighbors,
        start_timeout=start_timeout, alone=alone or None, out=out, resume=resume, fresh=fresh or None,   # no --fresh: the file's
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
    except node.StartTimeout as e:
        _fail(str(e), code=1)
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
