"""`Libp2pTransport`: the `Transport` interface over py-libp2p (TCP, Noise only, yamux).

Theory of operation
-------------------
One object built in layers, a module each, every layer using only the layers below it:

  core.py          the state the paths share (who we are, the host, the accepted peers, counters,
                   bulk tickets) and its bookkeeping: waking `wait_until`, counting rejections,
                   throttling warnings, naming our listen addresses
  control_path.py  the control protocol: hellos and refusals, requests, accepting peers, the
                   control stream handler, bulk tickets
  frame_path.py    model frames: writer tasks, opening a channel, the frame reader and checker, the
                   receive-buffer pool, the stream sender
  transport.py     this class: construction (`__init__` assigns every layer's state from its
                   arguments), the payloads we accept, and the lifecycle

Layers of one class rather than parts that hold each other: the two paths share most of their
state (an accepted peer, a ticket, a counter or a wake-up set on one path is read on the other),
and a test or tool that replaces a method of a transport (`_answer`, `local_hello`, `request`,
`hello`) must change what every path calls; with one object and one `self`, both hold. Each layer
declares the attributes it uses (class annotations) so that mypy checks every use against the
assignments in `__init__`.

Lifecycle: entering the transport starts the host on the listen addresses, a nursery for the
transport's own tasks (writers, the bulk listener, disconnects), the model and control stream
handlers and, unless `bulk_port` is None, the bulk channel's TCP listener beside the first listen
address. `aclose` refuses further frames, closes the outboxes and the inbox (which ends a
`receive` loop), then exits the nursery and the host, also when the caller is being cancelled.

This folder is the only place in p2pfl that imports libp2p.
"""

from __future__ import annotations

import socket
from collections.abc import Collection, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any

import multiaddr  # type: ignore[import-untyped]
import trio

from p2pfl.errors import ConfigError
from p2pfl.gossip import payloads as payload_specs
from p2pfl.gossip.codec import Frame
from p2pfl.gossip.identity import Identity
from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.peers.libp2p import bulk
from p2pfl.peers.libp2p.control import Hello
from p2pfl.peers.libp2p.control_path import CONTROL_PROTOCOL, HelloRefused
from p2pfl.peers.libp2p.core import log
from p2pfl.peers.libp2p.frame_path import MODEL_PROTOCOL, FramePath, _BufferPool
from p2pfl.peers.libp2p.host import make_host
from p2pfl.peers.transport import LogThrottle, TransportStats


