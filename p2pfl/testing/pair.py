"""Two connected transports of any kind behind one interface, for the transport conformance suite.

`open_pair(kind)` gives two connected transports `a` and `b` of one of `PAIR_KINDS`, where `a` can
send to `b`, behind one small interface (`Pair`), so one test body runs against every transport:

- ``memory-wire``: `MemoryNetwork(wire=True)`, frames travel as signed bytes;
- ``memory-objects``: `MemoryNetwork(wire=False)`, frames travel as objects (no bytes to forge);
- ``libp2p-bulk``: two `Libp2pTransport`s over loopback TCP, frames on the bulk channel;
- ``libp2p-stream``: the same with ``bulk_port=None``: frames on `/p2pfl/model/1` libp2p streams.

`run_pair(kind, body)` runs ``body(pair)`` in a fresh trio run under the right clock: trio's
`MockClock` (autojump) for the memory kinds, the real clock for libp2p, and the whole body bounded
by `trio.fail_after(limit_s)` either way. Waiting is always on a condition (`Pair.wait_until`):
for libp2p it wakes whenever either transport or the pair's reader records something; for the
memory kinds (no latency, no impairments) it waits until every task is blocked, when nothing can
change any more without time passing, and then the condition must hold.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import numpy as np
import trio

from p2pfl.errors import ConfigError
from p2pfl.gossip import codec
from p2pfl.gossip.codec import Frame
from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.peers.memory import MemoryNetwork, MemoryTransport
from p2pfl.peers.transport import Transport

if TYPE_CHECKING:
    from p2pfl.peers.libp2p import Libp2pTransport

from p2pfl.testing.transports import (
    LIMIT_S,
    MODEL_SCHEMA,
    _mock_clock,
    _quiescent,
    identity,
    libp2p_transport,
    model_frame,
    raw_model_stream,
)

# -- two connected transports of any kind -------------------------------------------------------------
PairKind = Literal["memory-wire", "memory-objects", "libp2p-bulk", "libp2p-stream"]
PAIR_KINDS: Final[tuple[PairKind, ...]] = ("memory-wire", "memory-objects", "libp2p-bulk", "libp2p-stream")


class _Signal:
    """Something changed: wakes `wait_until` callers to re-check their condition."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def changed(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()


