"""End to end: real `p2pfl peer` processes on 127.0.0.1 (slow; run in CI).

Processes are started with subprocess, waited on with timeouts, and stopped by PID in a finally.
Waiting for progress reads the peers' own stdout lines ("listening on ...", "round k/R done ..."),
printed once the round's checkpoint is on disk, with a deadline: no sleeps, no polling.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

P2PFL = [sys.executable, "-m", "p2pfl.cli"]
COMMON = ["--listen", "/ip4/127.0.0.1/tcp/0", "--dataset", "digits", "--threads", "1", "--step-timeout", "4",
          "--local-steps", "20", "--lr", "0.2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Peers:
    def __init__(self, tmp: Path, n: int, rounds: int) -> None:
        self.tmp, self.n, self.rounds = tmp, n, rounds
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.lines: dict[int, queue.Queue[str | None]] = {}
        self.out: dict[int, list[str]] = {}
        self.readers: dict[int, threading.Thread] = {}
        self.bootstrap: str | None = None

    def start(self, i: int, *extra: str) -> subprocess.Popen[str]:
        args = [*P2PFL, "peer", *COMMON, "--out", str(self.tmp / f"p{i}"), "--shard", f"{i}/{self.n}",
                "--rounds", str(self.rounds), "--min-neighbors", str(self.n - 1), *extra]
        if self.bootstrap and i != 0:
            args += ["--bootstrap", self.bootstrap]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(self.tmp / f"p{i}.err", "a"), text=True,
                             env=ENV, cwd=Path(__file__).parent.parent)
        self.procs[i] = p
        self.lines[i] = queue.Queue()
        self.out[i] = []
        self.readers[i] = threading.Thread(target=self._read, args=(p, self.lines[i], self.out[i]), daemon=True)
        self.readers[i].start()
        return p

    @staticmethod
    def _read(p: subprocess.Popen[str], lines: queue.Queue[str | None], out: list[str]) -> None:
        for line in p.stdout:     # blocks on the pipe; ends at the child's exit
            out.append(line)
            lines.put(line)
        lines.put(None)

    def next_line(self, i: int, match: Callable[[str], bool], timeout: float, what: str) -> str:
        """The next stdout line of peer i that `match`es (earlier lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines[i].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out waiting for {what}; stderr: {self.err(i)}") from None
            if line is None:
                raise AssertionError(f"peer {i} exited while waiting for {what}; stderr: {self.err(i)}")
            if match(line):
                return line

    def wait_round(self, i: int, k: int, timeout: float) -> None:
        """Until peer i reports round k (1-based) done; its checkpoint for that round is then on disk."""
        self.next_line(i, lambda ln: ln.startswith("round ") and int(ln.split()[1].split("/")[0]) >= k,
                       timeout, f"peer {i} to finish round {k}")

    def ready(self, i: int) -> str:
        line = self.next_line(i, lambda ln: True, 120, f"peer {i} to listen")   # the first line
        assert line.startswith("listening on /ip4/127.0.0.1/tcp/"), (line, self.err(i))
        if i == 0:
            self.bootstrap = line.split()[-1]
        return line

    def start_all(self, extra: dict[int, list[str]] | None = None) -> None:
        extra = extra or {}
        self.start(0, *extra.get(0, []))
        self.ready(0)
        for i in range(1, self.n):   # the others start in parallel: importing torch and libp2p is slow
            self.start(i, *extra.get(i, []))
        for i in range(1, self.n):
            self.ready(i)

    def err(self, i: int) -> str:
        return (self.tmp / f"p{i}.err").read_text()[-3000:]

    def wait(self, i: int, timeout: float) -> str:
        self.procs[i].wait(timeout=timeout)
        self.readers[i].join(timeout=10)
        out = "".join(self.out[i])
        assert self.procs[i].returncode == 0, (out, self.err(i))
        return out

    def summary(self, i: int) -> dict:
        return json.loads((self.tmp / f"p{i}" / "summary.json").read_text())

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()          # by PID: Popen.kill sends SIGKILL to this child only
                p.wait(timeout=10)


def test_four_peers_with_a_bootstrap_address(tmp_path):
    peers = Peers(tmp_path, 4, rounds=3)
    try:
        peers.start_all()
        for i in range(4):
            peers.wait(i, timeout=120)
        for i in range(4):
            s = peers.summary(i)
            assert s["rounds_done"] == 3 and s["rounds_run"] == 3, s
            assert s["accuracy"] > 0.3, s          # 10 classes: chance is 0.1
            assert len(s["neighbors"]) == 3 and s["frames_received"] >= 3 * 3 - 1
    finally:
        peers.stop_all()


def free_port() -> int:
    with socket.socket() as s:    # the OS picks a free port; the peer binds it right after
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_writes_a_checkpoint_and_exits_0_then_resume_continues(tmp_path):
    peers = Peers(tmp_path, 3, rounds=40)
    port = free_port()
    try:
        peers.start_all({2: ["--metrics-port", str(port)]})
        url = peers.next_line(2, lambda ln: ln.startswith("metrics on "), 60, "peer 2's metrics line").split()[-1]
        assert url == f"http://127.0.0.1:{port}/metrics"
        peers.wait_round(2, 2, 60)
        with urllib.request.urlopen(url, timeout=10) as r:   # 38 rounds to go: it is still up
            text = r.read().decode()
        got = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert got["p2pfl_rounds_done"] >= 2 and got["p2pfl_neighbors"] == 2, text
        assert got["p2pfl_frames_received_total"] >= 2 and "p2pfl_accuracy" in got, text
        peers.procs[2].send_signal(signal.SIGTERM)
        out = peers.wait(2, timeout=30)
        assert "SIGTERM" in out
        ck = torch.load(tmp_path / "p2" / "checkpoint.pt", weights_only=True)
        s = peers.summary(2)
        assert s["stopped"] and ck["round"] == s["rounds_done"] >= 2
    finally:
        peers.stop_all()


def test_kill_and_resume(tmp_path):
    rounds = 12
    peers = Peers(tmp_path, 3, rounds=rounds)
    try:
        peers.start_all()
        peers.wait_round(2, 3, 60)    # printed once round 3's checkpoint is on disk
        peers.procs[2].kill()     # SIGKILL mid-training
        peers.procs[2].wait(timeout=10)
        ck = torch.load(tmp_path / "p2" / "checkpoint.pt", weights_only=True)   # never partial
        saved = ck["round"]
        assert saved >= 3
        peers.start(2, "--resume", str(tmp_path / "p2"))
        peers.ready(2)
        for i in range(3):
            peers.wait(i, timeout=180)
        events = [json.loads(ln) for ln in (tmp_path / "p2" / "metrics.jsonl").read_text().splitlines()]
        starts = [e for e in events if e["kind"] == "start"]
        assert len(starts) == 2 and starts[1]["resumed_from"] == saved
        after = [e["round"] for e in events[events.index(starts[1]):] if e["kind"] == "round"]
        assert after and after[0] >= saved          # continues from its checkpoint (or later: caught up)
        for i in range(3):
            s = peers.summary(i)
            assert s["rounds_done"] == rounds, s
            assert s["accuracy"] > 0.3
        assert torch.load(tmp_path / "p2" / "checkpoint.pt", weights_only=True)["round"] == rounds
    finally:
        peers.stop_all()
