"""Reputation in a real peer (`Node`): removal_rounds, the `removed` notice, the Prometheus gauge, and a
resumed peer that keeps its reputations. In process, over libp2p on 127.0.0.1, nothing sleeps."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pfl.algorithms.reputation import Reputation
from p2pfl.files import save_identity
from p2pfl.gossip.identity import Identity
from p2pfl.peers import checkpoint
from p2pfl.peers.membership import DROPPED, LINK_LEAD, MAX_LINK_LEAD
from p2pfl.peers.metrics import PeerMetrics, Snapshot
from p2pfl.peers.node import Node
from p2pfl.peers.settings import PeerSettings

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
PEER = "12D3KooWtest"


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def value(got: dict, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted({"peer": PEER, **labels}.items())))]


def ident(i: int) -> Identity:
    return Identity.generate(bytes([i + 1]) * 32)


def make_node(tmp: Path, i: int = 0, **settings: object) -> Node:
    key = tmp / f"peer{i}.key"
    save_identity(ident(i), key)
    s = PeerSettings(out=str(tmp / f"peer{i}"), key=str(key), listen=LOOPBACK, device="cpu", rounds=4,
                     reputation=True, **settings)  # type: ignore[arg-type]
    return Node(s, report=lambda line: None)


def accepted(node: Node, *peers: str) -> None:
    for p in peers:
        node.transport.peers[p] = replace(node.transport.hello_template, round=0)
        node.links.add(p)
    node._apply_neighbors()


def test_a_real_peer_wraps_its_algorithm_and_removes_for_removal_rounds(tmp_path: Path) -> None:
    node = make_node(tmp_path, degree=3, reputation_params={"removal_rounds": 3})
    alg = node.peer.algorithm
    assert isinstance(alg, Reputation)
    bad, a, b = ident(1).peer_id, ident(2).peer_id, ident(3).peer_id
    accepted(node, bad, a, b)
    assert set(alg.advice().scores) == {bad, a, b}
    alg.removed[bad] = 5
    node.peer.round = 2
    node._apply_neighbors()
    assert node.benched[bad] == 2 + 3 and set(node.peer.tracker.neighbors) == {a, b}
    assert bad not in node.links


def test_the_removed_notice_unlinks_both_ways_and_bad_notices_are_counted(tmp_path: Path) -> None:
    node = make_node(tmp_path, degree=3)
    remover, other = ident(1).peer_id, ident(2).peer_id
    accepted(node, remover, other)
    for bad in ({"t": "removed", "rounds": -1}, {"t": "removed", "rounds": "9"}, {"t": "removed"},
                {"t": "removed", "rounds": 1, "extra": 1}, {"t": "removed", "rounds": 2**40}):
        reply = trio.run(node._on_control, remover, bad)
        assert reply["t"] == "error" and "rounds an int in [0, 1048576]" in reply["error"]
    assert node.peer.rejections()["bad_removed_notice"] == 5 and remover in node.links
    assert trio.run(node._on_control, remover, {"t": "removed", "rounds": 0}) == {"t": "removed", "ok": True}
    assert node.benched[remover] == DROPPED and remover not in node.links
    node._apply_neighbors()
    assert node.peer.tracker.neighbors == [other]
    # a peer that is not a neighbour cannot set anyone aside by claiming to remove us
    stranger = ident(3).peer_id
    node.transport.peers[stranger] = node.transport.hello_template
    assert trio.run(node._on_control, stranger, {"t": "removed", "rounds": 4})["ok"]
    assert stranger not in node.benched


def test_prometheus_exports_the_reputation_per_neighbour(tmp_path: Path) -> None:
    snap = Snapshot(reputation={"12D3KooWa": 0.75, "12D3KooWb": 0.25})
    got = samples(PeerMetrics(PEER, lambda: snap).exposition())
    assert value(got, "p2pfl_reputation", neighbor="12D3KooWa") == 0.75
    assert value(got, "p2pfl_reputation", neighbor="12D3KooWb") == 0.25
    assert not any(name == "p2pfl_reputation" for name, _ in samples(PeerMetrics(PEER, Snapshot).exposition()))
    node = make_node(tmp_path, degree=2)
    accepted(node, ident(1).peer_id, ident(2).peer_id)
    assert node.snapshot().reputation == pytest.approx({ident(1).peer_id: 0.5, ident(2).peer_id: 0.5})


def test_a_resumed_peer_keeps_its_reputations_and_removals(tmp_path: Path) -> None:
    node = make_node(tmp_path, degree=2)
    a, bad = ident(1).peer_id, ident(2).peer_id
    alg = node.peer.algorithm
    assert isinstance(alg, Reputation)
    alg.r, alg.removed, alg.first = {a: 1.0}, {bad: DROPPED}, False
    data = checkpoint.snapshot(node.peer.trainer, round=2, peer_id=node.identity.peer_id, schema=node.schema,
                               extra={"algorithm": alg.state_dict()})
    checkpoint.write(node.s.out, data)
    node.metrics.close()
    node.lock.release()   # the first peer is gone: its folder is free to resume in
    resumed = make_node(tmp_path, degree=2, resume=node.s.out, fresh=False)
    assert resumed.resumed_from == 2
    assert resumed.peer.algorithm.advice() == alg.advice()
    assert resumed.peer.algorithm.advice().drop == {bad}


def test_a_removed_neighbours_slot_goes_to_another_known_peer(tmp_path: Path) -> None:
    """With --degree (no fixed set), the slot a removal frees is offered to a peer known by peer
    exchange, never to the removed one."""
    node = make_node(tmp_path, degree=2, reputation_params={"min_degree": 1})
    bad, a, spare = ident(1).peer_id, ident(2).peer_id, ident(3).peer_id
    accepted(node, bad, a)
    node.transport.peers[spare] = node.transport.hello_template   # known, not linked
    assert node._candidates() == [spare]
    node.peer.algorithm.removed[bad] = 2**62   # type: ignore[attr-defined]
    node._apply_neighbors()
    assert bad in node.benched and node._missing()       # a slot is free: the refresh asks for links
    assert node._candidates() == [spare]
    assert trio.run(node._on_control, spare, {"t": "link"})["ok"]
    node._apply_neighbors()
    assert set(node.peer.tracker.neighbors) == {a, spare}


def running(node: Node, round_: int) -> None:
    """As if the node's round loop were in `round_` (links then start LINK_LEAD rounds on)."""
    node.peer.round = round_
    node.peer.tracker.begin(round_, 0)


