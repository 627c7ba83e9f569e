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

Fault specs are parsed in faults.py (scenario.py checks them while it builds a Scenario).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.errors import P2PFLError
from p2pfl.files import MetricsLog, save_identity, write_json
from p2pfl.gossip.topology import neighbors, spectral_gap
from p2pfl.sim import cast as attacks
from p2pfl.sim.cast import choose_attackers
from p2pfl.sim.engine import Setup, centralized_reference
from p2pfl.sim.faults import Kill, delays, kills
from p2pfl.sim.results import accuracy_table, consensus_distance, plot_accuracy, read_events
from p2pfl.sim.scenario import Scenario

Progress = Callable[[int, dict[str, Any]], None]

POLL_S = 0.1           # how often the metrics files are read
GRACE_S = 10.0         # SIGTERM -> SIGKILL
STARTUP_S = 120.0      # every peer up and linked to all its neighbours (importing torch is slow)


class PeerFailed(P2PFLError):
    """A peer process exited with an error, or the run made no progress for too long."""


# -- peer processes ---------------------------------------------------------------------------------
def _reserve_port() -> socket.socket:
    """A bound, never-listening loopback socket: the port is ours until it is closed; a peer that
    listens on it with SO_REUSEPORT (as py-libp2p does) gets every connection."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _toml(values: dict[str, Any]) -> str:
    def lit(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {lit(x)}" for k, x in v.items()) + "}"
        return "[" + ", ".join(lit(x) for x in v) + "]"
    return "".join(f"{k} = {lit(v)}\n" for k, v in values.items() if v is not None)


def peer_settings(s: Scenario) -> dict[str, Any]:
    """The `p2pfl peer` keys every peer of the run shares (peer.toml): the scenario's shared keys as
    given (the attack goes only to the attackers, as flags: see _attack_argv), and the run's own."""
    shared = {k: v for k, v in s.shared().items() if k not in ("attack", "attack_params")}
    # a plugin file is named relative to where the scenario was run: the peers start elsewhere
    shared["plugins"] = [str(Path(p).resolve()) if p.endswith(".py") else p for p in s.plugins]
    return {**shared, "step_timeout": s.step_timeout_s, "device": "cpu", "threads": 1,
            "start_timeout": STARTUP_S, "delay_ms": s.latency_ms}


