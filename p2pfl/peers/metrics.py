"""Prometheus metrics of one running peer (`p2pfl peer --metrics-port`).

Theory of operation: `PeerMetrics` owns its own `CollectorRegistry` (never prometheus_client's
global one, so several nodes in one process, such as tests or an embedding application, do not
clash) holding one custom collector. At scrape time the collector calls `snapshot()` and turns the
returned `Snapshot` into metric families, so nothing is pushed from the round loop. Running totals
(bytes, frames, rejections) are exported as counters straight from the transport's totals, which
only go up within one process. The snapshot is taken in the HTTP server's thread, not trio's, so it
must only read plain attributes and copy counters (`dict(counter)` is one C-level copy, atomic under
the GIL).

The HTTP server is ours (prometheus_client's `start_http_server` spends a thread per connection, so
idle connections alone could pile up threads): one event-loop thread accepts connections and reads
request heads without blocking, holding at most `MAX_CONNECTIONS` (a new one closes the longest
idle one; every one is closed `IDLE_TIMEOUT_S` after it was accepted unless its head is complete),
and only a complete head goes to one of `WORKERS` threads, which answers with prometheus_client's
`MetricsHandler` (same exposition, content negotiation and gzip as before) and closes the
connection (HTTP/1.0: one request each). So idle or slow clients hold no thread, the thread count
is bounded, and a scrape still answers while they linger.

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
import io
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, MetricsHandler, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from p2pfl.errors import ConfigError

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64     # connections held at once (idle or being answered)
IDLE_TIMEOUT_S = 10.0    # from accept to a complete request head; then the connection is closed
SEND_TIMEOUT_S = 10.0    # a worker gives up on a client that does not read its answer
WORKERS = 2              # threads answering complete requests
MAX_HEAD = 8192          # request line and headers; a longer head is closed unanswered


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
    reputation: Mapping[str, float] = field(default_factory=dict)   # per neighbour (reputation on)


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
        if s.reputation:
            rep = GaugeMetricFamily("p2pfl_reputation", "RFFL reputation of each current neighbour (sums to 1).",
                                    labels=["peer", "neighbor"])
            for neighbor, r in sorted(s.reputation.items()):
                rep.add_metric([self.peer_id, neighbor], r)
            yield rep


class _Conn:
    """A client connection and what it has sent of its request head."""

    __slots__ = ("addr", "deadline", "head", "sock")

    def __init__(self, sock: socket.socket, addr: tuple[str, int], deadline: float) -> None:
        self.sock, self.addr, self.deadline, self.head = sock, addr, deadline, bytearray()


class _Handler(MetricsHandler):
    """prometheus_client's handler, answering a request whose head the event loop has already read:
    a worker never waits for a slow sender."""

    def setup(self) -> None:
        conn: _Conn = self.request
        self.connection = conn.sock
        self.rfile = io.BytesIO(bytes(conn.head))
        self.wfile = conn.sock.makefile("wb")    # buffered: finish() flushes it whole


class _Server:
    """The bounded HTTP server described in the module docstring, serving `registry` on host:port."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self._listener = socket.create_server(addr, family=family)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._handler = _Handler.factory(registry)
        self._wake_r, self._wake_w = socket.socketpair()      # close() interrupts the loop's select
        self._idle: dict[_Conn, None] = {}                     # accept order: the longest idle first
        self._busy = 0                                         # handed to the workers, not closed yet
        self._lock = threading.Lock()                          # _busy: the loop and the workers
        self._closing = False
        self._workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="p2pfl-metrics")
        self._thread = threading.Thread(target=self._loop, name="p2pfl-metrics-loop", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, close idle connections, wait for the answers in progress, free the port."""
        self._closing = True
        self._wake_w.send(b"\0")
        self._thread.join(timeout=5)
        self._workers.shutdown(wait=True)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    def _loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing:
                first = min((c.deadline for c in self._idle), default=None)   # at most MAX_CONNECTIONS
                for key, _ in sel.select(None if first is None else max(0.0, first - time.monotonic())):
                    if key.fileobj is self._listener:
                        self._accept(sel)
                    elif key.data is not None and key.data in self._idle:   # not dropped earlier in this batch
                        self._read(sel, key.data)
                now = time.monotonic()
                for conn in [c for c in self._idle if c.deadline <= now]:
                    self._drop(sel, conn)
            for conn in list(self._idle):
                self._drop(sel, conn)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(MAX_CONNECTIONS):   # bounded: a flood of connects must not starve the reads
            try:
                sock, addr = self._listener.accept()
            except OSError:   # none left (EAGAIN), or a transient accept failure: the next select retries
                return
            sock.setblocking(False)
            with self._lock:
                held = len(self._idle) + self._busy
            if held >= MAX_CONNECTIONS:
                if not self._idle:        # all of them are being answered: refuse this one (a scraper retries)
                    sock.close()
                    continue
                self._drop(sel, next(iter(self._idle)))
            conn = _Conn(sock, addr, time.monotonic() + IDLE_TIMEOUT_S)
            self._idle[conn] = None
            sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD + 1 - len(conn.head))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        conn.head += data
        if not data or len(conn.head) > MAX_HEAD:
            self._drop(sel, conn)
        elif b"\r\n\r\n" in conn.head or b"\n\n" in conn.head:
            sel.unregister(conn.sock)
            del self._idle[conn]
            with self._lock:
                self._busy += 1
            self._workers.submit(self._answer, conn)

    def _drop(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        sel.unregister(conn.sock)
        del self._idle[conn]
        conn.sock.close()

    def _answer(self, conn: _Conn) -> None:
        try:
            conn.sock.settimeout(SEND_TIMEOUT_S)
            self._handler(conn, conn.addr, self)
        except OSError:   # the client left or stopped reading: nothing to tell it
            pass
        except Exception:   # a failing collector must not kill the worker; the scraper sees the connection close
            log.exception("metrics: answering a scrape failed")
        finally:
            conn.sock.close()
            with self._lock:
                self._busy -= 1


class PeerMetrics:
    """The metrics of one peer in a registry of their own; `serve` exposes them over HTTP."""

    def __init__(self, peer_id: str, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(peer_id, snapshot))
        self._server: _Server | None = None

    def exposition(self) -> bytes:
        """The Prometheus text format, as a scrape returns it."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> str:
        """Serve /metrics on host:port from a few threads of its own; returns the URL (with the bound
        port, so port 0 works too). A port in use or an address we cannot bind raises a ConfigError."""
        try:
            self._server = _Server(host, port, self.registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"metrics_port: {host}:{port} is already in use (pick another; 0: off)") from None
            raise ConfigError(f"metrics_host: cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
        return f"http://{f'[{host}]' if ':' in host else host}:{self._server.port}/metrics"

    def close(self) -> None:
        """Stop the HTTP server (waits for answers in progress, at most SEND_TIMEOUT_S for a client
        that does not read)."""
        if self._server is not None:
            self._server.close()
            self._server = None
