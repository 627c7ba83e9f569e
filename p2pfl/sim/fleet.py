"""The peer processes of a multi-process run: their settings file, their reserved ports, and the
fleet that starts, watches, kills and restarts them (the procs engine's moving parts; `procs.run`
drives them).

Theory of operation: see `p2pfl.sim.procs`. The fleet never talks to the peers: it tails their
metrics.jsonl files (polling: there is no cross-process event to wait on) and runs the faults by
PID. Processes are stopped by PID only: SIGTERM (the peer writes its checkpoint and exits 0), then
SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.errors import P2PFLError
from p2pfl.files import MetricsLog
from p2pfl.sim.faults import Kill, kills
from p2pfl.sim.scenario import Scenario

Progress = Callable[[int, dict[str, Any]], None]

POLL_S = 0.1           # how often the metrics files are read
GRACE_S = 10.0         # SIGTERM -> SIGKILL
STARTUP_S = 120.0      # every peer up and linked to all its neighbours (importing torch is slow)


class PeerFailed(P2PFLError):
    """A peer process exited with an error, or the run made no progress for too long."""


def reserve_port() -> socket.socket:
    """A bound, never-listening loopback socket: the port is ours until it is closed; a peer that
    listens on it with SO_REUSEPORT (as py-libp2p does) gets every connection."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def toml_text(values: dict[str, Any]) -> str:
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
    if s.backbone is not None:
        shared["backbone"] = str(Path(s.backbone).resolve())
    return {**shared, "step_timeout": s.step_timeout_s, "device": "cpu", "threads": 1,
            "start_timeout": STARTUP_S, "delay_ms": s.latency_ms}


class Tail:
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
class PeerProcess:
    index: int
    dir: Path
    argv: list[str]                      # the command without --min-neighbors/--start-timeout/--resume
    neighbors: list[int]
    tail: Tail
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


class Fleet:
    """The peer processes of one run, their faults, and the run's merged metrics."""

    def __init__(self, s: Scenario, out: Path, peers: list[PeerProcess], log: MetricsLog, progress: Progress | None) -> None:
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

    def command(self, p: PeerProcess, *, restart: bool) -> list[str]:
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
    def resumes(p: PeerProcess) -> bool:
        """Whether a restart of p resumes from a checkpoint (an honest peer that has written one)."""
        return not p.byzantine and (p.dir / "checkpoint.pt").exists()

    def spawn(self, p: PeerProcess, *, restart: bool) -> None:
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

    def _record(self, p: PeerProcess, e: dict[str, Any]) -> bool:
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

    def _kill(self, p: PeerProcess, k: Kill, at: int) -> bool:
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
