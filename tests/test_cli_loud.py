"""Failing loudly, as a user runs it: real processes on loopback, exit codes, one line each. Every
wait reads a process's output (no sleep); every process started here is stopped by its PID."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
LIMIT_S = 120


def start(*args, columns=200, cwd=ROOT):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "p2pfl.cli", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": str(columns), "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})


def run(*args, columns=200, cwd=ROOT):
    p = start(*args, columns=columns, cwd=cwd)
    try:
        out, err = p.communicate(timeout=LIMIT_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out, err


def wait_for_line(p, prefix):
    """Read p's stdout until a line starts with `prefix` (the process says it got there)."""
    for line in p.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"exited ({p.wait()}) before printing {prefix!r}: {p.stderr.read()}")


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        return p.communicate(timeout=LIMIT_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def one_line(err):
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_unreachable_bootstrap_fails_at_the_start_timeout(tmp_path):
    from p2pfl.gossip.identity import Identity

    with socket.socket() as closed:   # bound, never listening: dials are refused
        closed.bind(("127.0.0.1", 0))
        addr = f"/ip4/127.0.0.1/tcp/{closed.getsockname()[1]}/p2p/{Identity.generate().peer_id}"
        code, out, err = run("peer", "--bootstrap", addr, "--listen", "/ip4/127.0.0.1/tcp/0", "--bulk-port", "-1",
                             "--start-timeout", "1", "--rounds", "1", "--out", tmp_path / "o")
    assert code == 1, (out, err)
    assert f"start timeout: no neighbour after 1 s: none of {addr} answered" in one_line(err)
    assert "--alone" in err and "round 1/1" not in out and not (tmp_path / "o" / "summary.json").exists()


def test_a_running_peer_keeps_its_port_and_folder_and_resumes_faithfully(tmp_path):
    out = tmp_path / "a"
    a = start("peer", "--alone", "--listen", "/ip4/127.0.0.1/tcp/0", "--bulk-port", "-1", "--shard", "1/3",
              "--seed", "2", "--local-steps", "1", "--rounds", "100000", "--out", out)
    try:
        listening = wait_for_line(a, "listening on ")
        port = listening.split("/tcp/")[1].split("/")[0]
        wait_for_line(a, "round 1/")
        code, _, err = run("peer", "--alone", "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--out", tmp_path / "b")
        assert code == 2 and f"listen: port {port} on 127.0.0.1 is in use" in one_line(err)
        code, _, err = run("peer", "--alone", "--listen", "/ip4/127.0.0.1/tcp/0", "--out", out, "--fresh")
        assert code == 2 and f"out: {out} is in use by another peer (process {a.pid})" in one_line(err)
    finally:
        stop(a)
    assert a.returncode == 0
    done = json.loads((out / "summary.json").read_text())["rounds_done"]

    code, _, err = run("peer", "--resume", out, "--shard", "0/3")
    assert code == 2 and "was started with shard = '1/3'; shard = '0/3' contradicts it" in one_line(err)
    # from another folder, naming only the checkpoint's folder: its settings and folder come back
    (tmp_path / "elsewhere").mkdir()
    code, stdout, err = run("peer", "--resume", out, "--rounds", done + 1, "--listen", "/ip4/127.0.0.1/tcp/0",
                            cwd=tmp_path / "elsewhere")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["shard"], summary["seed"], summary["resumed_from"], summary["rounds_done"]) == \
        ("1/3", 2, done, done + 1)
    assert list((tmp_path / "elsewhere").iterdir()) == []   # not ./peer-out

    code, stdout, err = run("report", out)    # one peer's folder: no centralized run, no consensus curve
    assert code == 0, err
    assert "nan" not in stdout and "consensus" not in stdout and not (out / "consensus.png").exists()
    assert (out / "accuracy.png").exists()


def test_ctrl_c_on_sim_writes_what_it_has_and_exits_130(tmp_path):
    p = start("sim", "--peers", "3", "--rounds", "100000", "--local-steps", "1", "--out", tmp_path / "run")
    try:
        first = wait_for_line(p, "round ")      # the rounds are running
        assert first.startswith("round 1/100000 (3 peers)")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=LIMIT_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert one_line(err).startswith("interrupted after round ")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] is True and 1 <= summary["rounds_done"] < 100000
    assert f"interrupted after round {summary['rounds_done']}/100000" in err


def test_the_footer_fits_80_columns_and_says_what_the_rate_covers(tmp_path):
    code, out, err = run("sim", "--peers", "4", "--rounds", "2", "--out", tmp_path / "r", columns=80)
    assert code == 0, err
    footer = out[out.index("consensus distance"):].splitlines()
    assert all(len(line) <= 80 for line in footer[:-2]), footer      # the folder's path may be longer
    timing = next(line for line in footer if line.startswith("time: "))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert f"time: {summary['wall_s']:.1f} s in all; the rounds took {summary['train_s']:.1f} s " \
           f"({summary['peer_rounds_per_s']:.0f} peer-rounds/s)" == timing
    assert out.count("round ") >= 2 and "round 2/2 (4 peers): acc" in out   # a line a round, off a terminal
