"""The multi-process engine: a scenario run as N real `p2pfl peer` processes on 127.0.0.1.

Theory of operation
-------------------
`run` builds the in-process engine's `Setup` for the scenario (same data shards, graph,
Metropolis-Hastings matrix and peer identities for a seed), writes each peer's key and one shared
`peer.toml` (the scenario's training keys) into the run folder, and starts
`python -m p2pfl.cli peer` once per peer with its shard `i/N`, a loopback port, and its graph
neighbours as full multiaddrs: every edge is dialled directly (nothing waits on peer exchange), and
`--min-neighbors` = its degree makes round 0 start together. A fixed overlay makes the peers mix
with Metropolis-Hastings weights (degrees come in the hello), so a run without faults computes what
the in-process engine computes. The ports are reserved for the whole run by sockets this process
holds bound (SO_REUSEPORT, never listening): no other program is given them, and a restarted peer
comes back on the same address, where its neighbours' periodic hellos find it.

The parent never talks to the peers. It tails their metrics.jsonl files (polling: there is no
cross-process event to wait on), copies each event into the run's metrics.jsonl with the peer's
index in `peer` (as the in-process engine writes it), drives the progress callback (slowest peer's
round, mean accuracy), and runs the faults: `kill` SIGKILLs a peer by PID once it reports round
`at_round` and, after `restart_after_s`, restarts it with `--resume` on its folder (checkpoints are
atomic, so that is its last completed round; an attacker, which keeps none, restarts fresh and catches
up to its neighbours' round); `delay` gives a peer the transport's `--delay-ms`.
With `attack`/`attackers`, the peers `choose_attackers` picks (as the in-process engine does) run with
`--attack` and the other attackers as `--colluders`: real liars in their local view, over real TCP.
They are not evaluated and keep no checkpoint; honest accuracy and consensus cover the others.
When every process has exited, the peers' summaries become one summary.json with the in-process
engine's keys. Processes are stopped by PID only: on an error, a timeout or Ctrl-C, SIGTERM (the
peer writes its checkpoint and exits 0), then SIGKILL after a grace period.

Fault specs are parsed in faults.py (scenario.py checks them while it builds a Scenario); the peer
processes themselves (settings file, reserved ports, the fleet that starts, tails, kills and restarts
them) are fleet.py.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.files import MetricsLog, save_identity, write_json
from p2pfl.gossip.topology import neighbors, spectral_gap
from p2pfl.peers.preflight import make_out_dir
from p2pfl.sim import cast as attacks
from p2pfl.sim.cast import choose_attackers
from p2pfl.sim.engine import Setup, centralized_reference
from p2pfl.sim.faults import delays
from p2pfl.sim.fleet import (
    POLL_S,
    STARTUP_S,
    Fleet,
    PeerFailed,
    PeerProcess,
    Progress,
    Tail,
    peer_settings,
    reserve_port,
    toml_text,
)
from p2pfl.sim.results import accuracy_table, consensus_distance, plot_accuracy, read_events
from p2pfl.sim.scenario import Scenario


# -- the run ----------------------------------------------------------------------------------------
def run(scenario: Scenario, out_dir: str | Path, progress: Progress | None = None, *,
        timeout_s: float | None = None, setup: Setup | None = None) -> dict[str, Any]:
    """Run `scenario` as real peer processes; write metrics.jsonl, summary.json, accuracy.png,
    consensus.png to `out_dir` (and one folder per peer). `timeout_s` bounds the whole run (PeerFailed
    past it); `setup`: `Setup.build(scenario)` when the caller built it already."""

    s = scenario
    out = make_out_dir(out_dir)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    wall = time.perf_counter()
    setup = setup or Setup.build(s)
    byzantine = choose_attackers(s.attackers, s.peers, s.seed) if s.attack != "none" else []   # as engine.run
    log = MetricsLog(out / "metrics.jsonl")
    log.write({"kind": "run", "round": -1, "name": s.name, "scenario": s.to_dict(),
               "honest": [i for i in range(s.peers) if i not in byzantine], "byzantine": byzantine,
               "attack": s.attack, "spectral_gap": spectral_gap(setup.W),
               "peer_ids": [ident.peer_id for ident in setup.identities], "engine": "procs"})
    ports = [reserve_port() for _ in range(s.peers)]
    fleet = Fleet(s, out, _peers(s, out, setup, [sock.getsockname()[1] for sock in ports], byzantine), log,
                   progress)
    stall_s = STARTUP_S + 4 * s.step_timeout_s * s.gossip_steps + 60
    on_term = _terminate_as_interrupt()
    try:
        for p in fleet.peers:
            fleet.spawn(p, restart=False)
        fleet._report()
        while fleet.step():
            now = time.monotonic()
            if timeout_s is not None and now - fleet.started > timeout_s:
                raise PeerFailed(f"procs run: not done after {timeout_s:g} s (timeout); peer folders in {out}")
            waiting = any(p.restart_at is not None for p in fleet.peers)
            if now - fleet.last_event > stall_s and not waiting:
                raise PeerFailed(f"procs run: no peer reported anything for {stall_s:g} s; see {out}/peer-*/peer.log")
            time.sleep(POLL_S)   # polling other processes' files: there is no event to wait on
        fleet.step()             # the last lines of peers that just exited
        fleet.note = "all peers exited"
        fleet._report()
    except BaseException:
        log.close()
        raise
    finally:
        fleet.stop()
        for sock in ports:
            sock.close()
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    central = _centralized(setup) if s.centralized else []
    return _finish(s, out, setup, fleet, log, central, wall)


def _terminate_as_interrupt() -> Any:
    """SIGTERM to this process raises KeyboardInterrupt while the run lasts, so the peers are still
    stopped (not orphaned). Returns the handler to restore (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"{signal.Signals(signum).name}")
    return signal.signal(signal.SIGTERM, interrupt)


