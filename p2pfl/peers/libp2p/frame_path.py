"""`FramePath`: how the libp2p transport moves model frames: writer tasks, opening a channel, the
frame reader and checker, the receive-buffer pool, the stream sender.

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

Only accepted peers get this far (the rule: control_path.py): a model stream from a peer without
an accepted hello is reset, and a bulk connection without a valid ticket closed, both counted as
NOT_ALLOWED. This is the third layer of `Libp2pTransport` (transport.py): it builds on the
control path, which asks a neighbour for its bulk ticket and decides who is accepted.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2pfl.errors import Reject, RemoteProtocolError
from p2pfl.gossip import codec
from p2pfl.gossip import payloads as payload_specs
from p2pfl.gossip.codec import Frame
from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.peers.libp2p import bulk
from p2pfl.peers.libp2p.control_path import ControlPath
from p2pfl.peers.libp2p.core import _reason, log
from p2pfl.peers.libp2p.host import MAX_WINDOW_SIZE, EndOfStream, read_exact, widen_receive_window

MODEL_PROTOCOL = TProtocol("/p2pfl/model/1")
_WRITE_CHUNK = 4 << 20        # bytes per stream.write: big writes amortise Noise/yamux per-call costs
_OFFLOAD_BYTES = 1 << 20      # decode/encode frames above this size in a worker thread
BULK_RETRY_S = 600.0          # after a failed dial of a peer's bulk port, use libp2p streams this long


class FramePath(ControlPath):
    """Sending and receiving the model frames of a `Libp2pTransport` (not usable on its own)."""

    max_frame_bytes: int            # the largest frame we accept (see Libp2pTransport.expect)
    payloads: Mapping[str, PayloadSpec] | None
    stall_timeout_s: float
    write_timeout_s: float
    delay_s: float
    outbox_frames: int
    _closed: bool
    _inbox_send: trio.MemorySendChannel[tuple[str, Frame]]
    _inbox: trio.MemoryReceiveChannel[tuple[str, Frame]]
    _outboxes: dict[str, trio.MemorySendChannel[list[bytes | memoryview]]]
    _encoded: tuple[tuple[Any, ...], object, list[bytes | memoryview]] | None
    _pending: int                   # frames queued or being written
    _buffers: _BufferPool
    _bulk_conns: dict[str, trio.CancelScope]        # peer -> its live bulk connection
    _bulk_unreachable: dict[str, float]             # peer -> trio time to try its bulk port again

    # -- send --------------------------------------------------------------------------------------
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
        key = (p.__array_interface__["data"][0], p.nbytes, frame.dtype, frame.kind, frame.round, frame.step,
               frame.schema)
        if self._encoded is not None and self._encoded[0] == key:
            return self._encoded[2]

        def enc() -> list[bytes | memoryview]:
            return codec.encode(self.identity, kind=frame.kind, round=frame.round, step=frame.step,
                                schema=frame.schema, payload=p, dtype=frame.dtype)

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
                    self._pending -= 1
                    self._notify()   # after the count: a flush() waiting on _pending must see it
                    self._warn(peer, "send", "%s: frame of %d bytes to %s not sent: %s", self.local_id, size, peer,
                               _reason(e))
                    if channel is not None:
                        with trio.move_on_after(1):
                            await channel.aclose()
                    channel = None
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
            ticket, host = None, None
            try:
                reply, host = await self._request(peer, {"t": "bulk"})
                ticket = bulk.Ticket.from_wire(reply, peer)
            except RemoteProtocolError as e:
                self._reject(e.reason)
                self._warn(peer, "ticket", "%s: bulk ticket from %s refused: %s", self.local_id, peer, e)
            except (ConnectionError, OSError, trio.TooSlowError):
                pass   # the peer is down, not its bulk port unreachable: the stream below fails alike
            try:
                if ticket is not None and host is not None:
                    with trio.fail_after(self.dial_timeout_s):
                        return await bulk.BulkSender.open(host, ticket, write_timeout_s=self.write_timeout_s)
            except (ConnectionError, OSError, trio.TooSlowError) as e:
                # a firewall that drops the dial would cost dial_timeout_s on every reconnect: wait a while
                self._bulk_unreachable[peer] = trio.current_time() + BULK_RETRY_S
                log.warning("%s: bulk port of %s unreachable (%s): frames go over a libp2p stream; "
                            "retrying the bulk port in %.0f s", self.local_id, peer, _reason(e), BULK_RETRY_S)
        with trio.fail_after(self.dial_timeout_s):
            stream = await self.host.new_stream(ID.from_base58(peer), [MODEL_PROTOCOL])
        return _StreamSender(stream, self.write_timeout_s)

    # -- receive -----------------------------------------------------------------------------------
    def _arrived(self, n: int) -> None:
        self.stats.bytes_arriving += n
    async def _model_handler(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if peer not in self.peers:
            self._reject(Reject.NOT_ALLOWED)
            self._warn(peer, "early", "%s: model stream from %s before an accepted hello: reset", self.local_id, peer)
            await stream.reset()
            return
        # no wider than one frame we accept: a sender may have that much in flight, not 16 MiB
        await widen_receive_window(stream, min(MAX_WINDOW_SIZE, self.max_frame_bytes))
        await self._read_frames(partial(read_exact, stream, on_bytes=self._arrived), peer)
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
                reader = bulk.BulkReader(conn.socket, key, self.stall_timeout_s, peer, on_bytes=self._arrived)
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
                self._buffers.give_back_after(frame.payload, buf.obj)
                try:
                    self._inbox_send.send_nowait((peer, frame))
                except trio.WouldBlock:
                    self._reject(Reject.BUFFER_FULL)
                    continue
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                self.stats.frames_received += 1   # handed to the peer: a buffer_full drop is not received
                self._notify()

    def _decode(self, buf: memoryview, peer: str) -> Frame:
        frame = codec.decode(buf, schema=self.hello_template.schema, max_frame_bytes=self.max_frame_bytes, peer=peer,
                             check_finite=self.payloads is None)   # payload_specs.check scans it instead
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