class _StreamChannel:
    """Raw bytes on a `/p2pfl/model/1` libp2p stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    async def close(self) -> None:
        try:
            await self.stream.close()
        except Exception:   # the receiver already reset it: nothing left to close
            pass

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except Exception:
            pass


class _BulkChannel:
    """Raw bytes on a bulk-channel connection, sealed into records as an honest sender would."""

    def __init__(self, sender: Any) -> None:
        self.sender = sender

    async def write(self, data: bytes) -> None:
        if len(data) < codec.FRAME_PREFIX_BYTES:
            raise ValueError("the bulk channel seals a frame's 8-byte prefix as its first record: write >= 8 bytes")
        await self.sender.send_frame([data])

    async def close(self) -> None:
        await trio.aclose_forcefully(self.sender.stream)

    async def reset(self) -> None:
        try:   # linger 0: close() sends RST instead of FIN
            self.sender.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        await trio.aclose_forcefully(self.sender.stream)


class Pair:
    """Two connected transports, `a` -> `b` (unpack with ``a, b = pair``), and what a test needs
    to drive them the same way whatever their kind. Get one from `open_pair` or `run_pair`.

    - `send(frame)`: `a.send(b, frame)`, then waits until it settled (libp2p: `a` wrote the frame
      or counted its failure, so a burst of sends never overruns `a`'s short outbox; memory: every
      task is blocked, so a running reader took the frame).
    - `aclose(t)`: close `a` or `b` as its owner would (see the method).
    - `start_reading()`: a task that drains `b.receive()` into `received` (the memory transport
      checks and counts incoming frames only while someone reads; libp2p checks them regardless
      and holds accepted ones in a bounded inbox). `reading_ended` turns True when `receive()` ends.
    - `inject(raw)`: bytes from `a` to `b` that `a`'s encoder would never write, on a fresh raw
      channel (memory-wire: one inbox item; libp2p-bulk: a bulk connection with a ticket `a` asked
      for, the bytes sealed into records; libp2p-stream: a raw `/p2pfl/model/1` stream). Wait for
      each injection's effect before the next: a new bulk connection replaces the previous one.
      Not for libp2p-bulk pairs that also `send`: `a`'s own bulk connection would be replaced too.
    - `inject_partial(raw, cut, end=...)`: libp2p: the first `cut` bytes (>= 8), then, once `b` has
      begun reading that frame, the channel ends ("close": an orderly end, "reset": a stream reset
      or a TCP RST). memory-wire: the cut bytes as one item (the memory transport has no streams).
    - `wait_until(pred)`: see the module docstring; raises TooSlowError after `limit_s` (libp2p)
      or AssertionError once nothing can change (memory).
    """

    def __init__(self, kind: PairKind, a: Transport, b: Transport, nursery: trio.Nursery, limit_s: float,
                 network: MemoryNetwork | None = None) -> None:
        self.kind, self.a, self.b, self.network, self.limit_s = kind, a, b, network, limit_s
        self.received: list[tuple[str, Frame]] = []
        self.reading_ended = False
        # libp2p: frames whose 8-byte prefix `b` has read, counted where its reader takes the frame's
        # buffer from its pool (a spy on a private attribute: nothing public says "mid-frame")
        self.frames_started = 0
        self._nursery = nursery
        self._signal = _Signal()
        self._reading = False
        self._channel: _StreamChannel | _BulkChannel | None = None
        self._owned: dict[int, tuple[trio.Event, trio.Event]] = {}   # id(transport) -> (close it, closed)
        if self.is_libp2p:
            pool = self._b2p._buffers
            take = pool.take

            def counting_take(nbytes: int) -> np.ndarray:
                self.frames_started += 1
                self._signal.changed()
                return take(nbytes)

            pool.take = counting_take     # type: ignore[method-assign]

    def __iter__(self) -> Iterator[Transport]:
        return iter((self.a, self.b))

    @property
    def is_memory(self) -> bool:
        return self.network is not None

    @property
    def is_libp2p(self) -> bool:
        return self.network is None

    @property
    def carries_bytes(self) -> bool:
        """Whether arbitrary bytes from `a` can reach `b`'s decoder (`inject`)."""
        return self.kind != "memory-objects"

    @property
    def _a2p(self) -> Libp2pTransport:
        return cast("Libp2pTransport", self.a)

    @property
    def _b2p(self) -> Libp2pTransport:
        return cast("Libp2pTransport", self.b)

    def frame(self, round_: int = 0, n: int = 100, **kw: Any) -> Frame:
        """`model_frame` from `a`."""
        return model_frame(self.a.local_id, round_, n, **kw)

    async def send(self, frame: Frame, *, to: str | None = None) -> bool:
        """`a.send(to or b, frame)`, then wait until it settled: libp2p: `a` wrote the frame or
        counted its failure; memory: every task is blocked (a reader took what it could)."""
        done = self.a.stats.frames_sent + self.a.stats.send_failures
        ok = await self.a.send(to or self.b.local_id, frame)
        if self.is_memory:
            await _quiescent()   # b's reader, if any, takes the frame
        elif ok:   # (not `flush()`: it can miss the wake-up of a failed write)
            with trio.fail_after(self.limit_s):
                await self._a2p.wait_until(lambda: self.a.stats.frames_sent + self.a.stats.send_failures > done)
        return ok

    def start_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        self._nursery.start_soon(self._read)

    async def _read(self) -> None:
        try:
            async for sender, frame in self.b.receive():
                self.received.append((sender, frame))
                self._signal.changed()
        finally:
            self.reading_ended = True
            self._signal.changed()

    async def frames(self, count: int) -> list[tuple[str, Frame]]:
        """The first `count` frames `b` received (starts reading if needed)."""
        self.start_reading()
        await self.wait_until(lambda: len(self.received) >= count)
        return self.received[:count]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        if self.is_memory:
            await _quiescent()
            if not predicate():
                raise AssertionError(f"{self.kind}: the condition does not hold once every task is blocked")
            return
        with trio.fail_after(self.limit_s):
            async with trio.open_nursery() as nursery:
                async def watch(wait: Callable[[Callable[[], bool]], Awaitable[None]]) -> None:
                    await wait(predicate)
                    nursery.cancel_scope.cancel()
                for wait in (self._a2p.wait_until, self._b2p.wait_until, self._signal.wait_until):
                    nursery.start_soon(watch, wait)

    async def _fresh_channel(self) -> _StreamChannel | _BulkChannel:
        from p2pfl.peers.libp2p import bulk

        if self._channel is not None:
            await self._channel.close()
        with trio.fail_after(self.limit_s):
            if self.kind == "libp2p-bulk":
                ticket = bulk.Ticket.from_wire(await self._a2p.request(self.b.local_id, {"t": "bulk"}), self.b.local_id)
                if ticket is None:
                    raise ConfigError(f"{self.b.local_id} offers no bulk channel")
                sender = await bulk.BulkSender.open("127.0.0.1", ticket, write_timeout_s=self.limit_s)
                self._channel = _BulkChannel(sender)
            else:
                self._channel = _StreamChannel(await raw_model_stream(self._a2p, self._b2p))
        return self._channel

    def _inject_memory(self, raw: bytes) -> None:
        if not self.carries_bytes:
            raise ConfigError("a memory-objects pair carries Frame objects, not bytes")
        cast(MemoryTransport, self.b)._send.send_nowait((trio.current_time(), self.a.local_id, bytes(raw)))

    async def inject(self, raw: bytes) -> None:
        if self.is_memory:
            self._inject_memory(raw)
            return
        channel = await self._fresh_channel()
        with trio.fail_after(self.limit_s):
            await channel.write(raw)

    async def inject_partial(self, raw: bytes, cut: int, *, end: Literal["close", "reset"] = "close") -> None:
        if self.is_memory:
            self._inject_memory(raw[:cut])
            return
        if not codec.FRAME_PREFIX_BYTES <= cut < len(raw):
            raise ValueError(f"cut must leave the 8-byte prefix and lose something: 8 <= cut < {len(raw)}")
        channel = await self._fresh_channel()
        before = self.frames_started
        with trio.fail_after(self.limit_s):
            await channel.write(raw[:cut])
        await self.wait_until(lambda: self.frames_started > before)   # b is mid-frame now
        if end == "close":
            await channel.close()
        else:
            await channel.reset()
        self._channel = None

    async def aclose(self, transport: Transport) -> None:
        """Close `a` or `b` (again: a no-op). Memory: `transport.aclose()`. libp2p: the task that
        entered the transport leaves it (its `__aexit__` calls `aclose()`): `Libp2pTransport.aclose()`
        exits the nursery it entered, so it is safe only in that task with no nursery opened since."""
        owned = self._owned.get(id(transport))
        if owned is None:
            await transport.aclose()
            return
        close, closed = owned
        close.set()
        with trio.fail_after(self.limit_s):
            await closed.wait()

    async def _own(self, transport: Libp2pTransport) -> None:
        """Enter `transport` in a task of its own (not with nursery.start: py-libp2p's host does not
        survive being moved to another nursery), which leaves it when `aclose` asks."""
        close, closed = self._owned[id(transport)] = (trio.Event(), trio.Event())
        entered: list[BaseException | None] = []

        async def own() -> None:
            try:
                async with transport:
                    entered.append(None)
                    self._signal.changed()
                    await close.wait()
            except BaseException as e:
                if not entered:
                    entered.append(e)
                raise
            finally:
                closed.set()
                self._signal.changed()

        self._nursery.start_soon(own)
        await self._signal.wait_until(lambda: bool(entered))
        if entered[0] is not None:
            raise entered[0]

    async def _close_channel(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


@asynccontextmanager
async def open_pair(kind: PairKind, *, inbox_frames: int = 16, payloads: Mapping[str, PayloadSpec] | None = None,
                    max_frame_bytes: int = 1 << 30, stall_timeout_s: float = 10.0,
                    limit_s: float = LIMIT_S) -> AsyncIterator[Pair]:
    """Two connected transports of `kind` (`identity(0)` -> `identity(1)`), closed on exit.

    Both ends get the same `inbox_frames` and `max_frame_bytes`; memory networks check frames
    against `MODEL_SCHEMA`, as a libp2p hello does. `payloads`: `b.expect(payloads)`. Run it under
    `MockClock` for the memory kinds and the real clock for libp2p (`run_pair` does)."""
    if kind not in PAIR_KINDS:
        raise ConfigError(f"pair kind: expected one of {', '.join(PAIR_KINDS)}, got {kind!r}")
    async with trio.open_nursery() as nursery:
        try:
            network = None
            if kind.startswith("memory"):
                network = MemoryNetwork(wire=kind == "memory-wire", schema=MODEL_SCHEMA, inbox_frames=inbox_frames,
                                        max_frame_bytes=max_frame_bytes)
                a, b = network.endpoint(identity(0)), network.endpoint(identity(1))
                pair = Pair(kind, a, b, nursery, limit_s, network)
            else:
                kw: dict[str, Any] = {"bulk_port": 0 if kind == "libp2p-bulk" else None, "inbox_frames": inbox_frames,
                      "max_frame_bytes": max_frame_bytes, "stall_timeout_s": stall_timeout_s}
                a2p, b2p = libp2p_transport(0, **kw), libp2p_transport(1, **kw)
                pair = Pair(kind, a2p, b2p, nursery, limit_s)
                with trio.fail_after(limit_s):
                    for own in (a2p, b2p):
                        await pair._own(own)
                    await a2p.connect(b2p.listen_addrs()[0])
            if payloads is not None:
                pair.b.expect(payloads)
            yield pair
            with trio.fail_after(limit_s):
                await pair._close_channel()
                for end in (pair.b, pair.a):
                    await pair.aclose(end)
        finally:
            nursery.cancel_scope.cancel()


def run_pair(kind: PairKind, body: Callable[[Pair], Awaitable[None]], *, limit_s: float = LIMIT_S,
             **options: Any) -> None:
    """`trio.run` of ``body(pair)`` on a fresh `open_pair(kind, **options)`, all of it bounded by
    `fail_after(limit_s)`: under MockClock (autojump) for memory kinds, the real clock for libp2p."""
    async def main() -> None:
        with trio.fail_after(limit_s):
            async with open_pair(kind, limit_s=limit_s, **options) as pair:
                await body(pair)

    clock = _mock_clock() if kind.startswith("memory") else None
    try:
        trio.run(main, clock=clock)
    except BaseException as e:   # the body runs inside the pair's nursery: unwrap a lone failure
        inner: BaseException = e
        while len(getattr(inner, "exceptions", ())) == 1:
            inner = inner.exceptions[0]   # type: ignore[attr-defined]
        if inner is e:
            raise
        raise inner.with_traceback(inner.__traceback__) from None
