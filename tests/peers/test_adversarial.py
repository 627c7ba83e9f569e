"""Adversarial: a hostile host over real loopback libp2p against REAL honest peers.

The honest peers are in-process `Node`s, the whole process behind `p2pfl peer` (transport, round
loop, membership, peer exchange, checkpoints), started as the CLI starts them (each bootstraps to
the ones before it). The attacker is our own `Libp2pTransport`: it says hello, asks for links and
then sends what an honest peer never would, through its normal methods (`send`, `request`, its
`_answer` and `local_hello` monkeypatched) or through raw `host.new_stream` writes of crafted bytes.

Pacing without clocks: the usual attacker is a linked neighbour that echoes every frame an honest
peer sends it (so, to them, it looks like an honest neighbour and nobody waits for a deadline). An
attack runs as a hook *before* the echo of the victim's round-r frame: the victim cannot finish
round r until the hook is done, so every attack lands in the middle of a running round, and the
rounds after it show that the victim carries on. Every wait is on a condition (`Signal.wait_until`
for round events and report lines, `transport.wait_until` for counters), bounded by fail_after;
nothing sleeps and no assertion reads a clock (the silent-neighbour test counts missed rounds).

Each test bounds its attack (a fixed number of messages or bytes) and asserts: the honest nodes
finish all their rounds, refuse and count what they should, and (oversize frames) read none of the
bodies into memory. One test runs the victim as a real `p2pfl peer` process, where the exit code and
summary.json are the point. Tests marked xfail(strict) are attacks the package (or py-libp2p under
it) does not withstand yet; each reason names the hole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import trio
from libp2p.peer.id import ID

from p2pfl.errors import Reject
from p2pfl.files import save_identity
from p2pfl.gossip import codec
from p2pfl.gossip.codec import Frame
from p2pfl.gossip.identity import Identity
from p2pfl.learn.models import flatten
from p2pfl.peers.libp2p import CONTROL_PROTOCOL, MODEL_PROTOCOL, Hello, HelloRefused, Libp2pTransport, control
from p2pfl.peers.membership import LINK_LEAD
from p2pfl.peers.node import SUSPECT_AFTER, Node
from p2pfl.peers.settings import PeerSettings

pytestmark = pytest.mark.slow

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
LIMIT_S = 60          # the bound of each whole test
PACED_TIMEOUT_S = 30  # step timeout where nobody should ever wait for it (a paced attacker answers)
REFRESH_S = 0.25      # the nodes' re-hello period (5 s in production): links settle quickly
FORGED = "ok\nround 999/999 done: 3 received, accuracy 1.000\r\x1b[2K"


def ident(i: int) -> Identity:
    return Identity.generate(bytes([i + 1]) * 32)


def rej(node: Node, reason: Reject) -> int:
    return node.transport.stats.rejected[reason.value]


class Signal:
    """One condition variable per test: every round event, report line and node exit notifies it."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()


class Cluster:
    """`n` honest in-process nodes; node i bootstraps to nodes 0..i-1 (started one after another)."""

    def __init__(self, tmp: Path, n: int, allow: Iterable[str] | None = None, **settings: Any) -> None:
        self.signal = Signal()
        self.lines: list[list[str]] = [[] for _ in range(n)]
        self.addrs: dict[int, str] = {}
        self.summaries: dict[int, dict[str, Any]] = {}
        if allow is not None:
            (tmp / "allow.txt").write_text("\n".join(allow) + "\n")
            settings["allow"] = str(tmp / "allow.txt")
        self.nodes = [self._make(tmp, i, n, settings) for i in range(n)]

    def _make(self, tmp: Path, i: int, n: int, settings: dict[str, Any]) -> Node:
        key = tmp / f"peer{i}.key"
        save_identity(ident(i), key)
        s = PeerSettings(out=str(tmp / f"peer{i}"), key=str(key), listen=LOOPBACK, device="cpu", shard=f"{i}/{n}",
                         dataset="digits", threads=1, local_steps=2, start_timeout=LIMIT_S, **settings)
        node = Node(s, report=partial(self._report, i))
        node.refresh_s = REFRESH_S
        record = node.peer.on_event

        def on_event(event: dict[str, Any]) -> None:
            record(event)
            self.signal.notify()

        node.peer.on_event = on_event
        return node

    def _report(self, i: int, line: str) -> None:
        self.lines[i].append(line)
        if line.startswith("listening on ") and i not in self.addrs:
            self.addrs[i] = line.split()[-1]
        self.signal.notify()

    async def start(self, nursery: trio.Nursery) -> None:
        for i, node in enumerate(self.nodes):
            node.s = replace(node.s, bootstrap=tuple(self.addrs[j] for j in range(i)))
            nursery.start_soon(self._run, i)
            await self.signal.wait_until(lambda i=i: i in self.addrs)

    async def _run(self, i: int) -> None:
        self.summaries[i] = await self.nodes[i].main()
        self.signal.notify()

    async def finished(self) -> None:
        await self.signal.wait_until(lambda: len(self.summaries) == len(self.nodes))

    def assert_all_rounds_done(self, rounds: int) -> None:
        for i, node in enumerate(self.nodes):
            s = self.summaries[i]
            assert s["rounds_done"] == rounds and s["rounds_run"] == rounds, s
            assert [e["round"] for e in node.events] == list(range(rounds))
            assert torch.isfinite(flatten(node.peer.model)).all()
            progress = [ln for ln in self.lines[i] if ln.startswith("round ")]
            assert len(progress) == rounds, progress
            for r, ln in enumerate(progress):   # the node's own lines only: nothing a peer said
                assert re.fullmatch(rf"round {r + 1}/{rounds} done: \d+ received(, accuracy \d\.\d{{3}})?", ln), ln


Hook = Callable[[], Awaitable[bool | None]]   # returns False: send no echo