def _attack_argv(s: Scenario, ids: list[str], byzantine: list[int], i: int) -> list[str]:
    """The flags that make peer i an attacker (local view: it knows its colluders, not the graph)."""
    params = dict(s.attack_params)
    if isinstance(params.get("peer"), int):   # mimic: a scenario names a peer index, a real peer an ID
        params["peer"] = ids[params["peer"]]
    argv = ["--attack", s.attack] + (["--attack-params", json.dumps(params)] if params else [])
    others = [ids[j] for j in byzantine if j != i]
    return argv + (["--colluders", ",".join(others)] if others else [])


def _peers(s: Scenario, out: Path, setup: Setup, ports: list[int],
           byzantine: tuple[int, ...] | list[int] = ()) -> list[PeerProcess]:
    """Each peer's folder (its key saved there), and its command: shard, port, neighbours' multiaddrs,
    and for the `byzantine` ones the attack flags."""

    nbrs = neighbors(setup.adjacency)
    ids = [ident.peer_id for ident in setup.identities]
    addrs = [f"/ip4/127.0.0.1/tcp/{port}" for port in ports]
    delay = delays(s)
    (out / "peer.toml").write_text("# written by `p2pfl sim --engine procs`: the keys every peer shares\n"
                                   + toml_text(peer_settings(s)))
    peers = []
    for i, ident in enumerate(setup.identities):
        d = out / f"peer-{i}"
        d.mkdir(exist_ok=True)
        for name in ("metrics.jsonl", "summary.json", "checkpoint.pt"):
            (d / name).unlink(missing_ok=True)
        save_identity(ident, d / "peer.key")
        argv = [sys.executable, "-m", "p2pfl.cli", "peer", "--config", str(out / "peer.toml"), "--out", str(d),
                "--key", str(d / "peer.key"), "--shard", f"{i}/{s.peers}", "--listen", addrs[i],
                "--neighbors", ",".join(f"{addrs[j]}/p2p/{ids[j]}" for j in nbrs[i])]
        if i in delay:
            argv += ["--delay-ms", f"{delay[i]:g}"]
        if i in byzantine:
            argv += _attack_argv(s, ids, list(byzantine), i)
        peers.append(PeerProcess(i, d, argv, nbrs[i], Tail(d / "metrics.jsonl"), byzantine=i in byzantine))
    return peers


def _centralized(setup: Setup) -> list[float]:
    """The engine's centralized reference, on one torch thread as the engine runs it (more only spin)."""
    import torch


    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return centralized_reference(setup)
    finally:
        torch.set_num_threads(threads)


