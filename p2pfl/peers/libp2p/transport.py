"""`Libp2pTransport`: the `Transport` interface over py-libp2p (TCP, Noise only, yamux).

Theory of operation
-------------------
Model frames: one long-lived outbound channel per neighbour, owned by a writer task fed through a
short queue (so a slow neighbour delays nobody else, and `send` returns at once). The channel is
the neighbour's bulk channel (bulk.py: a ticket asked for on the control protocol, then a TCP
connection to its bulk port); only if the neighbour has none, or the dial fails (a firewall), is
it a `/p2pfl/model/1` stream. Each frame is the codec's own u32-length-prefixed frame; we never
rely on EOF. The reader of an inbound channel loops: read the 4-byte prefix (waiting as long as it
takes: a channel idles between rounds), refuse an oversize frame before reading its body, then
read the rest into a pooled, aligned `frame_buffer` with a stall timeout on every read (a
neighbour that stalls mid-frame gets its channel closed and counted). A checker task decodes the
frame in a worker thread while the next one is read, with `peer=` the authenticated remote peer
(so a forged "from" is refused), and hands it to a bounded inbox with `send_nowait`: the read side
never waits on the consumer, only on the previous frame's check (yamux resets a writer whose
reader does not read for 5 s); a full inbox drops the frame and counts it. Both paths feed the same
frame reader (`_read_frames`), so every check and counter below applies to both. A new bulk
connection from a peer replaces its previous one, and a peer that loses its accepted hello loses
its bulk connection at the next frame.

Control (`/p2pfl/ctl/1`, see control.py) runs one request/reply per stream. A peer may open model
streams only after its hello was accepted (version, schema, config digest, allowlist); anything
else is reset and counted as NOT_ALLOWED, so frames from a refused or unlisted peer never reach
the round loop. Verified peers' addresses are kept in the peerstore with ttl 0 (py-libp2p expires
them after 120 s otherwise).

This folder is the only place in p2pfl that imports libp2p.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from functools import partial
from typing import Any

import multiaddr  # type: ignore[import-untyped]
import numpy as np
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pfl.errors import ConfigError, Reject, RemoteProtocolError, printable
from p2pfl.gossip import codec
from p2pfl.gossip import payloads as payload_specs
from p2pfl.gossip.codec import Frame
from p2pfl.gossip.identity import Identity
from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.peers.libp2p import bulk, control
from p2pfl.peers.libp2p.control import Hello
from p2pfl.peers.libp2p.host import MAX_WINDOW_SIZE, EndOfStream, make_host, read_exact, widen_receive_window
from p2pfl.peers.transport import LogThrottle, TransportStats

log = logging.getLogger(__name__)

MODEL_PROTOCOL = TProtocol("/p2pfl/model/1")
CONTROL_PROTOCOL = TProtocol("/p2pfl/ctl/1")
_WRITE_CHUNK = 4 << 20        # bytes per stream.write: big writes amortise Noise/yamux per-call costs
_OFFLOAD_BYTES = 1 << 20      # decode/encode frames above this size in a worker thread
BULK_RETRY_S = 600.0          # after a failed dial of a peer's bulk port, use libp2p streams this long


class HelloRefused(Exception):
    """The remote peer refused us at hello, or we refused its reply; the text names the reason."""


ControlHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class Libp2pTransport:
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
        self.round = hello.round               # the node keeps these two current
        self.degree = hello.degree
        self.listen = [multiaddr.Multiaddr(a) for a in listen]
        self.allow = frozenset(allow) if allow is not None else None
        self.frame_limit, self.max_frame_bytes, self.stall_timeout_s = max_frame_bytes, max_frame_bytes, stall_timeout_s
        self.write_timeout_s, self.dial_timeout_s, self.delay_s = write_timeout_s, dial_timeout_s, delay_s
        self.outbox_frames = outbox_frames
        if bulk_port is not None and not 0 <= bulk_port <= 65535:
            raise ConfigError(f"bulk port: expected 0..65535 (0: any free port), got {bulk_port}")
        self.bulk_port = bulk_port             # the bound port once listening
        self._bulk_tickets: dict[bytes, tuple[str, bytes]] = {}   # token -> (peer, key), single use
        self._bulk_issued: dict[str, bytes] = {}                  # peer -> its one outstanding token
        self._bulk_conns: dict[str, trio.CancelScope] = {}        # peer -> its live bulk connection
        self._bulk_unreachable: dict[str, float] = {}             # peer -> trio time to try its bulk port again
        self.stats = TransportStats()
        self.peers: dict[str, Hello] = {}      # accepted peers: their latest hello
        self.refusals: dict[str, str] = {}     # peer -> why the last hello failed
        self.on_hello: Callable[[str, Hello], None] = lambda peer, hello: None
        self.on_control: ControlHandler | None = None
        self.host = make_host(identity, psk=psk)
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[str, Frame]](inbox_frames)
        self._outboxes: dict[str, trio.MemorySendChannel[list[bytes | memoryview]]] = {}
        self._encoded: tuple[tuple[Any, ...], object, list[bytes | memoryview]] | None = None
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._activity = trio.Event()
        self._pending = 0                      # frames queued or being written
        self._throttle = LogThrottle(log)
        self._buffers = _BufferPool(keep=inbox_frames, max_bytes=inbox_frames * max_frame_bytes)
        self.payloads: Mapping[str, PayloadSpec] | None = None
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

    def _notify(self) -> None:
        self._activity.set()
        self._activity = trio.Event()

    def _warn(self, peer: str, what: str, msg: str, *args: Any) -> None:
        self._throttle.warning((peer, what), msg, *args)

    def _reject(self, reason: Reject) -> None:
        self.stats.reject(reason)
        self._notify()

    def notify(self) -> None:
        """Wake `wait_until` waiters: something they wait on changed outside the transport (a link)."""
        self._notify()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (no polling) until `predicate()` holds; it is re-checked whenever a frame, a
        rejection, a send result or a hello is recorded. Bound it with trio.fail_after."""
        while not predicate():
            await self._activity.wait()

    @property
    def local_id(self) -> str:
        return self.identity.peer_id

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

    def listen_addrs(self) -> list[str]:
        """Every address we listen on, with /p2p/<our id>; a wildcard 0.0.0.0 is spelled out as
        this machine's IPv4 addresses (loopback first), which others can dial."""
        out: list[str] = []
        for a in map(str, self.host.get_addrs()):
            if a.startswith("/ip4/0.0.0.0/"):
                out.extend(a.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in _local_ipv4())
            else:
                out.append(a)
        return list(dict.fromkeys(out))

    # -- control: hello, peer exchange, requests ---------------------------------------------------
    def local_hello(self, exclude: str | None = None) -> Hello:
        peers: list[str] = []
        for pid, h in self.peers.items():
            if pid != exclude:
                peers.extend(a if "/p2p/" in a else f"{a}/p2p/{pid}" for a in h.addrs[:4])
        return replace(self.hello_template, round=self.round, degree=self.degree, addrs=tuple(self.listen_addrs()),
                       peers=tuple(peers[:control.MAX_PEERS]))

    async def connect(self, addr: str) -> tuple[str, Hello]:
        """Dial `addr` (a multiaddr ending in /p2p/<id>) and exchange hellos. Returns the remote
        peer ID and its hello; raises HelloRefused, or OSError-like `ConnectionError` if unreachable."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as e:
            raise ConfigError(f"bad peer address {addr!r}: {e} (expected /ip4/A/tcp/P/p2p/12D3KooW...)") from None
        peer = str(info.peer_id)
        if peer == self.local_id:
            raise ConfigError(f"address {addr} is our own peer ID")
        try:
            with trio.fail_after(self.dial_timeout_s):
                await self.host.connect(info)
        except Exception as e:  # libp2p raises SwarmException and friends
            raise ConnectionError(_reason(e)[:100]) from None
        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 0)
        return peer, await self.hello(peer)

    async def hello(self, peer: str) -> Hello:
        """(Re-)exchange hellos with a connected or known peer; on success it is an accepted peer."""
        ours = self.local_hello(exclude=peer)
        try:
            reply = await self.request(peer, ours.to_wire())
            refused = control.refusal_reason(reply, peer)
            theirs = Hello.from_wire(reply, peer) if refused is None else None
        except RemoteProtocolError as e:
            self._reject(e.reason)
            raise HelloRefused(f"{peer}: bad hello reply: {e}") from None
        problem: str | None
        if theirs is None or theirs.refused is not None:   # (a hello with `refused` set: an older peer's refusal)
            problem, who = refused or printable(theirs.refused if theirs else ""), "refused us"
        else:
            problem, who = control.incompatibility(ours, theirs), "was refused"   # named from our side
        if problem is None and self.allow is not None and peer not in self.allow:
            self._reject(Reject.NOT_ALLOWED)
            problem = "not on our allowlist"
        if problem is not None:
            self.peers.pop(peer, None)
            self.refusals[peer] = problem
            self._warn(peer, "hello", "%s: hello with %s failed (%s): %s", self.local_id, peer, who, problem)
            raise HelloRefused(f"peer {peer} {who}: {problem}")
        self._accept(peer, theirs)
        return theirs

    async def request(self, peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        """One control request/reply on a fresh stream."""
        return (await self._request(peer, msg))[0]

    async def _request(self, peer: str, msg: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """`request`, plus the remote host the stream's connection goes to."""
        stream = None
        try:
            with trio.fail_after(self.dial_timeout_s):
                stream = await self.host.new_stream(ID.from_base58(peer), [CONTROL_PROTOCOL])
                await stream.write(control.pack(msg))
                reply = await _read_control(stream, peer)
            remote = stream.get_remote_address()
            await stream.close()
            return reply, (str(remote[0]) if remote else None)
        except RemoteProtocolError:
            if stream is not None:
                await stream.reset()
            raise
        except (Exception, trio.TooSlowError) as e:
            if stream is not None:
                await stream.reset()
            raise ConnectionError(f"control request to {peer} failed: {_reason(e)}") from None

    def _accept(self, peer: str, hello: Hello) -> None:
        self.peers[peer] = hello
        self.refusals.pop(peer, None)
        addrs = []
        for a in hello.addrs:
            try:
                m = multiaddr.Multiaddr(a)
                addrs.append(m.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer}")) if "/p2p/" in a else m)
            except Exception:
                continue
        if addrs:
            self.host.get_peerstore().add_addrs(ID.from_base58(peer), addrs, 0)
        self.on_hello(peer, hello)
        self._notify()

    async def _control_handler(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(self.dial_timeout_s):
                msg = await _read_control(stream, peer)
                reply = await self._answer(peer, msg, stream)
                await stream.write(control.pack(reply))
            await stream.close()
        except RemoteProtocolError as e:
            self._reject(e.reason)
            await stream.reset()
        except EndOfStream as e:   # the other side closed or went away mid-request: routine at shutdown
            log.info("%s: control stream from %s ended: %s", self.local_id, peer, e)
            await stream.reset()
        except (Exception, trio.TooSlowError) as e:
            self._warn(peer, "control", "%s: control stream from %s failed: %s", self.local_id, peer,
                       printable(_reason(e), 200))
            await stream.reset()
        if peer in self.refusals and self.allow is not None and peer not in self.allow and self._nursery:
            self._nursery.start_soon(self._disconnect, peer)

    async def _answer(self, peer: str, msg: dict[str, Any], stream: Any) -> dict[str, Any]:
        if msg["t"] == "hello":
            theirs = Hello.from_wire(msg, peer)
            ours = self.local_hello(exclude=peer)
            if self.allow is not None and peer not in self.allow:
                self._reject(Reject.NOT_ALLOWED)
                problem: str | None = "not on the allowlist"
                reason = problem
            else:
                problem = control.incompatibility(ours, theirs)
                reason = control.incompatibility(theirs, ours)   # the same difference, in the other side's words
            if problem is not None:
                self.peers.pop(peer, None)
                self.refusals[peer] = problem
                self._warn(peer, "refused", "%s: refused hello from %s: %s", self.local_id, peer, problem)
                return control.refusal(reason or problem)
            remote = stream.get_remote_address()   # a peer listening on 0.0.0.0 is reachable where it came from
            if remote:
                theirs = replace(theirs, addrs=tuple(a.replace("/ip4/0.0.0.0/", f"/ip4/{remote[0]}/")
                                                     for a in theirs.addrs))
            self._accept(peer, theirs)
            return ours.to_wire()
        if peer not in self.peers:
            self._reject(Reject.NOT_ALLOWED)
            return {"t": "error", "error": "say hello first"}
        if msg["t"] == "bulk":
            return self._issue_ticket(peer).to_wire()
        if self.on_control is None:
            return {"t": "error", "error": f"unknown request {msg['t']!r}"}
        return await self.on_control(peer, msg)

    async def _disconnect(self, peer: str) -> None:
        with trio.move_on_after(self.dial_timeout_s):
            try:
                await self.host.disconnect(ID.from_base58(peer))
            except Exception as e:
                log.debug("%s: disconnect %s: %s", self.local_id, peer, _reason(e))

    # -- model frames: send ------------------------------------------------------------------------
    async def send(self, peer: str, frame: Frame) -> bool:
        if self._closed or peer not in self.peers or self._nursery is None:
            self.stats.send_failures += 1
            return False
        buffers = await self._encode(frame)
        outbox = self._outboxes.get(peer)
        if outbox is None:
            outbox, rx = trio.open_memory_channel[list[bytes | memoryview]](self.outbox_frames)
            self._outboxes[peer] = outbox
            self._nursery.start_soon(self._writer, peer, rx)
        try:
            outbox.send_nowait(buffers)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.stats.send_failures += 1
            return False
        self._pending += 1
        return True

    async def _encode(self, frame: Frame) -> list[bytes | memoryview]:
        """Encode (digest + signature) once per vector: a peer sends the same frame to every
        neighbour. The cache holds the payload array, so its address cannot be reused meanwhile."""
        p = frame.payload
        key = (p.__array_interface__["data"][0], p.nbytes, p.dtype.str, frame.kind, frame.round, frame.step,
               frame.schema)
        if self._encoded is not None and self._encoded[0] == key:
            return self._encoded[2]

        def enc() -> list[bytes | memoryview]:
            return codec.encode(self.identity, kind=frame.kind, round=frame.round, step=frame.step,
                                schema=frame.schema, payload=p)

        buffers = await trio.to_thread.run_sync(enc) if p.nbytes > _OFFLOAD_BYTES else enc()
        self._encoded = (key, p, buffers)
        return buffers

    async def _writer(self, peer: str, frames: trio.MemoryReceiveChannel[list[bytes | memoryview]]) -> None:
        channel: bulk.BulkSender | _StreamSender | None = None
        async with frames:
            async for buffers in frames:
                size = sum(memoryview(b).nbytes for b in buffers)
                try:
                    if self.delay_s:
                        await trio.sleep(self.delay_s)
                    if channel is None:
                        channel = await self._open_channel(peer)
                    await channel.send_frame(buffers)
                except (Exception, trio.TooSlowError) as e:
                    self.stats.send_failures += 1
                    self._notify()
                    log.info("%s: frame to %s not sent: %s", self.local_id, peer, _reason(e))
                    if channel is not None:
                        with trio.move_on_after(1):
                            await channel.aclose()
                    channel = None
                    self._pending -= 1
                    continue
                self._pending -= 1
                self.stats.frames_sent += 1
                self.stats.bytes_sent += size
                self._notify()
        if channel is not None:
            with trio.move_on_after(1):
                await channel.aclose()

    async def _open_channel(self, peer: str) -> bulk.BulkSender | _StreamSender:
        """The neighbour's bulk channel if we and it have one and it answers, else a model stream."""
        if self.bulk_port is not None and self._bulk_unreachable.get(peer, -math.inf) <= trio.current_time():
            try:
                reply, host = await self._request(peer, {"t": "bulk"})
                ticket = bulk.Ticket.from_wire(reply, peer)
                if ticket is not None and host is not None:
                    with trio.fail_after(self.dial_timeout_s):
                        return await bulk.BulkSender.open(host, ticket, write_timeout_s=self.write_timeout_s)
            except RemoteProtocolError as e:
                self._reject(e.reason)
                self._warn(peer, "ticket", "%s: bulk ticket from %s refused: %s", self.local_id, peer, e)
            except (ConnectionError, OSError, trio.TooSlowError) as e:
                # a firewall that drops the dial would cost dial_timeout_s on every reconnect: wait a while
                self._bulk_unreachable[peer] = trio.current_time() + BULK_RETRY_S
                log.warning("%s: bulk port of %s unreachable (%s): frames go over a libp2p stream; "
                            "retrying the bulk port in %.0f s", self.local_id, peer, _reason(e), BULK_RETRY_S)
        with trio.fail_after(self.dial_timeout_s):
            stream = await self.host.new_stream(ID.from_base58(peer), [MODEL_PROTOCOL])
        return _StreamSender(stream, self.write_timeout_s)

    def _issue_ticket(self, peer: str) -> bulk.Ticket:
        """A fresh single-use ticket for `peer`, replacing any it did not use."""
        if self.bulk_port is None:
            return bulk.Ticket(0)
        self._bulk_tickets.pop(self._bulk_issued.pop(peer, b""), None)
        ticket = bulk.Ticket.issue(self.bulk_port)
        self._bulk_tickets[ticket.token] = (peer, ticket.key)
        self._bulk_issued[peer] = ticket.token
        return ticket

    # -- model frames: receive ---------------------------------------------------------------------
    async def _model_handler(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if peer not in self.peers:
            self._reject(Reject.NOT_ALLOWED)
            self._warn(peer, "early", "%s: model stream from %s before an accepted hello: reset", self.local_id, peer)
            await stream.reset()
            return
        # no wider than one frame we accept: a sender may have that much in flight, not 16 MiB
        await widen_receive_window(stream, min(MAX_WINDOW_SIZE, self.max_frame_bytes))
        await self._read_frames(partial(read_exact, stream), peer)
        with trio.move_on_after(1):
            await stream.reset()

    async def _bulk_handler(self, conn: trio.SocketStream) -> None:
        async with conn:
            try:
                where = conn.socket.getpeername()
            except OSError:              # already gone
                where = "?"
            opening = bytearray(len(bulk.MAGIC) + bulk.TOKEN_BYTES)
            try:
                with trio.fail_after(self.stall_timeout_s):
                    await bulk.recv_exact(conn.socket, memoryview(opening))
            except (EndOfStream, trio.TooSlowError):
                opening = bytearray()
            entry = self._bulk_tickets.pop(bytes(opening[len(bulk.MAGIC):]), None) \
                if opening[:len(bulk.MAGIC)] == bulk.MAGIC else None
            if entry is None or entry[0] not in self.peers:
                self._reject(Reject.NOT_ALLOWED)
                self._warn(str(where[0] if isinstance(where, tuple) else where), "ticket", "%s: bulk connection from %s without a valid ticket: closed",
                           self.local_id, where)
                return
            peer, key = entry
            self._bulk_issued.pop(peer, None)
            previous = self._bulk_conns.pop(peer, None)
            if previous is not None:
                previous.cancel()
            with trio.CancelScope() as scope:
                self._bulk_conns[peer] = scope
                reader = bulk.BulkReader(conn.socket, key, self.stall_timeout_s, peer)
                await self._read_frames(reader.read_exact, peer)
            if self._bulk_conns.get(peer) is scope:
                del self._bulk_conns[peer]

    async def _read_frames(self, read: Callable[[memoryview, float | None], Awaitable[None]], peer: str) -> None:
        """Read frames off one stream or bulk connection into the inbox until it ends, fails, or
        `peer` is no longer accepted; a failure is counted by reason and logged. A frame is
        checked (digest, signature, finiteness) in a worker thread while the next one is read."""
        done, pending = trio.open_memory_channel[memoryview](1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._check_frames, pending, peer)
            async with done:
                try:
                    while peer in self.peers:
                        await done.send(await self._read_frame(read, peer))
                except _StreamDone as e:
                    if e.reason is not None:
                        self._reject(e.reason)
                        self._warn(peer, e.reason.value, "%s: model frames from %s: connection dropped: %s",
                                   self.local_id, peer, e.reason.value)
                except trio.BrokenResourceError:   # the inbox closed: we are shutting down
                    pass

    async def _check_frames(self, raw: trio.MemoryReceiveChannel[memoryview], peer: str) -> None:
        async with raw:
            async for buf in raw:
                dec = partial(self._decode, buf, peer)
                try:
                    frame = await trio.to_thread.run_sync(dec) if buf.nbytes > _OFFLOAD_BYTES else dec()
                except RemoteProtocolError as e:
                    self._reject(e.reason)
                    self._warn(peer, e.reason.value, "%s: %s", self.local_id, e)
                    continue
                self.stats.frames_received += 1
                self._buffers.give_back_after(frame.payload, buf.obj)
                try:
                    self._inbox_send.send_nowait((peer, frame))
                except trio.WouldBlock:
                    self._reject(Reject.BUFFER_FULL)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                self._notify()

    def _decode(self, buf: memoryview, peer: str) -> Frame:
        frame = codec.decode(buf, schema=self.hello_template.schema, max_frame_bytes=self.max_frame_bytes, peer=peer)
        if self.payloads is not None:
            payload_specs.check(frame.kind, frame.dtype, frame.payload, self.payloads, peer)
        return frame

    async def _read_frame(self, read: Callable[[memoryview, float | None], Awaitable[None]],
                          peer: str) -> memoryview:
        """One whole frame's bytes through `read` (host.read_exact's contract), in an aligned
        buffer for codec.decode. Raises _StreamDone when the stream cannot go on."""
        prefix = bytearray(codec.FRAME_PREFIX_BYTES)
        view = memoryview(prefix)
        started = False
        try:
            await read(view[:1], None)                 # idle between frames: wait
            started = True
            await read(view[1:4], self.stall_timeout_s)
            total = codec.read_frame_length(view[:4], self.max_frame_bytes, peer=peer)
            await read(view[4:8], self.stall_timeout_s)
            buf = codec.frame_buffer(prefix, max_frame_bytes=self.max_frame_bytes, peer=peer,
                                     alloc=self._buffers.take)
            await read(buf[codec.FRAME_PREFIX_BYTES:], self.stall_timeout_s)
        except RemoteProtocolError as e:  # oversize or impossible lengths: cannot resync, reset
            raise _StreamDone(e.reason) from None
        except trio.TooSlowError:
            raise _StreamDone(Reject.STALLED) from None
        except EndOfStream:
            raise _StreamDone(Reject.TRUNCATED if started else None) from None
        self.stats.bytes_received += codec.LENGTH_PREFIX_BYTES + total
        return buf

    async def receive(self) -> AsyncIterator[tuple[str, Frame]]:
        try:
            async for item in self._inbox:
                yield item
        except trio.ClosedResourceError:
            return


class _BufferPool:
    """Receive buffers, reused once every view of the payload decoded from them is gone.

    A fresh 40 MB buffer costs ~10k page faults on first write, about as much as the socket read
    itself; a peer receives same-size frames every round, so it keeps up to `keep` buffers.
    A payload is `np.frombuffer` of a memoryview into the buffer, and every view derived from the
    payload keeps that memoryview alive, so its finalizer runs only when nothing can read the
    buffer any more. The pool holds at most `keep` buffers and `max_bytes` in all (`keep` frames of
    the largest accepted size), so frames that are refused or dropped cannot pile up in it."""

    def __init__(self, keep: int, max_bytes: int) -> None:
        self.keep, self.max_bytes = keep, max_bytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()   # finalizers run in whichever thread drops the last view

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(raw.nbytes for raw in self._free)

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            for i, raw in enumerate(self._free):
                if raw.nbytes == nbytes:
                    return self._free.pop(i)
        return np.empty(nbytes, dtype=np.uint8)

    def give_back_after(self, payload: np.ndarray, raw: object) -> None:
        owner = payload.base
        if isinstance(raw, np.ndarray) and isinstance(owner, memoryview):
            weakref.finalize(owner, self._give, raw)

    def _give(self, raw: np.ndarray) -> None:
        with self._lock:
            if raw.nbytes > self.max_bytes:   # bigger than the limit allows now (it was lowered): drop it
                return
            self._free.append(raw)
            held = sum(b.nbytes for b in self._free)
            while len(self._free) > self.keep or held > self.max_bytes:   # oldest first
                held -= self._free.pop(0).nbytes


class _StreamSender:
    """A `/p2pfl/model/1` stream as a frame channel (the fallback when there is no bulk channel)."""

    def __init__(self, stream: Any, write_timeout_s: float) -> None:
        self.stream, self.write_timeout_s = stream, write_timeout_s

    async def send_frame(self, buffers: Sequence[bytes | memoryview]) -> None:
        for buf in buffers:
            view = memoryview(buf).cast("B")
            for off in range(0, view.nbytes, _WRITE_CHUNK):
                with trio.fail_after(self.write_timeout_s):
                    await self.stream.write(view[off:off + _WRITE_CHUNK])

    async def aclose(self) -> None:
        await self.stream.reset()


class _StreamDone(Exception):
    def __init__(self, reason: Reject | None) -> None:
        self.reason = reason


def _bind_host(addr: Any) -> str:
    """The IP of a /ip4/ or /ip6/ listen multiaddr (the bulk channel listens beside it)."""
    for proto in ("ip4", "ip6"):
        try:
            return str(addr.value_for_protocol(proto))
        except Exception:
            continue
    raise ConfigError(f"listen address {addr}: the bulk channel needs an /ip4/ or /ip6/ address "
                      "(or turn it off: --bulk-port -1)")


def _local_ipv4() -> list[str]:
    ips = ["127.0.0.1"]
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        ips += [str(info[4][0]) for info in infos]
    except OSError:
        pass
    return list(dict.fromkeys(ips))


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f": {cause}"
    return text.splitlines()[0][:200] if text else type(e).__name__


async def _read_control(stream: Any, peer: str) -> dict[str, Any]:
    prefix = bytearray(4)
    await read_exact(stream, memoryview(prefix), None)
    body = bytearray(control.body_length(bytes(prefix), peer))
    await read_exact(stream, memoryview(body), None)
    return control.unpack(bytes(body), peer)


__all__ = ["CONTROL_PROTOCOL", "MODEL_PROTOCOL", "HelloRefused", "Libp2pTransport"]