class Attacker:
    """Our own Libp2pTransport as a hostile host. With `echo`, every frame an honest peer sends it
    is answered with a copy (for the same round and step) after that frame's hook, if any, ran."""

    def __init__(self, i: int, hello: Hello, *, echo: bool = True, grant_links: bool = True, **kw: Any) -> None:
        self.t = Libp2pTransport(ident(i), hello, listen=LOOPBACK, **kw)
        self.id = self.t.local_id
        self.schema = hello.schema
        self.echo, self.grant_links = echo, grant_links
        self.hooks: dict[tuple[str, int], Hook] = {}
        self.seen: list[tuple[str, int, bool]] = []   # (sender, round, all finite) of each frame received
        self.t.on_control = self._on_control

    async def _on_control(self, peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        if msg["t"] == "link":
            return {"t": "link", "ok": self.grant_links}
        return {"t": "error", "error": "no"}

    def at(self, peer: str, round_: int) -> Callable[[Hook], Hook]:
        """Decorator: run the hook when `peer`'s frame for `round_` arrives, before answering it."""
        def register(hook: Hook) -> Hook:
            self.hooks[(peer, round_)] = hook
            return hook
        return register

    async def join(self, node: Node, *, link: bool = True) -> None:
        await self.t.connect(node.transport.listen_addrs()[0])
        if link:
            reply = await self.t.request(node.identity.peer_id, {"t": "link"})
            # (the round it starts at: 0 before the node runs, else LINK_LEAD rounds on)
            assert reply["ok"] is True and reply.keys() == {"t", "ok", "round"}, reply

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            async for sender, frame in self.t.receive():
                self.seen.append((sender, frame.round, bool(np.isfinite(frame.payload).all())))
                nursery.start_soon(self._answer_frame, sender, frame.round, frame.step, frame.payload.copy())

    async def _answer_frame(self, peer: str, round_: int, step: int, payload: np.ndarray) -> None:
        hook = self.hooks.pop((peer, round_), None)
        if hook is not None and await hook() is False:
            return
        if self.echo:
            await self.t.send(peer, Frame("model", self.id, round_, step, self.schema, "f32", payload))

    async def put(self, peer: str, frame: Frame) -> None:
        """Send one frame through our normal writer (the bulk channel) and wait until it is written."""
        assert await self.t.send(peer, frame)
        await self.t.flush()

    def frame(self, kind: str, round_: int, arr: np.ndarray) -> Frame:
        dtype = {np.float32: "f32", np.float16: "f16", np.uint16: "bf16"}[arr.dtype.type]
        return Frame(kind, self.id, round_, 0, self.schema, dtype, arr)

    def encoded(self, kind: str, round_: int, arr: np.ndarray) -> bytes:
        """A validly signed frame (our identity, the federation's schema) as raw bytes."""
        return b"".join(codec.encode(self.t.identity, kind=kind, round=round_, step=0, schema=self.schema,
                                     payload=arr))

    async def stream(self, peer: str, protocol: Any) -> Any:
        return await self.t.host.new_stream(ID.from_base58(peer), [protocol])


async def run(cluster: Cluster, attackers: list[Attacker], join: Callable[[], Awaitable[None]]) -> None:
    """Start the attackers, the honest nodes, `join` (the attackers connect), and wait for every
    node to finish its rounds."""
    with trio.fail_after(LIMIT_S):
        async with AsyncExitStack() as stack:
            for a in attackers:
                await stack.enter_async_context(a.t)
            async with trio.open_nursery() as nursery:
                for a in attackers:
                    nursery.start_soon(a.serve)
                await cluster.start(nursery)
                await join()
                await cluster.finished()
                nursery.cancel_scope.cancel()


def _bf16(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def mismatched(d: int) -> list[tuple[str, np.ndarray, Reject]]:
    """(kind, payload, the reason the victim must count) of frames that do not fit a model of d values."""
    nan = np.ones(d, np.float32)
    nan[d // 2] = np.nan
    return [
        ("model", np.ones(d - 1, np.float32), Reject.WRONG_SIZE),
        ("model", np.ones(d + 1, np.float32), Reject.WRONG_SIZE),
        ("model", np.ones(0, np.float32), Reject.WRONG_SIZE),
        ("model", np.ones(d, np.float16), Reject.WRONG_DTYPE),
        ("model", _bf16(np.ones(d)), Reject.WRONG_DTYPE),
        ("scores", np.ones(d, np.float32), Reject.UNKNOWN_KIND),
        ("model", np.full(d, 3e38, np.float32), Reject.OUT_OF_RANGE),
        ("model", nan, Reject.NON_FINITE),
    ]


# -- 1, 7: payloads that do not fit the model ---------------------------------------------------------

def test_mismatched_payloads_from_a_linked_neighbour_are_refused_and_counted(tmp_path):
    """A linked neighbour sends, in the middle of the victim's round 1, eight validly signed frames
    that do not fit the model (wrong length, empty, f16, bf16, unknown kind, 3e38, NaN) for rounds
    1 and 2, over its bulk channel and again over a raw /p2pfl/model/1 stream; at round 2 it sends
    a legal but absurd vector (every value 1e6). The victim refuses each crafted frame once with its
    reason, mixes only its neighbours' real frames (nobody missing, no wait for a deadline), and all
    three nodes finish their rounds with finite models and send only finite vectors."""
    rounds = 4
    cluster = Cluster(tmp_path, 3, rounds=rounds, degree=3, min_neighbors=3, step_timeout=PACED_TIMEOUT_S)
    victim = cluster.nodes[0]
    x = Attacker(50, victim.transport.hello_template)
    d = victim.peer.layout.size
    crafted = mismatched(d)
    expected = {r.value: 2 * sum(1 for *_, why in crafted if why is r) for r in {why for *_, why in crafted}}

    @x.at(victim.identity.peer_id, 1)
    async def attack() -> None:
        before = victim.peer.round
        for i, (kind, arr, _) in enumerate(crafted):       # bulk channel (the attacker's normal path)
            await x.put(victim.identity.peer_id, x.frame(kind, 1 + i % 2, arr))
        await victim.transport.wait_until(lambda: sum(victim.transport.stats.rejected.values()) == len(crafted))
        s = await x.stream(victim.identity.peer_id, MODEL_PROTOCOL)   # a raw libp2p stream
        for i, (kind, arr, _) in enumerate(crafted):
            await s.write(x.encoded(kind, 1 + i % 2, arr))
        await victim.transport.wait_until(lambda: sum(victim.transport.stats.rejected.values()) == 2 * len(crafted))
        await s.close()
        assert victim.peer.round == before == 1              # all of it landed inside round 1

    @x.at(victim.identity.peer_id, 2)
    async def absurd() -> bool:                              # legal (|x| <= 1e6), instead of the echo
        await x.put(victim.identity.peer_id, x.frame("model", 2, np.full(d, 1e6, np.float32)))
        return False

    async def join() -> None:
        for node in cluster.nodes:
            await x.join(node)

    trio.run(run, cluster, [x], join)
    cluster.assert_all_rounds_done(rounds)
    assert dict(victim.transport.stats.rejected) == expected
    assert cluster.summaries[0]["rejected"] == expected
    for node in cluster.nodes:
        assert all(e["missing"] == [] and e["received"] == 3 for e in node.events), node.events
    assert all(finite for *_, finite in x.seen) and len(x.seen) == 3 * rounds


# -- 2: malformed control messages --------------------------------------------------------------------

def test_malformed_control_messages_are_counted_never_fatal(tmp_path):
    """A linked neighbour answers every bulk-ticket request with a map holding a bytes key, so each
    honest node counts one bad_header and sends its frames over a libp2p stream instead. In the
    victim's round 1 it sends control requests with a bytes key at the top, a bytes key inside the
    settings, bytes where strings belong, an int key, garbage msgpack and a 1 MB length prefix; each
    is one counted refusal and a reset stream. Then it answers the victim's own periodic re-hellos
    with a bytes key (this used to raise TypeError through the node's refresh and end the process):
    counted each time, and the node goes on. Every node finishes its rounds, nobody missing."""
    rounds = 4
    cluster = Cluster(tmp_path, 3, rounds=rounds, degree=3, min_neighbors=3, step_timeout=PACED_TIMEOUT_S)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    x = Attacker(50, victim.transport.hello_template)
    answer = x.t._answer
    lie_to_hellos = False

    async def lying_answer(peer: str, msg: dict[str, Any], stream: Any) -> dict[str, Any]:
        reply = await answer(peer, msg, stream)
        if msg["t"] == "bulk" or (msg["t"] == "hello" and peer == vid and lie_to_hellos):
            return {**reply, b"t": "x"}
        return reply

    x.t._answer = lying_answer   # type: ignore[method-assign]

    @x.at(vid, 1)
    async def attack() -> None:
        nonlocal lie_to_hellos
        hello = x.t.local_hello(exclude=vid).to_wire()
        bad_requests = [
            ({**hello, b"t": "hello"}, Reject.BAD_HEADER),                  # bytes key beside the str ones
            ({**hello, "settings": {b"dataset": "digits"}}, Reject.BAD_HEADER),
            ({**hello, "peers": [b"/ip4/127.0.0.1/tcp/1"]}, Reject.BAD_HEADER),
            ({"t": "link", b"t": "link"}, Reject.BAD_HEADER),
            ({"t": "link", 7: 1}, Reject.BAD_MSGPACK),                       # msgpack's strict_map_key
        ]
        for msg, reason in bad_requests:
            before = dict(victim.transport.stats.rejected)
            with pytest.raises(ConnectionError):      # no reply: the victim resets the stream
                await x.t.request(vid, msg)
            assert rej(victim, reason) == before.get(reason.value, 0) + 1, (msg, reason)
        for raw, reason in [(b"\x00\x00\x00\x03\xc1\xc1\xc1", Reject.BAD_MSGPACK),
                            ((1 << 20).to_bytes(4, "big") + b"\x80" * 64, Reject.OVERSIZE)]:
            n = rej(victim, reason)
            s = await x.stream(vid, CONTROL_PROTOCOL)
            await s.write(raw)
            await victim.transport.wait_until(lambda r=reason, n=n: rej(victim, r) == n + 1)
        n = rej(victim, Reject.BAD_HEADER)
        lie_to_hellos = True          # the victim's own re-hellos (every REFRESH_S) now get a bytes key
        await victim.transport.wait_until(lambda: rej(victim, Reject.BAD_HEADER) >= n + 2)
        lie_to_hellos = False
        assert victim.peer.round == 1 and x.id in victim.transport.peers   # counted, not dropped

    async def join() -> None:
        for node in cluster.nodes:
            await x.join(node)

    trio.run(run, cluster, [x], join)
    cluster.assert_all_rounds_done(rounds)
    for node in cluster.nodes:
        assert all(e["missing"] == [] and e["received"] == 3 for e in node.events), node.events
        assert rej(node, Reject.BAD_HEADER) >= 1        # the ticket (and, for the victim, much more)
    assert x.t.bulk_peers == []                         # no honest node used the lying ticket
    assert len(x.seen) == 3 * rounds                    # their frames came over libp2p streams
    got = cluster.summaries[0]["rejected"]
    assert got["bad_header"] >= 1 + 4 + 2 and got["bad_msgpack"] == 2 and got["oversize"] == 1, got


# -- 3: a liar's round claim ------------------------------------------------------------------------

def test_a_liars_round_claim_moves_no_one(tmp_path):
    """A linked neighbour claims round 10**12 in every hello it sends or answers, says it again in the
    middle of round 1, and sends a frame for round 10**12. With two honest neighbours at the real
    round, no node catches up: each runs every round 0..R-1 in order (no `catching up` line, no
    catch_up event); the far-future frame is refused as too_far_ahead."""
    rounds = 4
    cluster = Cluster(tmp_path, 3, rounds=rounds, degree=3, min_neighbors=3, step_timeout=PACED_TIMEOUT_S)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    x = Attacker(50, victim.transport.hello_template)
    x.t.round = 10**12
    d = victim.peer.layout.size

    @x.at(vid, 1)
    async def lie() -> None:
        await x.put(vid, x.frame("model", 10**12, np.zeros(d, np.float32)))
        claim = await x.t.hello(vid)
        assert claim.round == 1

    async def join() -> None:
        for node in cluster.nodes:
            await x.join(node)

    trio.run(run, cluster, [x], join)
    cluster.assert_all_rounds_done(rounds)
    for i, node in enumerate(cluster.nodes):
        assert node.transport.peers[x.id].round == 10**12           # the claim did arrive
        assert not [ln for ln in cluster.lines[i] if ln.startswith("catching up")]
        events = [json.loads(ln) for ln in (node.out / "metrics.jsonl").read_text().splitlines()]
        assert not [e for e in events if e["kind"] == "catch_up"]
        assert [e["round"] for e in events if e["kind"] == "round"] == list(range(rounds))
    assert victim.peer.rejected["too_far_ahead"] == 1


# -- 4: oversize frames from an accepted non-neighbour ----------------------------------------------

def test_oversize_frames_from_a_non_neighbour_are_refused_before_the_body(tmp_path):
    """An accepted peer that is nobody's neighbour sends twelve whole 4 MiB frames (validly signed,
    1M floats) on twelve raw model streams, then one more over its bulk channel, all in the middle
    of the victim's round 1 (a second, linked attacker holds the round open). The derived frame limit
    (~20 KB for this model) refuses each from its length prefix: 13 oversize, none of their body
    bytes read (only the honest ~20 KB frames that arrive meanwhile), the receive-buffer pool within
    its bound, and the process's resident memory grows by less than half of the 52 MiB sent (the
    attacker runs in this process too)."""
    psutil = pytest.importorskip("psutil")
    rounds = 3
    cluster = Cluster(tmp_path, 3, rounds=rounds, degree=3, min_neighbors=3, step_timeout=PACED_TIMEOUT_S)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    x = Attacker(50, victim.transport.hello_template)
    y = Attacker(51, victim.transport.hello_template, echo=False, grant_links=False)
    big = np.ones(1 << 20, np.float32)
    frame_bytes = y.encoded("model", 1, big)
    seen: dict[str, int] = {}

    @x.at(vid, 1)
    async def flood() -> None:
        proc = psutil.Process()
        rss, got = proc.memory_info().rss, victim.transport.stats.bytes_received
        for k in range(12):
            s = await y.stream(vid, MODEL_PROTOCOL)
            try:
                await s.write(frame_bytes)
            except Exception:   # the victim reset the stream mid-write: fine
                pass
            await victim.transport.wait_until(lambda k=k: rej(victim, Reject.OVERSIZE) == k + 1)
            try:
                await s.reset()
            except Exception:   # already reset
                pass
        assert await y.t.send(vid, y.frame("model", 1, big))         # the bulk channel
        await victim.transport.wait_until(lambda: rej(victim, Reject.OVERSIZE) == 13)
        seen["body_bytes"] = victim.transport.stats.bytes_received - got
        seen["rss_growth"] = proc.memory_info().rss - rss
        seen["pool"] = victim.transport._buffers.held_bytes
        assert victim.peer.round == 1

    async def join() -> None:
        await y.join(victim, link=False)   # first: rounds start once x is linked to everyone
        for node in cluster.nodes:
            await x.join(node)

    trio.run(run, cluster, [x, y], join)
    cluster.assert_all_rounds_done(rounds)
    assert victim.transport.max_frame_bytes < 64 * 1024 < len(frame_bytes)
    assert rej(victim, Reject.OVERSIZE) == 13
    # honest frames (~20 KB each) are all that was read while the 52 MiB came in
    assert seen["body_bytes"] < 10 * victim.transport.max_frame_bytes, seen
    assert seen["pool"] <= victim.transport._buffers.keep * victim.transport.max_frame_bytes, seen
    # Resident memory: this process also holds the attacker's side, and py-libp2p keeps the unread
    # part of each reset stream (~300 KB here) for a 60 s grace period; 8-15 MB measured on 2 cores.
    # Reading and keeping the bodies (52 MB) could not stay under half of it.
    assert seen["rss_growth"] < 13 * len(frame_bytes) // 2, seen
    assert y.id not in victim.peer.tracker.neighbors and not victim.peer.rejected.get("unknown_peer")
    for node in cluster.nodes:
        assert all(e["missing"] == [] for e in node.events)


# -- 5: a silent neighbour ------------------------------------------------------------------------------

def test_a_silent_neighbour_is_set_aside_and_cannot_take_its_slot_back(tmp_path):
    """Two honest nodes, an echoing neighbour E and a linked neighbour X that never sends a frame.
    Rounds 0-2 each wait the step deadline for X; then X is set aside (2 rounds, then one round of
    probation and 4 more): in rounds 3 and 4 nobody waits for it. While set aside (the victim's
    round 3, held open by E) X says hello again and asks for its link back: refused, still set
    aside. Over 7 rounds X is missed in at most 4 (in 7 without the set-aside)."""
    rounds = 7   # (1.5 s: two honest nodes must each hear the other within a deadline, 2 shared cores)
    cluster = Cluster(tmp_path, 2, rounds=rounds, degree=3, min_neighbors=3, step_timeout=1.5)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    e = Attacker(50, victim.transport.hello_template)
    x = Attacker(51, victim.transport.hello_template, echo=False)
    probes: list[dict[str, Any]] = []

    @e.at(vid, 3)
    async def probe() -> None:
        assert x.id in victim.benched and x.id not in victim.peer.tracker.neighbors
        probes.append(await x.t.request(vid, {"t": "link"}))
        await x.t.hello(vid)                        # a hello does not clear its missed rounds
        assert x.id in victim.benched
        probes.append(await x.t.request(vid, {"t": "link"}))

    async def join() -> None:
        for node in cluster.nodes:
            await e.join(node)
            await x.join(node)

    trio.run(run, cluster, [e, x], join)
    cluster.assert_all_rounds_done(rounds)
    assert probes == [{"t": "link", "ok": False}] * 2
    for node in cluster.nodes:
        missed = [ev["round"] for ev in node.events if x.id in ev["missing"]]
        assert missed[:SUSPECT_AFTER] == [0, 1, 2] and 3 not in missed and 4 not in missed, missed
        assert len(missed) <= SUSPECT_AFTER + 1, missed          # at most one probation round
        # until X's probation nobody else is missed (after it, the node whose probation round came
        # first may send its next frame a deadline late to the other); nobody else is ever set aside
        assert all(ev["missing"] in ([], [x.id]) for ev in node.events[:5]), node.events
        assert set(node.offences) == {x.id}, node.offences
        assert node.events[3]["neighbors"] == node.events[4]["neighbors"] == 2
        assert node.offences[x.id] >= 1
    assert x.seen == [] or all(s != x.id for s, *_ in x.seen)


# -- 5 (slots): fake identities and link slots -------------------------------------------------------

def test_fake_silent_identities_cannot_hold_every_link_slot(tmp_path):
    """The victim (degree 5: up to 7 link slots) gets E (an echoing neighbour) and six silent fake
    identities before an honest peer H arrives: H's link request is refused, every slot is taken.
    After 3 missed rounds the fakes are set aside and their slots freed: in the victim's round 3 the
    fakes' requests are refused and H's granted, to start at round 5 (LINK_LEAD rounds on), and from
    then on the victim mixes with H."""
    rounds = 7
    cluster = Cluster(tmp_path, 1, rounds=rounds, degree=5, min_neighbors=7, step_timeout=1.0)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    tmpl = victim.transport.hello_template
    e = Attacker(50, tmpl)
    fakes = [Attacker(60 + k, tmpl, echo=False) for k in range(6)]
    h = Attacker(51, tmpl)          # honest: asks for a link, answers every frame
    asked: dict[str, Any] = {}

    @e.at(vid, 3)
    async def after_bench() -> None:
        asked["fakes"] = [await f.t.request(vid, {"t": "link"}) for f in fakes]
        asked["h_after"] = await h.t.request(vid, {"t": "link"})

    async def join() -> None:
        await e.join(victim)
        for f in fakes:
            await f.join(victim)
        await h.join(victim, link=False)
        asked["h_before"] = await h.t.request(vid, {"t": "link"})

    trio.run(run, cluster, [e, h, *fakes], join)
    cluster.assert_all_rounds_done(rounds)
    fake_ids = sorted(f.id for f in fakes)
    assert asked["h_before"] == {"t": "link", "ok": False}
    assert asked["fakes"] == [{"t": "link", "ok": False}] * 6
    # granted; it starts at round 5 (LINK_LEAD on), or at once where the victim, refreshing, asked H
    # first (this test's H grants without naming a round)
    assert asked["h_after"]["ok"] is True and asked["h_after"]["round"] in (3, 3 + LINK_LEAD), asked
    assert [ev["missing"] for ev in victim.events[:3]] == [fake_ids] * 3
    for ev in victim.events[5:]:
        assert ev["missing"] == [] and ev["received"] == 2 and ev["neighbors"] == 2, ev
    assert h.id in victim.links and any(s == vid for s, *_ in h.seen)


def test_a_set_aside_neighbour_is_not_offered_its_link_back_by_its_hello(tmp_path):
    """A silent linked neighbour X is set aside after 3 missed rounds. In the victim's round 3 (held
    open by an echoing neighbour E) X says hello again. While X is set aside the victim must not
    offer it a link slot: X is never asked for a link while set aside (the victim's own periodic
    re-hellos reach the same code), and it is out of the victim's links a round later."""
    rounds = 5
    cluster = Cluster(tmp_path, 1, rounds=rounds, degree=2, min_neighbors=2, step_timeout=1.0)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    e = Attacker(50, victim.transport.hello_template)
    x = Attacker(51, victim.transport.hello_template, echo=False)
    asked_while_set_aside: list[int] = []     # the victim's rounds in which it asked X for a link
    grant = x._on_control

    async def on_control(peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        if msg["t"] == "link" and x.id in victim.benched:
            asked_while_set_aside.append(victim.peer.round)
        return await grant(peer, msg)

    x.t.on_control = on_control
    links_in_round_4: list[set[str]] = []

    @e.at(vid, 3)
    async def hello_again() -> None:
        assert x.id in victim.benched and x.id not in victim.links
        await x.t.hello(vid)

    @e.at(vid, 4)
    async def look() -> None:
        links_in_round_4.append(set(victim.links))

    async def join() -> None:
        await e.join(victim)
        await x.join(victim)

    trio.run(run, cluster, [e, x], join)
    cluster.assert_all_rounds_done(rounds)
    assert [ev["round"] for ev in victim.events if x.id in ev["missing"]] == [0, 1, 2]
    assert x.id not in links_in_round_4[0]
    assert asked_while_set_aside == [], asked_while_set_aside


def test_refused_identities_cannot_hold_every_link_slot(tmp_path):
    """The same slots, held another way: six fake identities take link slots, then each gets itself
    refused (a hello with another model schema). A refused peer is no longer accepted, so it is never
    an active neighbour, never misses a round and is never set aside. An honest peer that asks two
    rounds later must still get a link."""
    rounds = 5
    cluster = Cluster(tmp_path, 1, rounds=rounds, degree=5, min_neighbors=1, step_timeout=PACED_TIMEOUT_S)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    tmpl = victim.transport.hello_template
    e = Attacker(50, tmpl)
    fakes = [Attacker(60 + k, tmpl, echo=False) for k in range(6)]
    h = Attacker(51, tmpl)
    asked: dict[str, Any] = {}

    @e.at(vid, 1)
    async def take_slots() -> None:
        for f in fakes:
            await f.join(victim)
            # from now on every hello it sends or answers names another model: refused each time
            f.t.hello_template = replace(f.t.hello_template, schema="0" * 32)
            assert (await f.t.request(vid, f.t.local_hello(exclude=vid).to_wire()))["t"] == "refused"
        assert not {f.id for f in fakes} & set(victim.transport.peers)

    @e.at(vid, 3)
    async def ask() -> None:
        await h.join(victim, link=False)
        asked["h"] = await h.t.request(vid, {"t": "link"})

    async def join() -> None:
        await e.join(victim)

    trio.run(run, cluster, [e, h, *fakes], join)
    cluster.assert_all_rounds_done(rounds)
    assert asked["h"] == {"t": "link", "ok": True, "round": 3 + LINK_LEAD}, (asked, sorted(victim.links))


# -- 6: peer exchange ---------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_peer_exchange_dials_no_bad_address_and_stays_within_budget(tmp_path):
    """A linked neighbour's hellos to the victim each list 32 peers: 20 bad ones (the victim's own
    listener under made-up IDs and its own ID elsewhere; DNS names; private, public, unspecified,
    link-local and multicast IPs, which a loopback-only node never dials; malformed strings) and 12
    plausible loopback ones under fresh made-up IDs. It says hello three times (joining, then twice
    in round 1), and the victim re-hellos it every refresh. The victim (its `transport.connect`
    spied on) dials none of the bad ones, 8 plausible ones per hello at most, 16 from this sender in
    all (its budget), counts every skip by reason, and finishes its rounds."""
    rounds = 3
    cluster = Cluster(tmp_path, 3, rounds=rounds, degree=3, min_neighbors=3, step_timeout=PACED_TIMEOUT_S)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    x = Attacker(50, victim.transport.hello_template)
    port = _closed_port()
    fake = iter(Identity.generate(k.to_bytes(2, "big") * 16).peer_id for k in range(1000, 1100))
    dialled: list[str] = []
    connect = victim.transport.connect

    async def spy(addr: str) -> Any:
        dialled.append(addr)
        cluster.signal.notify()
        return await connect(addr)

    victim.transport.connect = spy   # type: ignore[method-assign]
    plausible: list[str] = []
    lists: list[list[str]] = []
    own_port = {}

    def bad_list() -> dict[str, list[str]]:
        vport = own_port["port"]
        f = lambda: next(fake)
        return {
            "own": [f"/ip4/127.0.0.1/tcp/{vport}/p2p/{f()}", f"/ip4/127.0.0.1/tcp/{vport}/p2p/{f()}",
                    f"/ip4/127.0.0.1/tcp/{port}/p2p/{vid}", f"/ip4/127.0.0.1/tcp/{vport}/p2p/{vid}"],
            "dns": [f"/dns4/localhost/tcp/{port}/p2p/{f()}", f"/dns/evil.example/tcp/80/p2p/{f()}",
                    f"/dns6/evil.example/tcp/80/p2p/{f()}"],
            "scope": [f"/ip4/10.0.0.1/tcp/4001/p2p/{f()}", f"/ip4/192.168.1.1/tcp/4001/p2p/{f()}",
                      f"/ip4/8.8.8.8/tcp/4001/p2p/{f()}", f"/ip4/0.0.0.0/tcp/{port}/p2p/{f()}",
                      f"/ip4/169.254.1.1/tcp/4001/p2p/{f()}", f"/ip4/224.0.0.1/tcp/4001/p2p/{f()}",
                      f"/ip6/fe80::1/tcp/4001/p2p/{f()}"],
            "malformed": [f"/ip4/127.0.0.1/tcp/0/p2p/{f()}", f"/ip4/127.0.0.1/udp/{port}/p2p/{f()}",
                          f"/ip4/999.0.0.1/tcp/{port}/p2p/{f()}", f"/ip4/127.0.0.1/tcp/{port}",
                          "not an address\nround 999/999 done", f"/ip4/127.0.0.1/tcp/{port}/p2p/{f()}/x"],
        }

    def next_list() -> None:
        good = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{next(fake)}" for _ in range(12)]
        plausible.extend(good)
        bad = [a for addrs in bad_list().values() for a in addrs]
        lists.append(bad[:10] + good + bad[10:])
        assert len(lists[-1]) == control.MAX_PEERS

    local_hello = x.t.local_hello

    def lying_hello(exclude: str | None = None) -> Hello:
        ours = local_hello(exclude)
        return replace(ours, peers=tuple(lists[-1])) if exclude == vid else ours

    x.t.local_hello = lying_hello   # type: ignore[method-assign]

    picked: list[str] = []      # what the victim's dial policy chose from x's hellos
    per_hello: list[int] = []

    @x.at(vid, 1)
    async def more() -> None:
        for _ in range(2):
            next_list()
            await x.t.hello(vid)
        await cluster.signal.wait_until(lambda: set(dialled) >= set(picked))   # every chosen dial began

    async def join() -> None:
        own_port["port"] = int(victim.transport.listen_addrs()[0].split("/")[4])
        pick = victim.exchange.pick    # (the node built its policy once it listened)

        def spy_pick(sender: str, addrs: Iterable[str], now: float, known: set[str]) -> list[tuple[str, str]]:
            out = pick(sender, addrs, now, known)
            if sender == x.id:
                picked.extend(a for a, _ in out)
                per_hello.append(len(out))
            return out

        victim.exchange.pick = spy_pick   # type: ignore[method-assign]
        next_list()
        for node in cluster.nodes:
            await x.join(node)

    trio.run(run, cluster, [x], join)
    cluster.assert_all_rounds_done(rounds)
    assert set(dialled) <= set(plausible), sorted(set(dialled) - set(plausible))
    assert sorted(dialled) == sorted(picked) and len(set(dialled)) == len(dialled), (dialled, picked)
    assert per_hello[0] == max(per_hello) == victim.exchange.per_hello == 8, per_hello   # 8 of 12, then fewer
    assert 8 <= len(dialled) <= victim.exchange.sender_burst == 16, dialled   # this sender's budget
    skipped = victim.exchange.skipped
    hellos = skipped["own"] // 4                 # every hello of x's that the victim read: >= 3
    assert hellos >= 3 and skipped["own"] == 4 * hellos and skipped["dns"] == 3 * hellos, skipped
    assert skipped["scope"] == 7 * hellos and skipped["malformed"] == 6 * hellos, skipped
    assert skipped["sender_budget"] + skipped["cooldown"] >= 3 * 12 - 16, skipped


# -- 9: a refused outsider ------------------------------------------------------------------------------

def test_a_refused_outsider_learns_only_the_reason(tmp_path):
    """With an allowlist (the honest nodes and the pacing neighbour), an outsider that dials the victim
    in the middle of its round 1 gets `{"t": "refused", "v": 1, "reason": "not on the allowlist"}` and
    nothing else (no schema, settings, round, addresses or peers); its later link, ticket and model
    stream attempts get no more than "say hello first" or a closed connection; it never becomes a
    peer or a link, and every node finishes its rounds."""
    rounds = 3
    ids = [ident(i).peer_id for i in range(3)]
    x_id = ident(50).peer_id
    cluster = Cluster(tmp_path, 3, allow=[*ids, x_id], rounds=rounds, degree=3, min_neighbors=3,
                      step_timeout=PACED_TIMEOUT_S)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    x = Attacker(50, victim.transport.hello_template)
    o = Attacker(52, victim.transport.hello_template, echo=False)
    replies: list[dict[str, Any]] = []
    request = o.t.request

    async def spy(peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        reply = await request(peer, msg)
        replies.append(reply)
        return reply

    o.t.request = spy   # type: ignore[method-assign]

    @x.at(vid, 1)
    async def outsider() -> None:
        n = rej(victim, Reject.NOT_ALLOWED)
        with pytest.raises(HelloRefused, match="not on the allowlist"):
            await o.t.connect(victim.transport.listen_addrs()[0])
        assert replies == [control.refusal("not on the allowlist")]
        assert replies[0] == {"t": "refused", "v": 1, "reason": "not on the allowlist"}
        assert rej(victim, Reject.NOT_ALLOWED) == n + 1
        for msg in ({"t": "link"}, {"t": "bulk"}):
            try:
                await o.t.request(vid, msg)
            except ConnectionError:
                pass
        try:
            s = await o.stream(vid, MODEL_PROTOCOL)
            await s.write(o.encoded("model", 1, np.zeros(victim.peer.layout.size, np.float32)))
        except Exception:   # reset or disconnected: both fine
            pass
        assert all(r == {"t": "error", "error": "say hello first"} for r in replies[1:]), replies

    async def join() -> None:
        for node in cluster.nodes:
            await x.join(node)

    trio.run(run, cluster, [x, o], join)
    cluster.assert_all_rounds_done(rounds)
    assert o.id not in victim.transport.peers and o.id not in victim.links
    assert victim.transport.refusals[o.id] == "not on the allowlist"
    assert rej(victim, Reject.NOT_ALLOWED) >= 1
    for node in cluster.nodes:
        assert all(e["missing"] == [] for e in node.events)


# -- 8: text a peer supplies --------------------------------------------------------------------------

def test_peer_text_is_escaped_and_repeated_warnings_are_throttled(tmp_path, caplog):
    """A linked neighbour, in the victim's round 1: 20 hellos whose schema holds a forged
    `round 999/999 done` line (newline, carriage return, escape sequence), 20 whose settings key and
    value do, a 200 KB schema (a control message over 64 KB: refused from its length prefix), 5 of
    ~55 KB (refused by the parser), then it answers 20 of the victim's hellos with a ~60 KB refusal
    reason holding the same forged line. No log record of p2pfl carries a raw newline, carriage
    return or escape, none is longer than a few hundred characters, the forged line shows up in at
    most one record per (peer, kind of warning), and the victim's progress lines are its own."""
    caplog.set_level(logging.INFO, logger="p2pfl")
    rounds = 3
    cluster = Cluster(tmp_path, 3, rounds=rounds, degree=3, min_neighbors=3, step_timeout=PACED_TIMEOUT_S)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    x = Attacker(50, victim.transport.hello_template)
    answer = x.t._answer
    forge_replies = False

    async def lying_answer(peer: str, msg: dict[str, Any], stream: Any) -> dict[str, Any]:
        if msg["t"] == "hello" and peer == vid and forge_replies:
            return {"t": "refused", "v": 1, "reason": (FORGED * 1100)[:60_000]}
        return await answer(peer, msg, stream)

    x.t._answer = lying_answer   # type: ignore[method-assign]
    refusals: list[str] = []

    @x.at(vid, 1)
    async def attack() -> None:
        nonlocal forge_replies
        hello = x.t.local_hello(exclude=vid).to_wire()
        for _ in range(20):
            reply = await x.t.request(vid, {**hello, "schema": (FORGED * 5)[:control.MAX_TEXT_CHARS]})
            refusals.append(reply["reason"])
        for _ in range(20):
            forged = {**hello["settings"], FORGED: FORGED, "dataset": FORGED}
            reply = await x.t.request(vid, {**hello, "settings": forged, "config": control.config_digest(forged)})
            refusals.append(reply["reason"])
        body = msgpack.packb({**hello, "schema": "s" * 200_000})
        s = await x.stream(vid, CONTROL_PROTOCOL)
        with contextlib.suppress(Exception):      # the victim resets the stream after the length prefix
            await s.write(len(body).to_bytes(4, "big") + body)
        await victim.transport.wait_until(lambda: rej(victim, Reject.OVERSIZE) == 1)
        for _ in range(5):
            with pytest.raises(ConnectionError):
                await x.t.request(vid, {**hello, "schema": FORGED * 1000})
        assert rej(victim, Reject.BAD_HEADER) == 5
        forge_replies = True
        for _ in range(20):
            with pytest.raises(HelloRefused):
                await victim.transport.hello(x.id)     # what its refresh does, 20 times over
        forge_replies = False
        await x.t.hello(vid)                            # accepted again: its echo completes round 1
        assert x.id in victim.transport.peers

    async def join() -> None:
        for node in cluster.nodes:
            await x.join(node)

    trio.run(run, cluster, [x], join)
    cluster.assert_all_rounds_done(rounds)
    assert len(refusals) == 40 and all(len(r) <= control.MAX_TEXT_CHARS for r in refusals)
    assert all(r.isprintable() for r in refusals[20:])   # (the schema ones quote the sender's own schema back)
    records = [r for r in caplog.records if r.name.startswith("p2pfl")]
    for r in records:
        msg = r.getMessage()
        assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg, msg
        assert len(msg) < 1000, msg
    forged_lines = [r.getMessage() for r in records if "999/999" in r.getMessage()]
    about_x = [r.getMessage() for r in records if x.id in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(forged_lines) == 2, forged_lines   # one line per (peer, kind of warning) a minute
    assert len(about_x) <= 4, about_x
    assert not any("999" in ln for lines in cluster.lines for ln in lines)


# -- 1, 4 (below p2pfl): a peer that ignores yamux flow control ----------------------------------------

def _muxed_conn(t: Libp2pTransport, peer: str) -> Any:
    conns = t.host.get_network().connections.get(ID.from_base58(peer))
    return (conns[0] if isinstance(conns, list) else conns).muxed_conn


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="py-libp2p 0.8.1 yamux appends DATA beyond the receive window (it only "
                   "logs) and keeps the unread buffer of a stream no one reads: any peer past Noise, even a "
                   "refused one, grows the victim's memory without bound")
def test_a_refused_peer_ignoring_flow_control_cannot_grow_the_victims_memory(tmp_path):
    """An outsider whose hello names another model is refused, but its Noise connection stays up. In
    the victim's round 1 it opens a yamux stream with junk instead of a protocol negotiation and
    writes 48 MiB of DATA frames on it without waiting for window updates (the window is 256 KiB).
    The victim must not keep them: its resident memory must grow by less than 16 MiB (or the
    connection be dropped); the honest nodes finish their rounds either way."""
    psutil = pytest.importorskip("psutil")
    import struct

    from libp2p.stream_muxer.yamux.yamux import FLAG_SYN, TYPE_DATA, YAMUX_HEADER_FORMAT

    rounds = 3
    cluster = Cluster(tmp_path, 3, rounds=rounds, degree=3, min_neighbors=3, step_timeout=PACED_TIMEOUT_S)
    victim = cluster.nodes[0]
    vid = victim.identity.peer_id
    x = Attacker(50, victim.transport.hello_template)
    o = Attacker(52, replace(victim.transport.hello_template, schema="0" * 32), echo=False)
    seen: dict[str, int] = {}

    @x.at(vid, 1)
    async def flood() -> None:
        with pytest.raises(HelloRefused, match="model schema differs"):
            await o.t.connect(victim.transport.listen_addrs()[0])
        conn = _muxed_conn(o.t, vid)
        rss = psutil.Process().memory_info().rss
        chunk, sid = b"\0" * (64 << 10), 10_001
        await conn._write_frame(struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, FLAG_SYN, sid, len(chunk)) + chunk)
        for _ in range(767):
            await conn._write_frame(struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, sid, len(chunk)) + chunk)
        try:     # a round trip on the same connection: the victim has read every frame before it
            await o.t.request(vid, {"t": "link"})
        except ConnectionError:
            pass
        seen["rss_growth"] = psutil.Process().memory_info().rss - rss
        try:
            seen["yamux_held"] = sum(len(b) for b in _muxed_conn(victim.transport, o.id).stream_buffers.values())
        except Exception:   # dropped: nothing held
            seen["yamux_held"] = 0

    async def join() -> None:
        for node in cluster.nodes:
            await x.join(node)

    trio.run(run, cluster, [x, o], join)
    cluster.assert_all_rounds_done(rounds)
    assert o.id not in victim.transport.peers
    assert seen["rss_growth"] < 16 << 20, seen


# -- a real `p2pfl peer` process: exit code and summary.json -----------------------------------------

class _Victim:
    """One `p2pfl peer` process, its stdout lines collected by a trio task."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.signal = Signal()
        self.proc: trio.Process | None = None

    async def read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        async for chunk in self.proc.stdout:
            buf += chunk
            *done, buf = buf.split(b"\n")
            self.lines.extend(ln.decode() for ln in done)
            self.signal.notify()
        self.lines.append(buf.decode())
        self.signal.notify()


def test_a_peer_process_under_attack_exits_0_and_counts_every_refusal(tmp_path):
    """A real `p2pfl peer` (its only neighbour is our echoing attacker) gets, in its round 1:
    mismatched frames over the bulk channel and a raw stream, an oversize frame, a hello with a bytes
    key, a 200 KB control message and 10 hellos with a forged `round 999/999 done` schema. The
    process runs all its rounds, exits 0, prints only its own progress lines, and its summary.json
    counts each refusal by reason."""
    import os
    import subprocess
    import sys

    from p2pfl.learn.datasets import load_dataset
    from p2pfl.learn.models import ParamLayout, make_model

    rounds = 3
    s = PeerSettings(dataset="digits", device="cpu")
    data = load_dataset(s.dataset, seed=s.seed)
    model = make_model(s.model, data.input_shape, data.num_classes, hidden=s.hidden, seed=s.seed)
    d = ParamLayout.of(model).size
    x = Attacker(50, Hello(schema=ParamLayout.of(model).schema, settings=s.protocol_settings()))
    crafted = mismatched(d)
    victim = _Victim()
    args = [sys.executable, "-m", "p2pfl.cli", "peer", "--out", str(tmp_path / "victim"), "--shard", "0/2",
            "--listen", LOOPBACK[0], "--dataset", "digits", "--threads", "1", "--local-steps", "2",
            "--rounds", str(rounds), "--degree", "1", "--min-neighbors", "1", "--step-timeout", str(PACED_TIMEOUT_S)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    async def main() -> None:
        with trio.fail_after(2 * LIMIT_S), open(tmp_path / "victim.err", "wb") as err:
            victim.proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE, stderr=err, env=env,
                                                           cwd=Path(__file__).parent.parent.parent)
            try:
                async with x.t, trio.open_nursery() as nursery:
                    nursery.start_soon(victim.read)
                    nursery.start_soon(x.serve)
                    await victim.signal.wait_until(lambda: any(ln.startswith("listening on ") for ln in victim.lines))
                    addr = next(ln for ln in victim.lines if ln.startswith("listening on ")).split()[-1]
                    vid = addr.rsplit("/p2p/", 1)[1]

                    @x.at(vid, 1)
                    async def attack() -> None:
                        for i, (kind, arr, _) in enumerate(crafted):
                            await x.put(vid, x.frame(kind, 1 + i % 2, arr))
                        st = await x.stream(vid, MODEL_PROTOCOL)
                        for i, (kind, arr, _) in enumerate(crafted):
                            await st.write(x.encoded(kind, 1 + i % 2, arr))
                        await st.write((64 << 20).to_bytes(4, "big") + b"\0" * 60)   # oversize: stream dropped
                        hello = x.t.local_hello(exclude=vid).to_wire()
                        with pytest.raises(ConnectionError):
                            await x.t.request(vid, {**hello, b"t": "hello"})
                        body = msgpack.packb({**hello, "schema": "s" * 200_000})
                        ctl = await x.stream(vid, CONTROL_PROTOCOL)
                        with contextlib.suppress(Exception):      # reset after its length prefix
                            await ctl.write(len(body).to_bytes(4, "big") + body)
                        for _ in range(10):
                            reply = await x.t.request(vid, {**hello, "schema": (FORGED * 5)[:control.MAX_TEXT_CHARS]})
                            assert reply["t"] == "refused"
                        await x.t.hello(vid)                    # accepted again: the echo completes round 1

                    await x.t.connect(addr)
                    assert await x.t.request(vid, {"t": "link"}) == {"t": "link", "ok": True, "round": 0}
                    # a granted link does not wake the node's start wait (its next re-hello, 5 s on, would):
                    # hello again, which does
                    await x.t.hello(vid)
                    assert await victim.proc.wait() == 0
                    nursery.cancel_scope.cancel()
            finally:
                if victim.proc.returncode is None:
                    victim.proc.kill()              # this child only, by its PID
                    with trio.move_on_after(10):
                        await victim.proc.wait()

    trio.run(main)
    summary = json.loads((tmp_path / "victim" / "summary.json").read_text())
    assert summary["rounds_done"] == summary["rounds_run"] == rounds and not summary["stopped"], summary
    rejected = summary["rejected"]
    for reason in {why for *_, why in crafted}:
        assert rejected[reason.value] == 2 * sum(1 for *_, why in crafted if why is reason), rejected
    assert rejected["oversize"] == 2 and rejected["bad_header"] == 1, rejected
    progress = [ln for ln in victim.lines if ln.startswith("round ")]
    assert [ln.split(":")[0] for ln in progress] == [f"round {r + 1}/{rounds} done" for r in range(rounds)]
    assert not any("999" in ln for ln in victim.lines), victim.lines
    stderr = (tmp_path / "victim.err").read_text()
    # its log quotes the forged schema escaped (never a line of its own), once for 10 hellos (throttled)
    assert not re.search(r"^round 999", stderr, re.M) and "\r" not in stderr and "\x1b" not in stderr, stderr[-2000:]
    assert 1 <= stderr.count("999/999") <= 2, stderr[-2000:]