def _consensus(dirs: list[Path]) -> float:
    """(1/n) sum_i ||x_i - x_bar||^2 over the peers' final checkpoints (their models after the last round)."""
    import torch

    vectors = []
    for d in dirs:
        state = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
        vectors.append(torch.cat([v.flatten().float() for _, v in sorted(state.items()) if v.is_floating_point()]))
    return consensus_distance(torch.stack(vectors)) if len(vectors) >= 2 else math.nan


def _totals(peers: list[PeerProcess]) -> tuple[int, dict[str, int]]:
    """Bytes sent and frames rejected, summed over every process of every peer (a killed process
    counts up to its last round event; a process that exited cleanly, up to its summary)."""
    bytes_sent, rejected = 0, dict[str, int]()
    for p in peers:
        summary_path = p.dir / "summary.json"
        if summary_path.exists() and p.lives:
            last = json.loads(summary_path.read_text())
            p.lives[-1] = {"bytes_sent": last["bytes_sent"], "rejected": last["rejected"]}
        for life in p.lives:
            bytes_sent += life["bytes_sent"]
            for reason, n in life["rejected"].items():
                rejected[reason] = rejected.get(reason, 0) + n
    return bytes_sent, rejected


def _finish(s: Scenario, out: Path, setup: Setup, fleet: Fleet, log: MetricsLog, central: list[float],
            wall: float) -> dict[str, Any]:

    peers = fleet.peers
    good = [p for p in peers if not p.byzantine]     # honest accuracy and consensus are over these only
    byzantine = [p.index for p in peers if p.byzantine]
    finished = [p for p in good if p.done == s.rounds and (p.dir / "checkpoint.pt").exists()]
    bytes_sent, _ = _totals(peers)
    _, rejected = _totals(good)                      # as the in-process engine: what honest peers refused
    accs = [p.final_accuracy for p in good if p.final_accuracy is not None] or \
           [p.accuracy for p in good if p.accuracy is not None]
    honest = {"mean": float(np.mean(accs)), "min": float(np.min(accs)), "max": float(np.max(accs))} if accs else \
             {"mean": None, "min": None, "max": None}
    distance = _consensus([p.dir for p in finished])
    log.write({"kind": "consensus", "round": s.rounds - 1, "distance": distance,
               **({f"accuracy_{k}": v for k, v in honest.items()} if accs else {})})
    for t, acc in enumerate(central):
        log.write({"kind": "centralized", "round": t, "accuracy": acc})
    log.close()
    table = accuracy_table(read_events(out), {p.index for p in good})
    if table["rounds"]:
        plot_accuracy(table, out / "accuracy.png", f"{s.name}: {s.peers} peer processes" +
                      (f", honest peers ({len(byzantine)} {s.attack} attackers)" if byzantine else ""))
    rounds_run = sum(1 for e in read_events(out) if e.get("kind") == "round")
    up = fleet.all_up
    training = (fleet.last_round or 0.0) - up if up is not None else 0.0
    summary = {
        "name": s.name, "engine": "procs", "peers": s.peers, "rounds": s.rounds, "seed": s.seed,
        "topology": s.topology, "dataset": s.dataset, "partition": s.partition, "aggregator": s.aggregator,
        "metric": s.metric, "algorithm": s.algorithm_name, "gossip_steps": s.gossip_steps, **s.local_update(),
        "spectral_gap": spectral_gap(setup.W),
        "honest_accuracy": honest,
        "centralized_accuracy": central[-1] if central else None,
        "consensus_distance": distance,
        "bytes_sent": bytes_sent,
        "bytes_per_peer_round": bytes_sent / (s.peers * s.rounds),
        "wall_s": time.perf_counter() - wall,
        # from every peer up (listening) to the last round: startup (importing torch) is startup_s
        "peer_rounds_per_s": rounds_run / training if training > 0 else math.nan,
        "train_s": training,
        "startup_s": up - fleet.started if up is not None else None,
        "rejected": rejected,
        "per_peer_accuracy": [p.accuracy for p in peers],
        "rounds_done": [p.done for p in peers],
        "interrupted": False,   # an interrupted procs run stops its peers and writes no summary
        "faults": fleet.faults,
        "attack": s.attack, "attack_params": dict(s.attack_params), "attackers": len(byzantine),
        "byzantine": byzantine,
        "byzantine_neighbors": attacks.byzantine_neighbors(neighbors(setup.adjacency), byzantine),
    }
    write_json(out / "summary.json", summary)
    return summary
