"""WAN test bed: real `p2pfl peer` processes in network namespaces joined by an emulated WAN.

    sudo python bench/wan.py --quick            # baseline + the issue's 4 settings, 1.2 MB model (MLP 512,512)
    sudo python bench/wan.py --quick --all      # + both loss-free links under Reno, + f16 frames on loss/Reno
    sudo python bench/wan.py                    # the issue's 17 MB model (MLP 2048,2048): slow

Theory of operation
-------------------
Per setting: N namespaces (p2pfl.testing.netns), each with one tun device whose other end is held by
`wanlink` (bench/wanlink.c, compiled here with the system C compiler): a userspace router that
gives every peer's uplink a rate (drop-tail queue of one bandwidth-delay product), a one-way delay
and a random loss, the same both ways. This kernel has no netem and no NFQUEUE tooling, so the
emulator is ours. The congestion control is set per namespace (sysctl). Then N real peers run
`python -m p2pfl.cli peer --listen /ip4/0.0.0.0/tcp/4001` (peer 0 is everyone's bootstrap) for R
rounds; the bench times each peer's "round k/R done" lines as they are printed, and reads
summary.json and metrics.jsonl at the end. Everything is torn down in `finally` (peers stopped by
PID, the emulator by PID, namespaces deleted), also on Ctrl-C or SIGTERM.

One JSON line per setting: setting, delay_ms (one way; RTT is twice it), loss (per packet, each
direction), rate_mbit (each peer's uplink), cc, frame_bytes, peers, rounds_done (the least over the
peers), frames_missing (over all peers and rounds), round_s_median (median over peers and rounds of
the time between consecutive round lines), ideal_round_s (the baseline's round time, i.e. compute
with a free network, plus degree x frame_bytes over the uplink rate) and accuracy_mean.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2pfl.files import save_identity  # noqa: E402
from p2pfl.gossip.identity import Identity  # noqa: E402
from p2pfl.testing.netns import Namespaces, why_not  # noqa: E402

PORT = 4001


@dataclass
class Setting:
    name: str
    delay_ms: float = 0.0        # one way
    loss: float = 0.0
    rate_mbit: float = 0.0       # 0: unlimited
    cc: str = "default"
    peer_args: list[str] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)   # per namespace, e.g. slow start after idle off


ISSUE_SETTINGS = ("baseline", "rtt100_100mbit", "rtt100_100mbit_loss1", "rtt100_100mbit_loss1_reno", "rtt300_20mbit")


def settings(every: bool) -> list[Setting]:
    """The baseline and the issue's four settings; with `every`, also the other two links under
    Reno, half-precision frames on the lossy Reno link, and the loss-free links with the congestion
    window kept across the idle time between rounds (option rows)."""
    links = [("rtt100_100mbit", 50, 0.0, 100), ("rtt100_100mbit_loss1", 50, 0.01, 100), ("rtt300_20mbit", 150, 0.0, 20)]
    rows = [Setting("baseline")]
    for cc in ("default", "reno"):
        rows += [Setting(name if cc == "default" else f"{name}_reno", d, loss, rate, cc) for name, d, loss, rate in links]
    rows.append(Setting("rtt100_100mbit_loss1_reno_f16", 50, 0.01, 100, "reno",
                        ["--algorithm-params", '{"wire_dtype": "f16"}']))
    idle = {"net.ipv4.tcp_slow_start_after_idle": "0"}   # keep the window between rounds (an operator's sysctl)
    rows += [Setting("rtt100_100mbit_keepcwnd", 50, 0.0, 100, sysctls=idle),
             Setting("rtt300_20mbit_keepcwnd", 150, 0.0, 20, sysctls=idle)]
    return rows if every else [r for r in rows if r.name in ISSUE_SETTINGS]


def build_wanlink(tmp: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise SystemExit("bench/wan.py: no C compiler (cc, gcc or clang) to build the link emulator bench/wanlink.c")
    exe = tmp / "wanlink"
    subprocess.run([cc, "-O2", "-o", str(exe), str(ROOT / "bench" / "wanlink.c")], check=True)
    return exe


def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, wait_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_setting(st: Setting, a: argparse.Namespace, wanlink: Path, tmp: Path, baseline_s: float | None) -> dict[str, Any]:
    n = a.peers
    out = tmp / st.name
    out.mkdir()
    keys = []
    for i in range(n):
        ident = Identity.generate(bytes([i + 1]) * 32)
        save_identity(ident, out / f"peer{i}.key")
        keys.append(ident.peer_id)
    procs: list[subprocess.Popen[Any]] = []
    link: subprocess.Popen[Any] | None = None
    stamps: list[list[float]] = [[] for _ in range(n)]
    prefix = f"p2w{os.getpid() % 10000}"
    with Namespaces(f"{prefix}n", n, subnet=a.subnet) as ns:
        try:
            rate_kbit = int(st.rate_mbit * 1000)
            bdp = int(st.rate_mbit * 1e6 / 8 * 2 * st.delay_ms / 1000) if st.rate_mbit else 0
            link = subprocess.Popen([str(wanlink), f"{prefix}t", str(n), str(int(st.delay_ms * 1000)),
                                     str(int(st.loss * 1e6)), str(rate_kbit), str(max(bdp, 64 * 1500)), "1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert link.stdout is not None
            if link.stdout.readline().strip() != "ready":
                raise RuntimeError(f"wanlink did not start: {link.stderr.read() if link.stderr else ''}")
            cc = st.cc
            for i in range(n):
                ns.adopt_tun(i, f"{prefix}t{i}")
                if cc != "default" and not ns.sysctl(i, "net.ipv4.tcp_congestion_control", cc):
                    cc = f"{cc} (refused: kept the default)"
                for key, value in st.sysctls.items():
                    if not ns.sysctl(i, key, value):
                        raise RuntimeError(f"sysctl {key}={value} refused in the namespace")
            if st.cc == "default":
                cc = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip() + " (default)"
            env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
            boot = f"/ip4/{ns.address(0)}/tcp/{PORT}/p2p/{keys[0]}"
            for i in range(n):
                argv = [sys.executable, "-m", "p2pfl.cli", "peer", "--listen", f"/ip4/0.0.0.0/tcp/{PORT}",
                        "--key", str(out / f"peer{i}.key"), "--out", str(out / f"peer{i}"),
                        "--shard", f"{i}/{n}", "--rounds", str(a.rounds), "--dataset", a.dataset,
                        "--model", "mlp", "--hidden", a.hidden, "--seed", "0", "--threads", "1",
                        "--device", "cpu", "--degree", str(n - 1), "--min-neighbors", str(n - 1),
                        "--start-timeout", "120", "--step-timeout", str(a.step_timeout), *st.peer_args]
                if i:
                    argv += ["--bootstrap", boot]
                procs.append(subprocess.Popen(ns.exec_argv(i, argv), stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True, env=env, cwd=str(out)))
            logs: list[list[str]] = [[] for _ in range(n)]

            def pump(i: int, p: subprocess.Popen[Any]) -> None:
                assert p.stdout is not None
                for line in p.stdout:
                    logs[i].append(line.rstrip())
                    if line.startswith("round ") and " done" in line:
                        stamps[i].append(time.monotonic())

            readers = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
            for r in readers:
                r.start()
            deadline = time.monotonic() + a.setting_timeout
            for p in procs:
                try:
                    p.wait(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
            timed_out = any(p.poll() is None for p in procs)
        finally:
            for p in procs:
                _stop(p)
            if link is not None:
                _stop(link)
        for r in readers:
            r.join(5)
    link_stats = link.stderr.read().strip() if link is not None and link.stderr else ""
    return _row(st, a, out, stamps, cc, baseline_s, timed_out, link_stats, logs)


def _row(st: Setting, a: argparse.Namespace, out: Path, stamps: list[list[float]], cc: str,
         baseline_s: float | None, timed_out: bool, link_stats: str, logs: list[list[str]]) -> dict[str, Any]:
    n = a.peers
    summaries, missing = [], 0
    for i in range(n):
        try:
            summaries.append(json.loads((out / f"peer{i}" / "summary.json").read_text()))
        except (OSError, ValueError):
            summaries.append({})
        try:
            for line in (out / f"peer{i}" / "metrics.jsonl").read_text().splitlines():
                ev = json.loads(line)
                if ev.get("kind") == "round":
                    missing += len(ev.get("missing", []))
        except (OSError, ValueError):
            pass
    intervals = [t1 - t0 for s in stamps for t0, t1 in itertools.pairwise(s)]
    sent = [(s.get("bytes_sent", 0), s.get("frames_sent", 0)) for s in summaries]
    frame_bytes = round(sum(b for b, _ in sent) / max(1, sum(f for _, f in sent)))
    accs = [s["accuracy"] for s in summaries if s.get("accuracy") is not None]
    round_s = statistics.median(intervals) if intervals else None
    ideal = None
    if baseline_s is not None:
        ideal = baseline_s + ((n - 1) * frame_bytes * 8 / (st.rate_mbit * 1e6) if st.rate_mbit else 0.0)
    row = {"setting": st.name, "delay_ms": st.delay_ms, "loss": st.loss, "rate_mbit": st.rate_mbit, "cc": cc,
           "frame_bytes": frame_bytes, "peers": n, "rounds_done": min((s.get("rounds_done", 0) for s in summaries), default=0),
           "frames_missing": missing, "round_s_median": round(round_s, 2) if round_s else None,
           "ideal_round_s": round(ideal, 2) if ideal is not None else None,
           "ratio": round(round_s / ideal, 2) if round_s and ideal else None,
           "accuracy_mean": round(statistics.mean(accs), 4) if accs else None,
           "send_failures": sum(s.get("send_failures", 0) for s in summaries),
           "peer_args": st.peer_args, "sysctls": st.sysctls, "timed_out": timed_out, "wanlink": link_stats}
    if a.verbose or timed_out or row["rounds_done"] < a.rounds:
        for i, lines in enumerate(logs):
            print(f"--- peer {i} (last lines)", *lines[-8:], sep="\n  ", file=sys.stderr)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 1.2 MB model (MLP 512,512) instead of 17 MB")
    p.add_argument("--all", action="store_true", help="also the Reno rows of the loss-free links, the f16 row and "
                                                      "the rows with slow start after idle off")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hidden", default=None, help="MLP widths (quick: 512,512 = 1.2 MB; else 2048,2048 = 17 MB)")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--step-timeout", type=float, default=30.0)
    p.add_argument("--setting-timeout", type=float, default=None, help="seconds per setting before giving up")
    p.add_argument("--only", default=None, help="comma-separated setting names to run (baseline always runs)")
    p.add_argument("--subnet", default="10.79.0")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    a.hidden = a.hidden or ("512,512" if a.quick else "2048,2048")
    a.setting_timeout = a.setting_timeout or (150.0 if a.quick else 600.0)
    reason = why_not()
    if reason is None and not Path("/dev/net/tun").exists():
        reason = "no /dev/net/tun (the link emulator needs tun devices)"
    if reason is not None:
        print(f"bench/wan.py cannot run here: {reason}", file=sys.stderr)
        return 2
    rows = settings(a.all)
    if a.only:
        keep = set(a.only.split(","))
        rows = [s for s in rows if s.name == "baseline" or s.name in keep]

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    with tempfile.TemporaryDirectory(prefix="p2pfl-wan-") as tmpdir:
        tmp = Path(tmpdir)
        wanlink = build_wanlink(tmp)
        baseline_s = None
        try:
            for st in rows:
                row = run_setting(st, a, wanlink, tmp, baseline_s)
                if st.name == "baseline":
                    baseline_s = row["round_s_median"]
                print(json.dumps(row), flush=True)
        except KeyboardInterrupt:
            print("bench/wan.py: interrupted; namespaces and processes torn down", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