class Libp2pTransport(FramePath):
    def __init__(self, identity: Identity, hello: Hello, *, listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
                 psk: str | None = None, allow: Collection[str] | None = None,
                 max_frame_bytes: int = 1 << 30, inbox_frames: int = 16, outbox_frames: int = 2,
                 payloads: Mapping[str, PayloadSpec] | None = None,
                 stall_timeout_s: float = 10.0, write_timeout_s: float = 30.0, dial_timeout_s: float = 10.0,
                 delay_s: float = 0.0, bulk_port: int | None = 0) -> None:
        """`hello`: our side of the hello (its round/peers/addrs are refreshed on every exchange).
        `allow`: peer IDs that may talk to us (None: anyone compatible). `psk`: 64 hex chars of a
        private-network key. `delay_s`: injected latency before every outbound frame (sim faults).
        `bulk_port`: TCP port of our bulk channel on the first listen address's host (0: any free
        port; None: no bulk channel, we neither offer nor use one). `payloads`: what frames may carry
        (see `expect`); None accepts any kind and size up to `max_frame_bytes` (tests and tools: a Peer
        always declares its payloads)."""
        if psk is not None and (len(psk) != 64 or any(c not in "0123456789abcdefABCDEF" for c in psk)):
            raise ConfigError("network key: expected 64 hex characters (a 32-byte pre-shared key)")
        self.identity = identity
        self.hello_template = hello
        self.round = hello.round
        self.degree = hello.degree
        self.listen = [multiaddr.Multiaddr(a) for a in listen]
        self.allow = frozenset(allow) if allow is not None else None
        self.frame_limit, self.max_frame_bytes, self.stall_timeout_s = max_frame_bytes, max_frame_bytes, stall_timeout_s
        self.write_timeout_s, self.dial_timeout_s, self.delay_s = write_timeout_s, dial_timeout_s, delay_s
        self.outbox_frames = outbox_frames
        if bulk_port is not None and not 0 <= bulk_port <= 65535:
            raise ConfigError(f"bulk port: expected 0..65535 (0: any free port), got {bulk_port}")
        self.bulk_port = bulk_port
        self._bulk_tickets = {}
        self._bulk_issued = {}
        self._bulk_conns = {}
        self._bulk_unreachable = {}
        self.stats = TransportStats()
        self.peers = {}
        self.refusals = {}
        self._reached = {}
        self.on_hello = lambda peer, hello: None
        self.on_control = None
        self.host = make_host(identity, psk=psk)
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[str, Frame]](inbox_frames)
        self._outboxes = {}
        self._encoded = None
        self._stack = AsyncExitStack()
        self._nursery = None
        self._closed = False
        self._activity = trio.Event()
        self._pending = 0
        self._throttle = LogThrottle(log)
        self._buffers = _BufferPool(keep=inbox_frames, max_bytes=inbox_frames * max_frame_bytes)
        self.payloads = None
        if payloads is not None:
            self.expect(payloads)

    def expect(self, payloads: Mapping[str, PayloadSpec]) -> None:
        """Accept only these payloads; the frame limit becomes the largest frame they can make (at
        most the configured `max_frame_bytes`), so a bigger frame is refused from its length prefix,
        and the receive-buffer pool keeps at most `inbox_frames` frames of that size."""
        self.payloads = dict(payloads)
        self.max_frame_bytes = min(self.frame_limit, payload_specs.max_frame_bytes(payloads))
        self._buffers.max_bytes = self._buffers.keep * self.max_frame_bytes

    async def flush(self) -> None:
        """Wait until every queued frame was written or failed (bound it with a timeout)."""
        await self.wait_until(lambda: self._pending == 0)

    # -- lifecycle --------------------------------------------------------------------------------
    async def __aenter__(self) -> Libp2pTransport:
        await self._stack.__aenter__()
        try:
            await self._stack.enter_async_context(self.host.run(listen_addrs=self.listen))
            self._nursery = await self._stack.enter_async_context(trio.open_nursery())
            self._stack.callback(self._nursery.cancel_scope.cancel)
            self.host.set_stream_handler(MODEL_PROTOCOL, self._model_handler)
            self.host.set_stream_handler(CONTROL_PROTOCOL, self._control_handler)
            if self.bulk_port is not None:
                listeners = await trio.open_tcp_listeners(self.bulk_port, host=_bind_host(self.listen[0]))
                for listener in listeners:   # accepted sockets inherit it, window scaling included
                    listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bulk.SOCKET_BUFFER_BYTES)
                self.bulk_port = listeners[0].socket.getsockname()[1]
                self._nursery.start_soon(trio.serve_listeners, self._bulk_handler, listeners)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ch in self._outboxes.values():
            ch.close()
        # synchronous: an awaited close would raise Cancelled when the caller is being cancelled, and
        # the host and nursery below would never be exited (trio then reports a misnested nursery)
        self._inbox_send.close()
        await self._stack.aclose()   # no cancel scope around this: it exits the nursery we entered

    @property
    def bulk_peers(self) -> list[str]:
        """Peers whose frames reach us over a live bulk connection (the rest use libp2p streams)."""
        return sorted(self._bulk_conns)


def _bind_host(addr: Any) -> str:
    """The IP of a /ip4/ or /ip6/ listen multiaddr (the bulk channel listens beside it)."""
    for proto in ("ip4", "ip6"):
        try:
            return str(addr.value_for_protocol(proto))
        except Exception:
            continue
    raise ConfigError(f"listen address {addr}: the bulk channel needs an /ip4/ or /ip6/ address "
                      "(or turn it off: --bulk-port -1)")


__all__ = ["CONTROL_PROTOCOL", "MODEL_PROTOCOL", "HelloRefused", "Libp2pTransport"]
