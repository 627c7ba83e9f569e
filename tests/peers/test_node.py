"""`Node` (the process behind `p2pfl peer`), piece by piece, in process: membership maintenance over
real libp2p on 127.0.0.1, and the state its metrics endpoint exports.

The maintenance pass (`Node._refresh`) is called directly instead of waiting for its period, so
nothing sleeps; every wait is on a condition (`wait_until`), bounded by fail_after."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from p2pfl.gossip.identity import Identity
from p2pfl.peers.libp2p import Libp2pTransport
from p2pfl.peers.node import Node
from p2pfl.peers.settings import PeerSettings

LIMIT_S = 30
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def ident(i: int) -> Identity:
    return Identity.generate(bytes([i + 1]) * 32)


def make_node(tmp: Path, i: int, **settings) -> Node:
    key = tmp / f"peer{i}.key"
    ident(i).save(key)
    s = PeerSettings(out=str(tmp / f"peer{i}"), key=str(key), listen=LOOPBACK, device="cpu", rounds=2, **settings)
    return Node(s, report=lambda line: None)


async def link_ok(peer: str, msg: dict) -> dict:
    return {"t": "link", "ok": True}


@pytest.mark.parametrize("mode", ["explicit", "degree"])
def test_a_neighbour_that_joined_the_bootstrap_concurrently_is_found_by_the_refresh(tmp_path, mode):
    """B and C join bootstrap A at the same moment, so A's hello reply to each lists no one. With
    bare peer IDs (or too few links for --degree) B must learn about C from a later hello with A:
    the refresh re-hellos every accepted peer while a wanted neighbour is missing. Before the fix it
    re-helloed only the neighbours (C, unknown, or no one), and B never found C.

    A and C are bare transports. A is a bootstrap that grants no links; C does no peer exchange of
    its own, standing for a C whose hello crossed B's the same way. B connects to A before C does,
    which gives B the reply of the race deterministically: A knew no one yet."""
    c_id = ident(2).peer_id
    b = make_node(tmp_path, 1, **({"neighbors": (c_id,)} if mode == "explicit" else {"degree": 2}))
    a = Libp2pTransport(ident(0), b.transport.hello_template, listen=LOOPBACK)
    c = Libp2pTransport(ident(2), b.transport.hello_template, listen=LOOPBACK)
    c.on_control = link_ok

    async def main() -> None:
        async with AsyncExitStack() as stack:
            for t in (a, b.transport, c):
                await stack.enter_async_context(t)
            async with trio.open_nursery() as nursery:
                b._nursery = nursery          # where B's peer exchange starts its dials
                with trio.fail_after(LIMIT_S):
                    _, hello = await b.transport.connect(a.listen_addrs()[0])
                    assert hello.peers == ()
                    await c.connect(a.listen_addrs()[0])
                    assert c_id not in b.transport.peers
                    await b._refresh()
                    await b.transport.wait_until(lambda: c_id in b.transport.peers)
                    if mode == "degree":
                        await b._refresh()    # C is a candidate now: asked for a link, it accepts
                        assert b.links == {c_id}
                    else:                     # nothing missing: only the neighbours are re-helloed
                        helloed: list[str] = []
                        real_hello = b.transport.hello

                        async def spy(peer: str):
                            helloed.append(peer)
                            return await real_hello(peer)

                        b.transport.hello = spy   # type: ignore[method-assign]
                        await b._refresh()
                        assert helloed == [c_id]
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_snapshot_reads_the_node_and_transport_state(tmp_path):
    node = make_node(tmp_path, 0, neighbors=(ident(1).peer_id,), metrics_port=9)
    assert node.prometheus is not None       # built, not serving: main() binds it
    snap = node.snapshot()
    assert (snap.rounds_done, snap.accuracy, snap.last_round_wait_s, snap.rejected) == (0, None, None, {})
    st = node.transport.stats
    st.bytes_sent, st.frames_received, st.send_failures = 123, 4, 1
    st.rejected["stale"] += 2
    node.peer.rejected["stale"] += 1
    node.peer.rejected["too_few_inputs"] += 1
    node.peer.round = 1
    node._on_round({"kind": "round", "round": 0, "received": 1, "missing": [], "accuracy": 0.5, "wait_s": 0.25})
    node._on_round({"kind": "round", "round": 1, "received": 1, "missing": [], "wait_s": 0.5})
    snap = node.snapshot()
    assert (snap.rounds_done, snap.accuracy, snap.last_round_wait_s, snap.wait_s_total) == (1, 0.5, 0.5, 0.75)
    assert (snap.bytes_sent, snap.frames_received, snap.send_failures) == (123, 4, 1)
    assert snap.rejected == {"stale": 3, "too_few_inputs": 1}
    node.metrics.close()
