"""A small mesh of real `p2pfl peer` processes in network namespaces on a private bridge, each
listening on /ip4/0.0.0.0: every peer must advertise its bridge address before loopback, and the
peers that only know the bootstrap must find each other through peer exchange (the full mesh).
Root on Linux only; skipped with the reason elsewhere. Peers are stopped by PID, the namespaces and
the bridge deleted, whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.files import save_identity
from p2pfl.gossip.identity import Identity
from p2pfl.testing.netns import Namespaces, why_not

ROOT = Path(__file__).resolve().parents[1]
PEERS = 3
LIMIT_S = 240


@pytest.mark.slow
def test_a_namespaced_mesh_of_wildcard_listeners_forms_in_full(tmp_path):
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    tag = os.getpid() % 100000
    ids = []
    for i in range(PEERS):
        ident = Identity.generate(bytes([i + 40]) * 32)
        save_identity(ident, tmp_path / f"k{i}")
        ids.append(ident.peer_id)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[str]] = []
    with Namespaces(f"p2m{tag}n", PEERS, subnet="10.81.0") as ns:
        ns.bridge(f"p2m{tag}b")
        try:
            for i in range(PEERS):
                argv = [sys.executable, "-m", "p2pfl.cli", "peer", "--listen", "/ip4/0.0.0.0/tcp/4001",
                        "--key", str(tmp_path / f"k{i}"), "--out", str(tmp_path / f"p{i}"), "--shard", f"{i}/{PEERS}",
                        "--rounds", "2", "--dataset", "digits", "--hidden", "16", "--device", "cpu", "--threads", "1",
                        "--degree", str(PEERS - 1), "--min-neighbors", str(PEERS - 1), "--start-timeout", "90",
                        "--step-timeout", "30"]
                if i:
                    argv += ["--bootstrap", f"/ip4/{ns.address(0)}/tcp/4001/p2p/{ids[0]}"]
                procs.append(subprocess.Popen(ns.exec_argv(i, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True, env=env))
            outputs = [p.communicate(timeout=LIMIT_S)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, out
        listening = [line.split()[-1] for line in out.splitlines() if line.startswith("listening on ")]
        hosts = [a.split("/")[2] for a in listening]
        assert hosts[0] == ns.address(i) and hosts[-1] == "127.0.0.1", listening   # printed, loopback last
        summary = json.loads((tmp_path / f"p{i}" / "summary.json").read_text())
        assert summary["rounds_done"] == 2
        assert summary["neighbors"] == sorted(set(ids) - {ids[i]}), out    # the full mesh
