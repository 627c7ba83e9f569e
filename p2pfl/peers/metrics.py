"""Prometheus metrics of one running peer (`p2pfl peer --metrics-port`).

Theory of operation: `PeerMetrics` owns its own `CollectorRegistry` (never prometheus_client's
global one, so several nodes in one process, such as tests or an embedding application, do not
clash) holding one custom collector. At scrape time the collector calls `snapshot()` and turns the
returned `Snapshot` into metric families, so nothing is pushed from the round loop. Running totals
(bytes, frames, rejections) are exported as counters straight from the transport's totals, which
only go up within one process. The snapshot is taken in the HTTP server's thread, not trio's, so it
must only read plain attributes and copy counters (`dict(counter)` is one C-level copy, atomic under
the GIL).

Exported series (each labelled with `peer`, the peer ID):
  p2pfl_rounds_done                  gauge: rounds completed (jumps when the peer catches up)
  p2pfl_accuracy                     gauge: test accuracy at the last evaluation (absent before it)
  p2pfl_neighbors                    gauge: neighbours gossiped with in the current round
  p2pfl_last_round_wait_seconds      gauge: seconds the last round waited for neighbours' frames
  p2pfl_wait_seconds_total           counter: the same, summed over the rounds run
  p2pfl_bytes_sent_total, p2pfl_bytes_received_total, p2pfl_frames_sent_total,
  p2pfl_frames_received_total, p2pfl_send_failures_total           counters: the transport's totals
  p2pfl_frames_rejected_total{reason}  counter: rejections by reason (as `rejected` in summary.json)
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from p2pfl.errors import ConfigError


@dataclass(frozen=True)
class Snapshot:
    """What a peer exports, read at scrape time."""

    rounds_done: int = 0
    accuracy: float | None = None        # None: not evaluated yet (or an attacker, never evaluated)
    neighbors: int = 0
    last_round_wait_s: float | None = None   # None: no round finished yet
    wait_s_total: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    send_failures: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)


class _Collector:
    def __init__(self, peer_id: str, snapshot: Callable[[], Snapshot]) -> None:
        self.peer_id, self.snapshot = peer_id, snapshot

    def describe(self) -> list[Metric]:
        return []   # registering must not take a snapshot; the names cannot clash in our own registry

    def collect(self) -> Iterator[Metric]:
        s, peer = self.snapshot(), [self.peer_id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["peer"])
            g.add_metric(peer, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["peer"])
            c.add_metric(peer, value)
            return c

        yield gauge("p2pfl_rounds_done", "Rounds completed (jumps when the peer catches up).", s.rounds_done)
        if s.accuracy is not None:
            yield gauge("p2pfl_accuracy", "Test accuracy at the last evaluation.", s.accuracy)
        yield gauge("p2pfl_neighbors", "Neighbours gossiped with in the current round.", s.neighbors)
        if s.last_round_wait_s is not None:
            yield gauge("p2pfl_last_round_wait_seconds",
                        "Seconds the last round waited for neighbours' frames, over its gossip steps.",
                        s.last_round_wait_s)
        yield counter("p2pfl_wait_seconds", "Seconds spent waiting for neighbours' frames.", s.wait_s_total)
        yield counter("p2pfl_bytes_sent", "Bytes of model frames sent.", s.bytes_sent)
        yield counter("p2pfl_bytes_received", "Bytes of model frames received.", s.bytes_received)
        yield counter("p2pfl_frames_sent", "Model frames sent.", s.frames_sent)
        yield counter("p2pfl_frames_received", "Model frames received and accepted by the transport.",
                      s.frames_received)
        yield counter("p2pfl_send_failures", "Model frames that could not be handed to a neighbour.",
                      s.send_failures)
        rejected = CounterMetricFamily("p2pfl_frames_rejected", "Frames rejected, by reason.",
                                       labels=["peer", "reason"])
        for reason, n in sorted(s.rejected.items()):
            rejected.add_metric([self.peer_id, reason], n)
        yield rejected


class PeerMetrics:
    """The metrics of one peer in a registry of their own; `serve` exposes them over HTTP."""

    def __init__(self, peer_id: str, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(peer_id, snapshot))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def exposition(self) -> bytes:
        """The Prometheus text format, as a scrape returns it."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> str:
        """Serve /metrics on host:port in a daemon thread; returns the URL (with the bound port, so
        port 0 works too). A port in use or an address we cannot bind raises a ConfigError."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"metrics_port: {host}:{port} is already in use (pick another; 0: off)") from None
            raise ConfigError(f"metrics_host: cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
        bound = self._server.server_address[1]
        return f"http://{f'[{host}]' if ':' in host else host}:{bound}/metrics"

    def close(self) -> None:
        """Stop the HTTP server (waits for its thread's poll loop, at most about 0.5 s)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
