"""The Prometheus endpoint of `p2pfl peer --metrics-port`: exposition text, HTTP scrape, port errors.

Everything runs on 127.0.0.1; a scrape is a blocking urllib call with a timeout, no sleeps."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pfl.errors import ConfigError
from p2pfl.peers import metrics as metrics_module
from p2pfl.peers.metrics import PeerMetrics, Snapshot
from p2pfl.peers.settings import load

PEER = "12D3KooWtest"


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    text = text.decode() if isinstance(text, bytes) else text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(got: dict, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted({"peer": PEER, **labels}.items())))]


def test_exposition_reports_the_snapshot_with_rejections_by_reason():
    snap = Snapshot(rounds_done=7, accuracy=0.875, neighbors=3, last_round_wait_s=0.25, wait_s_total=1.5,
                    bytes_sent=1000, bytes_received=2000, frames_sent=10, frames_received=20, send_failures=1,
                    rejected={"stale": 2, "bad_signature": 5})
    got = samples(PeerMetrics(PEER, lambda: snap).exposition())
    assert value(got, "p2pfl_rounds_done") == 7
    assert value(got, "p2pfl_accuracy") == 0.875
    assert value(got, "p2pfl_neighbors") == 3
    assert value(got, "p2pfl_last_round_wait_seconds") == 0.25
    assert value(got, "p2pfl_wait_seconds_total") == 1.5
    assert value(got, "p2pfl_bytes_sent_total") == 1000 and value(got, "p2pfl_bytes_received_total") == 2000
    assert value(got, "p2pfl_frames_sent_total") == 10 and value(got, "p2pfl_frames_received_total") == 20
    assert value(got, "p2pfl_send_failures_total") == 1
    assert value(got, "p2pfl_frames_rejected_total", reason="stale") == 2
    assert value(got, "p2pfl_frames_rejected_total", reason="bad_signature") == 5


def test_state_is_read_at_scrape_time_and_unknown_values_are_absent():
    state = {"snap": Snapshot()}
    metrics = PeerMetrics(PEER, lambda: state["snap"])
    first = samples(metrics.exposition())
    assert value(first, "p2pfl_rounds_done") == 0
    names = {name for name, _ in first}
    assert "p2pfl_accuracy" not in names and "p2pfl_last_round_wait_seconds" not in names   # not known yet
    assert "p2pfl_frames_rejected_total" not in names
    state["snap"] = Snapshot(rounds_done=1, accuracy=0.5, last_round_wait_s=0.0)
    second = samples(metrics.exposition())
    assert value(second, "p2pfl_rounds_done") == 1 and value(second, "p2pfl_accuracy") == 0.5


def test_each_instance_has_its_own_registry():
    # two nodes in one process (tests, an embedding application) must not clash on metric names
    a, b = PeerMetrics(PEER, lambda: Snapshot(rounds_done=1)), PeerMetrics(PEER, lambda: Snapshot(rounds_done=2))
    assert value(samples(a.exposition()), "p2pfl_rounds_done") == 1
    assert value(samples(b.exposition()), "p2pfl_rounds_done") == 2


def test_http_scrape_on_loopback_then_close():
    metrics = PeerMetrics(PEER, lambda: Snapshot(rounds_done=4, rejected={"replayed": 1}))
    url = metrics.serve("127.0.0.1", 0)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
            got = samples(r.read())
        assert value(got, "p2pfl_rounds_done") == 4
        assert value(got, "p2pfl_frames_rejected_total", reason="replayed") == 1
    finally:
        metrics.close()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=10):
        pass


def test_a_port_in_use_is_a_config_error_naming_the_key():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"metrics_port: 127.0.0.1:{port} is already in use"):
            PeerMetrics(PEER, Snapshot).serve("127.0.0.1", port)


@pytest.mark.parametrize("values, message", [
    ({"metrics_port": 70000}, r"metrics_port: must be 0\.\.65535 \(0: off\)"),
    ({"metrics_port": -1}, r"metrics_port: must be 0\.\.65535 \(0: off\)"),
    ({"metrics_port": "9100"}, "metrics_port: expected int"),
    ({"metrics_host": " "}, "metrics_host: empty"),
    ({"bulk_port": -2}, r"bulk_port: must be 0\.\.65535 \(0: any free port\) or -1"),
    ({"bulk_port": 65536}, r"bulk_port: must be 0\.\.65535 \(0: any free port\) or -1"),
])
def test_bad_metrics_and_bulk_settings_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        load(None, values)


def test_metrics_settings_defaults_are_off_and_local():
    s = load(None, {})
    assert (s.metrics_port, s.metrics_host, s.bulk_port) == (0, "127.0.0.1", 0)
    s = load(None, {"metrics_port": 9100, "metrics_host": "0.0.0.0", "bulk_port": -1})
    assert (s.metrics_port, s.metrics_host, s.bulk_port) == (9100, "0.0.0.0", -1)


def test_peer_cli_reports_a_metrics_port_in_use_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "p2pfl.cli", "peer", "--out", str(tmp_path / "out"),
                            "--listen", "/ip4/127.0.0.1/tcp/0", "--metrics-port", str(port)],
                           capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2], check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() == f"error: metrics_port: 127.0.0.1:{port} is already in use (pick another; 0: off)"
    assert "listening on" not in r.stdout       # stopped before it joined anyone


# -- the HTTP server is bounded: idle or slow clients hold no thread ----------------------------------
def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (blocks up to the socket's timeout for it to happen)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_many_idle_and_half_sent_connections_hold_no_threads_and_a_scrape_still_answers():
    metrics = PeerMetrics(PEER, lambda: Snapshot(rounds_done=3))
    url = metrics.serve("127.0.0.1", 0)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    before = threading.active_count()
    lingering = [_connect(port) for _ in range(50)]
    try:
        for sock in lingering[:10]:   # slowloris: a request head that never ends
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        # accepted in order: once this scrape is answered, the server has accepted all 50
        with urllib.request.urlopen(url, timeout=10) as r:
            assert value(samples(r.read()), "p2pfl_rounds_done") == 3
        assert threading.active_count() - before <= metrics_module.WORKERS
    finally:
        for sock in lingering:
            sock.close()
        metrics.close()


def test_the_longest_idle_connection_makes_room_and_idle_ones_time_out(monkeypatch):
    monkeypatch.setattr(metrics_module, "MAX_CONNECTIONS", 4)
    metrics = PeerMetrics(PEER, lambda: Snapshot(rounds_done=5))
    url = metrics.serve("127.0.0.1", 0)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    held = [_connect(port) for _ in range(4)]
    try:
        newest = _connect(port)
        held.append(newest)
        assert _closed_by_server(held[0])                 # the longest idle one went for the newcomer
        with urllib.request.urlopen(url, timeout=10) as r:   # and the scrape gets in the same way
            assert value(samples(r.read()), "p2pfl_rounds_done") == 5
        monkeypatch.setattr(metrics_module, "IDLE_TIMEOUT_S", 0.0)
        late = _connect(port)                             # accepted with no time to send its head
        held.append(late)
        assert _closed_by_server(late)
    finally:
        for sock in held:
            sock.close()
        metrics.close()


def test_an_oversized_request_head_is_closed_unanswered():
    metrics = PeerMetrics(PEER, Snapshot)
    url = metrics.serve("127.0.0.1", 0)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        with _connect(port) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\nX-Pad: " + b"a" * metrics_module.MAX_HEAD)
            assert _closed_by_server(sock)
        with _connect(port) as sock:   # a plain HTTP/1.0 request (what curl -0 sends) is answered and closed
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 200") and b"p2pfl_rounds_done" in reply
    finally:
        metrics.close()
