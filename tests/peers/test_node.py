"""`Node` (the process behind `p2pfl peer`), piece by piece, in process: membership maintenance over
real libp2p on 127.0.0.1, and the state its metrics endpoint exports.

The maintenance pass (`Node._refresh`) is called directly instead of waiting for its period, so
nothing sleeps; every wait is on a condition (`wait_until`), bounded by fail_after."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.files import save_identity
from p2pfl.gossip.identity import Identity
from p2pfl.gossip.rounds import agreed_round
from p2pfl.peers.libp2p import Libp2pTransport
from p2pfl.peers.node import Node
from p2pfl.peers.settings import PeerSettings

LIMIT_S = 30
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def ident(i: int) -> Identity:
    return Identity.generate(bytes([i + 1]) * 32)


def make_node(tmp: Path, i: int, **settings) -> Node:
    key = tmp / f"peer{i}.key"
    save_identity(ident(i), key)
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


# -- what a liar can no longer do to a node (hardening) ----------------------------------------------

def _accepted(node: Node, *peers: str, round_: int = 0) -> None:
    """Make `peers` accepted (as after a hello) and the node's current links."""
    for p in peers:
        node.transport.peers[p] = replace(node.transport.hello_template, round=round_)
        node.links.add(p)
    node._apply_neighbors()


def _round(node: Node, t: int, missing: list[str]) -> None:
    node.peer.round = t + 1
    node._on_round({"kind": "round", "round": t, "received": 0, "missing": missing, "wait_s": 0.0})


def test_a_silent_neighbour_is_set_aside_with_backoff_and_a_hello_does_not_clear_it(tmp_path):
    node = make_node(tmp_path, 0, degree=2)
    silent, honest = ident(1).peer_id, ident(2).peer_id
    _accepted(node, silent, honest)
    for t in range(3):
        node._on_hello(silent, node.transport.peers[silent])   # our re-hello's reply: no longer a reset
        _round(node, t, [silent])
    node._apply_neighbors()
    assert set(node.peer.tracker.neighbors) == {honest} and silent not in node.links
    assert node.benched[silent] == 3 + 2                      # first offence: 2 rounds
    # while set aside it cannot take a link slot back
    assert trio.run(node._on_control, silent, {"t": "link"}) == {"t": "link", "ok": False}
    assert silent not in node._candidates()
    # back after its time, on probation: one more silent round and it is out for twice as long
    node.peer.round = 5
    node.links.add(silent)
    node._apply_neighbors()
    assert silent in node.peer.tracker.neighbors
    _round(node, 5, [silent])
    assert node.benched[silent] == 6 + 4


def test_fake_identities_cannot_hold_every_link_slot(tmp_path):
    """Six silent identities take all degree + 2 slots; after SUSPECT_AFTER rounds they are set aside,
    their slots are free, and an honest peer that asks gets a link (before: refused for 1,383 rounds)."""
    node = make_node(tmp_path, 0, degree=4)
    fakes = [ident(10 + i).peer_id for i in range(6)]
    for f in fakes:
        node.transport.peers[f] = node.transport.hello_template
        assert trio.run(node._on_control, f, {"t": "link"})["ok"]
    honest = ident(3).peer_id
    node.transport.peers[honest] = node.transport.hello_template
    assert not trio.run(node._on_control, honest, {"t": "link"})["ok"]   # all slots held
    node._apply_neighbors()
    for t in range(3):
        _round(node, t, sorted(fakes))
    node._apply_neighbors()
    assert trio.run(node._on_control, honest, {"t": "link"})["ok"]
    assert not any(trio.run(node._on_control, f, {"t": "link"})["ok"] for f in fakes)
    node._apply_neighbors()
    assert node.peer.tracker.neighbors == [honest]


def test_one_neighbours_round_claim_does_not_move_a_peer(tmp_path):
    """A linked liar's hello claims round 10**12: with two honest neighbours at round 4, the node
    stays with them; alone with the liar (it is its only input anyway) it would follow."""
    node = make_node(tmp_path, 0, degree=3)
    liar, a, b = ident(1).peer_id, ident(2).peer_id, ident(3).peer_id
    _accepted(node, a, b, round_=4)
    _accepted(node, liar, round_=10**12)
    claims = node._round_claims()
    assert claims[liar] == 10**12
    assert agreed_round(claims.values()) == 4


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=12), st.integers(0, 10**15))
def test_a_single_liar_cannot_raise_the_agreed_round(honest, lie):
    claims = [*honest, lie]
    assert agreed_round(claims) <= max(honest)
    assert agreed_round(honest + honest[:1]) >= min(honest)
    assert agreed_round([7] * len(claims)) == 7


def test_the_algorithms_advice_to_drop_a_neighbour_is_acted_on(tmp_path):
    """An algorithm that advises dropping a neighbour (as reputation will): the node sets it aside for
    the run, frees its link slot and refuses to link with it again."""
    from p2pfl.algorithms import Advice

    node = make_node(tmp_path, 0, degree=2)
    bad, good = ident(1).peer_id, ident(2).peer_id
    _accepted(node, bad, good)
    assert set(node.peer.tracker.neighbors) == {bad, good}
    node.peer.algorithm.advice = lambda: Advice(scores={bad: 0.0, good: 1.0}, drop=frozenset({bad}))
    node._apply_neighbors()
    assert node.peer.tracker.neighbors == [good] and bad not in node.links
    assert trio.run(node._on_control, bad, {"t": "link"}) == {"t": "link", "ok": False}
    node.peer.round = 10_000
    node._apply_neighbors()
    assert bad in node.benched and bad not in node.peer.tracker.neighbors