class _Tail:
    """The complete new lines of a JSON-lines file another process appends to."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def events(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [json.loads(ln) for ln in lines if ln.strip()]

    def drop_partial(self) -> None:
        """After a SIGKILL: a torn last line is never completed (the next process appends after it)."""
        self.partial = b""


@dataclass
class _Peer:
    index: int
    dir: Path
    argv: list[str]                      # the command without --min-neighbors/--start-timeout/--resume
    neighbors: list[int]
    tail: _Tail
    proc: subprocess.Popen[bytes] | None = None
    done: int = 0                        # rounds completed (last round event + 1)
    accuracy: float | None = None        # last reported
    final_accuracy: float | None = None  # reported for the last round
    lives: list[dict[str, Any]] = field(default_factory=list)   # per process: last bytes_sent, rejected
    killed: bool = False                 # the current process was SIGKILLed by us
    byzantine: bool = False              # runs `--attack`: not evaluated, no checkpoint
    restart_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            return (self.dir / "peer.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""


class _Fleet:
    """The peer processes of one run, their faults, and the run's merged metrics."""

    def __init__(self, s: Scenario, out: Path, peers: list[_Peer], log: MetricsLog, progress: Progress | None) -> None:
        self.s, self.out, self.peers, self.log, self.progress = s, out, peers, log, progress
        self.kills = kills(s)
        self.fired: set[int] = set()
        self.faults: list[dict[str, Any]] = []
        self.note = "starting"
        self.started = self.last_event = time.monotonic()
        self.all_up: float | None = None          # when every peer had reported its first start
        self.last_round: float | None = None      # when the last round event arrived
        pkg_root = str(Path(__file__).resolve().parents[2])
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)}

    def command(self, p: _Peer, *, restart: bool) -> list[str]:
        """Peer p's command line: its argv, and for a restart, the neighbours to wait for and the
        checkpoint to resume from. An attacker keeps none (and `--resume` with `--attack` is refused):
        it restarts fresh at round 0 and the node's catch-up jumps it to its neighbours' round."""
        args = list(p.argv)
        if restart:   # wait for the neighbours that are up now, not for ones that may never come back
            up = sum(1 for j in p.neighbors if self.peers[j].alive)
            args += ["--min-neighbors", str(up), "--start-timeout", f"{2 * self.s.step_timeout_s + 10:g}"]
            if self.resumes(p):
                args += ["--resume", str(p.dir)]
        else:
            args += ["--min-neighbors", str(len(p.neighbors))]
        return args

    @staticmethod
    def resumes(p: _Peer) -> bool:
        """Whether a restart of p resumes from a checkpoint (an honest peer that has written one)."""
        return not p.byzantine and (p.dir / "checkpoint.pt").exists()

    def spawn(self, p: _Peer, *, restart: bool) -> None:
        args = self.command(p, restart=restart)
        with open(p.dir / "peer.log", "ab") as fh:
            p.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                      env=self.env)
        p.killed, p.restart_at = False, None

    def step(self) -> bool:
        """Read new events, fire faults, restart peers; False once every process is done."""
        changed = False
        for p in self.peers:
            queue = p.tail.events()
            while queue:
                changed = True
                if self._record(p, queue.pop(0)):      # it was just killed: take what it wrote last
                    queue += p.tail.events()
                    p.tail.drop_partial()
            if p.proc is not None and not p.killed and p.proc.poll() not in (None, 0):
                raise PeerFailed(f"peer {p.index} exited with status {p.proc.returncode}; "
                                 f"{p.dir}/peer.log ends with:\n{p.log_tail()}")
            if p.restart_at is not None and time.monotonic() >= p.restart_at:
                self.spawn(p, restart=True)
                self._fault({"fault": "restart", "peer": p.index, "pid": p.proc.pid if p.proc else None,
                             "from_checkpoint": self.resumes(p)},
                            f"peer {p.index} restarted")
                changed = True
        if changed:
            self.last_event = time.monotonic()
            self.log.flush()
            self._report()
        return any(p.alive or p.restart_at is not None for p in self.peers)

    def _record(self, p: _Peer, e: dict[str, Any]) -> bool:
        """Log one event of peer p and act on it; True if that killed p."""
        self.log.write({**e, "peer": p.index})
        if e.get("kind") == "start":
            p.lives.append({"bytes_sent": 0, "rejected": {}})
            if self.all_up is None and all(q.lives for q in self.peers):
                self.all_up = time.monotonic()
        elif e.get("kind") == "round":
            p.done = max(p.done, e["round"] + 1)
            self.last_round = time.monotonic()
            self.note = "training" if self.note == "starting" else self.note
            if p.lives:
                p.lives[-1] = {"bytes_sent": e.get("bytes_sent", 0), "rejected": e.get("rejected", {})}
            if "accuracy" in e:
                p.accuracy = e["accuracy"]
                if e["round"] == self.s.rounds - 1:
                    p.final_accuracy = e["accuracy"]
            for n, k in enumerate(self.kills):
                if n not in self.fired and k.peer == p.index and e["round"] >= k.at_round and not p.killed:
                    self.fired.add(n)
                    return self._kill(p, k, e["round"])
        return False

    def _kill(self, p: _Peer, k: Kill, at: int) -> bool:
        if not p.alive:
            self._fault({"fault": "kill", "peer": p.index, "round": at, "skipped": "the peer had exited"},
                        f"peer {p.index} had exited: kill skipped")
            return False
        assert p.proc is not None
        pid = p.proc.pid
        p.proc.kill()                    # SIGKILL to this PID only
        p.proc.wait(timeout=GRACE_S)
        p.killed = True
        if k.restart_after_s is not None:
            p.restart_at = time.monotonic() + k.restart_after_s
        self._fault({"fault": "kill", "peer": p.index, "round": at, "pid": pid, "restart_after_s": k.restart_after_s},
                    f"peer {p.index} killed after reporting round {at}"
                    + (f", restart in {k.restart_after_s:g} s" if k.restart_after_s is not None else ""))
        return True

    def _fault(self, record: dict[str, Any], note: str) -> None:
        record = {"kind": "fault", **record, "t": round(time.monotonic() - self.started, 3)}
        self.faults.append(record)
        self.log.write(record)
        self.log.flush()
        self.note = note

    def _report(self) -> None:
        if self.progress is None:
            return
        running = [p for p in self.peers if p.alive or p.restart_at is not None]
        slowest = min((p.done for p in running), default=min(p.done for p in self.peers))
        accs = [p.accuracy for p in self.peers if p.accuracy is not None]
        info: dict[str, Any] = {"note": f"{sum(p.alive for p in self.peers)}/{len(self.peers)} up · {self.note}"}
        if accs:
            info["accuracy_mean"] = float(np.mean(accs))
        self.progress(slowest - 1, info)

    def stop(self) -> None:
        """SIGTERM every live peer (checkpoint, exit 0), SIGKILL what is left after GRACE_S; by PID."""
        live = [p.proc for p in self.peers if p.proc is not None and p.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=GRACE_S)


