"""In-process transport over trio memory channels, for the simulator and the tests.

Theory of operation: a `MemoryNetwork` is the wire; `network.endpoint(peer_id)` gives each peer a
`MemoryTransport`. The sender's identity is the endpoint it sends from, so it is authenticated by
construction. Two modes:
- `wire=True`: every frame is encoded, signed, copied as bytes and decoded by the receiver with the
  real codec, exactly as over libp2p (tests use this to exercise every rejection path).
- `wire=False` (the simulator's default): frames travel as objects. Peers never mutate a vector
  after sending it, so no copy is needed; the receiver still checks schema, size and finiteness, so
  NaN/Inf never reach an aggregator. Signing is skipped: in one process it proves nothing and
  Ed25519 verification would cost as much as a training step of a small model.
Impairments are deterministic under the network's seed: `latency_s` (per link, virtual time under
MockClock), `loss` (a drop decided by hashing seed, link and step, so independent of scheduling) and
partitions (`block`/`partition`/`heal`).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import AsyncIterator, Iterable, Mapping

import trio

from p2pfl.errors import ConfigError, Reject, RemoteProtocolError
from p2pfl.gossip import codec
from p2pfl.gossip import payloads as payloads_module
from p2pfl.gossip.codec import Frame
from p2pfl.gossip.identity import Identity
from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.peers.transport import TransportStats


class MemoryNetwork:
    def __init__(self, *, wire: bool = False, latency_s: float = 0.0, loss: float = 0.0, seed: int = 0,
                 schema: str | None = None, max_frame_bytes: int = 1 << 30, inbox_frames: int = 4096) -> None:
        if latency_s < 0 or not 0 <= loss < 1:
            raise ConfigError(f"memory network: latency_s must be >= 0 and loss in [0, 1), got {latency_s}, {loss}")
        self.wire, self.latency_s, self.loss, self.seed = wire, latency_s, loss, seed
        self.schema, self.max_frame_bytes, self.inbox_frames = schema, max_frame_bytes, inbox_frames
        self.link_latency: dict[tuple[str, str], float] = {}
        self._endpoints: dict[str, MemoryTransport] = {}
        self._blocked: set[frozenset[str]] = set()

    def endpoint(self, identity: Identity | str) -> MemoryTransport:
        ep = MemoryTransport(self, identity)
        if ep.local_id in self._endpoints:
            raise ConfigError(f"peer {ep.local_id} is already attached to this network")
        self._endpoints[ep.local_id] = ep
        return ep

    def block(self, a: str, b: str) -> None:
        self._blocked.add(frozenset((a, b)))

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Cut every link between different groups."""
        groups = [set(g) for g in groups]
        for g1, g2 in itertools.combinations(groups, 2):
            for a in g1:
                for b in g2:
                    self.block(a, b)

    def heal(self) -> None:
        self._blocked.clear()

    def _dropped(self, sender: str, receiver: str, frame: Frame) -> bool:
        if frozenset((sender, receiver)) in self._blocked:
            return True
        if self.loss == 0:
            return False
        key = f"{self.seed}|{sender}|{receiver}|{frame.kind}|{frame.round}|{frame.step}".encode()
        draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
        return draw < self.loss


class MemoryTransport:
    def __init__(self, network: MemoryNetwork, identity: Identity | str) -> None:
        self.network = network
        self.identity = identity if isinstance(identity, Identity) else None
        if network.wire and self.identity is None:
            raise ConfigError("a wire-mode memory network needs an Identity per peer to sign frames")
        self._id = identity.peer_id if isinstance(identity, Identity) else identity
        self.stats = TransportStats()
        self._send, self._inbox = trio.open_memory_channel[tuple[float, str, object]](network.inbox_frames)
        self._closed = False
        self.payloads: Mapping[str, PayloadSpec] | None = None   # None: any kind and size (tests, tools)
        self.max_frame_bytes = network.max_frame_bytes

    def expect(self, payloads: Mapping[str, PayloadSpec]) -> None:
        self.payloads = dict(payloads)
        self.max_frame_bytes = min(self.network.max_frame_bytes, payloads_module.max_frame_bytes(payloads))

    @property
    def local_id(self) -> str:
        return self._id

    async def send(self, peer: str, frame: Frame) -> bool:
        net = self.network
        target = net._endpoints.get(peer)
        if target is None or target._closed or self._closed or net._dropped(self._id, peer, frame):
            self.stats.send_failures += 1
            return False
        if net.wire:
            assert self.identity is not None
            item: object = b"".join(codec.encode(self.identity, kind=frame.kind, round=frame.round, step=frame.step,
                                                 schema=frame.schema, payload=frame.payload, dtype=frame.dtype))
            size = len(item)  # type: ignore[arg-type]
        else:
            item, size = frame, frame.payload.nbytes
        latency = net.link_latency.get((self._id, peer), net.latency_s)
        try:
            target._send.send_nowait((trio.current_time() + latency, self._id, item))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.stats.send_failures += 1
            return False
        self.stats.frames_sent += 1
        self.stats.bytes_sent += size
        return True

    def _accept(self, sender: str, item: object) -> Frame:
        net = self.network
        if isinstance(item, (bytes, bytearray)):
            self.stats.bytes_received += len(item)
            # peer=: a frame claiming another sender is FORGED_SENDER, as over libp2p
            frame = codec.decode(item, schema=net.schema, max_frame_bytes=self.max_frame_bytes, peer=sender,
                                 check_finite=self.payloads is None)   # payloads_module.check scans it instead
        else:
            assert isinstance(item, Frame)
            frame = item
            self.stats.bytes_received += frame.payload.nbytes
            if frame.payload.nbytes + codec.FRAME_PREFIX_BYTES > self.max_frame_bytes:
                raise RemoteProtocolError(Reject.OVERSIZE, f"{frame.payload.nbytes} payload bytes", sender)
            if net.schema is not None and frame.schema != net.schema:
                raise RemoteProtocolError(Reject.WRONG_SCHEMA, "", sender)
            if self.payloads is None and not codec.all_finite(frame.payload, frame.dtype):
                raise RemoteProtocolError(Reject.NON_FINITE, "", sender)
        if self.payloads is not None:
            payloads_module.check(frame.kind, frame.dtype, frame.payload, self.payloads, sender)
        return frame

    async def receive(self) -> AsyncIterator[tuple[str, Frame]]:
        pending: list[tuple[float, int, str, object]] = []   # (due, seq, sender, item): a heap
        seq = itertools.count()
        while True:
            while pending and pending[0][0] <= trio.current_time():
                _, _, sender, item = heapq.heappop(pending)
                try:
                    frame = self._accept(sender, item)
                except RemoteProtocolError as e:
                    self.stats.reject(e.reason)
                    continue
                self.stats.frames_received += 1
                yield sender, frame
            try:
                if pending:  # wait for the next arrival, or until the earliest held frame is due
                    with trio.move_on_at(pending[0][0]):
                        due, sender, item = await self._inbox.receive()
                        heapq.heappush(pending, (due, next(seq), sender, item))
                else:
                    due, sender, item = await self._inbox.receive()
                    heapq.heappush(pending, (due, next(seq), sender, item))
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            # take what else is queued now, without a scheduler round trip per frame (at hundreds of
            # peers those trips cost more than the frames' checks)
            while True:
                try:
                    due, sender, item = self._inbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break  # a closed inbox ends the loop at the next await
                heapq.heappush(pending, (due, next(seq), sender, item))

    async def aclose(self) -> None:
        self._closed = True
        await self._send.aclose()
        self.network._endpoints.pop(self._id, None)