def test_a_link_formed_mid_run_starts_at_a_round_both_sides_agree_on(tmp_path: Path) -> None:
    node = make_node(tmp_path, degree=2)
    a, new, other = ident(1).peer_id, ident(2).peer_id, ident(3).peer_id
    accepted(node, a)
    running(node, 3)
    for p in (new, other):
        node.transport.peers[p] = node.transport.hello_template
    # the asker is at round 2: the link starts LINK_LEAD rounds after the later of the two
    assert trio.run(node._on_control, new, {"t": "link", "round": 2 + LINK_LEAD}) == \
        {"t": "link", "ok": True, "round": 3 + LINK_LEAD}
    assert new in node.links and node._active() == {a}
    assert node.peer.tracker.receive(new, 5, 0, ("model", None)).value == "buffered"   # it may get there first
    # requests that cross: ours asked for 6, theirs was granted 5; both sides end on the later one
    node._link(new, 6)
    assert node.link_from[new] == 6
    assert trio.run(node._on_control, new, {"t": "link", "round": 0})["round"] == 6
    node.peer.round = 5
    node._apply_neighbors()
    assert node.peer.tracker.neighbors == [a]
    node.peer.round = 6
    node._apply_neighbors()
    assert node.peer.tracker.neighbors == sorted([a, new])
    # linked already and running: a request again (it restarted) links at once on its side
    assert trio.run(node._on_control, new, {"t": "link", "round": 0}) == {"t": "link", "ok": True, "round": 6}


def test_bad_link_requests_are_counted_and_a_far_start_is_refused(tmp_path: Path) -> None:
    node = make_node(tmp_path, degree=3)
    asker = ident(1).peer_id
    node.transport.peers[asker] = node.transport.hello_template
    running(node, 1)
    for bad in ({"t": "link", "round": -1}, {"t": "link", "round": "5"}, {"t": "link", "round": 2**40},
                {"t": "link", "round": 1.5}, {"t": "link", "round": 3, "extra": 1}):
        reply = trio.run(node._on_control, asker, bad)
        assert reply["t"] == "error" and "round an int in [0, 2147483648]" in reply["error"]
    assert node.peer.rejections()["bad_link_request"] == 5 and asker not in node.links
    # a liar cannot park a slot for a round far ahead
    assert trio.run(node._on_control, asker, {"t": "link", "round": 1 + LINK_LEAD + MAX_LINK_LEAD + 1}) == \
        {"t": "link", "ok": False}
    assert asker not in node.links


def test_a_fixed_overlay_takes_a_link_only_into_the_slot_a_removal_freed(tmp_path: Path) -> None:
    bad, a, spare, extra = ident(1).peer_id, ident(2).peer_id, ident(3).peer_id, ident(4).peer_id
    node = make_node(tmp_path, neighbors=(bad, a), reputation_params={"min_degree": 1})
    for p in (bad, a, spare, extra):
        node.transport.peers[p] = replace(node.transport.hello_template, round=0, degree=2)
    node._apply_neighbors()
    running(node, 4)
    assert not node._missing()
    assert trio.run(node._on_control, spare, {"t": "link", "round": 0}) == {"t": "link", "ok": False}
    node.peer.algorithm.removed[bad] = DROPPED   # type: ignore[attr-defined]
    node._apply_neighbors()
    assert node.peer.tracker.neighbors == [a] and node._missing()   # a slot is free: the refresh looks
    assert trio.run(node._on_control, spare, {"t": "link", "round": 0}) == \
        {"t": "link", "ok": True, "round": 4 + LINK_LEAD}
    assert trio.run(node._on_control, extra, {"t": "link", "round": 0}) == {"t": "link", "ok": False}
    assert trio.run(node._on_control, bad, {"t": "link", "round": 0}) == {"t": "link", "ok": False}
    node.peer.round = 4 + LINK_LEAD
    node._apply_neighbors()
    assert node.peer.tracker.neighbors == sorted([a, spare]) and not node._missing()