# -- the run ----------------------------------------------------------------------------------------
def run(scenario: Scenario, out_dir: str | Path, progress: Progress | None = None, *,
        timeout_s: float | None = None) -> dict[str, Any]:
    """Run `scenario` as real peer processes; write metrics.jsonl, summary.json, accuracy.png to
    `out_dir` (and one folder per peer). `timeout_s` bounds the whole run (PeerFailed past it)."""

    s = scenario
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    wall = time.perf_counter()
    setup = Setup.build(s)
    byzantine = choose_attackers(s.attackers, s.peers, s.seed) if s.attack != "none" else []   # as engine.run
    log = MetricsLog(out / "metrics.jsonl")
    log.write({"kind": "run", "round": -1, "name": s.name, "scenario": s.to_dict(),
               "honest": [i for i in range(s.peers) if i not in byzantine], "byzantine": byzantine,
               "attack": s.attack, "spectral_gap": spectral_gap(setup.W),
               "peer_ids": [ident.peer_id for ident in setup.identities], "engine": "procs"})
    ports = [_reserve_port() for _ in range(s.peers)]
    fleet = _Fleet(s, out, _peers(s, out, setup, [sock.getsockname()[1] for sock in ports], byzantine), log,
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
           byzantine: tuple[int, ...] | list[int] = ()) -> list[_Peer]:
    """Each peer's folder (its key saved there), and its command: shard, port, neighbours' multiaddrs,
    and for the `byzantine` ones the attack flags."""

    nbrs = neighbors(setup.adjacency)
    ids = [ident.peer_id for ident in setup.identities]
    addrs = [f"/ip4/127.0.0.1/tcp/{port}" for port in ports]
    delay = delays(s)
    (out / "peer.toml").write_text("# written by `p2pfl sim --engine procs`: the keys every peer shares\n"
                                   + _toml(peer_settings(s)))
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
        peers.append(_Peer(i, d, argv, nbrs[i], _Tail(d / "metrics.jsonl"), byzantine=i in byzantine))
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


def _totals(peers: list[_Peer]) -> tuple[int, dict[str, int]]:
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


def _finish(s: Scenario, out: Path, setup: Setup, fleet: _Fleet, log: MetricsLog, central: list[float],
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
        "algorithm": s.algorithm_name, "gossip_steps": s.gossip_steps, **s.local_update(),
        "spectral_gap": spectral_gap(setup.W),
        "honest_accuracy": honest,
        "centralized_accuracy": central[-1] if central else None,
        "consensus_distance": distance,
        "bytes_sent": bytes_sent,
        "wall_s": time.perf_counter() - wall,
        # from every peer up (listening) to the last round: startup (importing torch) is startup_s
        "peer_rounds_per_s": rounds_run / training if training > 0 else math.nan,
        "startup_s": up - fleet.started if up is not None else None,
        "rejected": rejected,
        "per_peer_accuracy": [p.accuracy for p in peers],
        "rounds_done": [p.done for p in peers],
        "faults": fleet.faults,
        "attack": s.attack, "attack_params": dict(s.attack_params), "attackers": len(byzantine),
        "byzantine": byzantine,
        "byzantine_neighbors": attacks.byzantine_neighbors(neighbors(setup.adjacency), byzantine),
    }
    write_json(out / "summary.json", summary)
    return summary
