"""Peers over the memory transport, under trio's MockClock: exact virtual times, no sleeps."""

import math

import pytest
import torch
import trio
import trio.testing

from p2pfl.errors import ConfigError
from p2pfl.gossip.codec import Frame
from p2pfl.gossip.identity import Identity
from p2pfl.learn.models import flatten, make_model
from p2pfl.learn.train import TrainConfig
from p2pfl.peers.memory import MemoryNetwork
from p2pfl.peers.peer import Peer, PeerConfig
from p2pfl.testing.transports import make_peers, run_peers


def test_full_mesh_reaches_exact_consensus_every_round():
    peers = make_peers(3, MemoryNetwork())
    run_peers(peers, 3)
    vecs = [flatten(p.model) for p in peers]
    assert all(torch.allclose(vecs[0], v, atol=1e-6) for v in vecs[1:])
    assert all(p.round == 3 for p in peers)


def test_silent_neighbour_costs_one_deadline_per_step():
    network = MemoryNetwork()
    peers = make_peers(3, network)
    clock = trio.testing.MockClock(autojump_threshold=0)
    finished = {}

    async def main():
        async with trio.open_nursery() as nursery:
            for p in peers[:2]:          # peers[2] is attached but never runs
                nursery.start_soon(run_one, p)

    async def run_one(p):
        async with p:
            await p.train(4)
        finished[p.id] = trio.current_time()

    trio.run(main, clock=clock)
    assert len(finished) == 2
    # every one of the 4 steps waited exactly one deadline (5 s) for the silent peer
    assert all(math.isclose(t, 4 * 5.0) for t in finished.values())


def test_wire_mode_gives_the_same_models_as_object_mode():
    a = make_peers(3, MemoryNetwork(wire=False))
    b = make_peers(3, MemoryNetwork(wire=True))
    run_peers(a, 2)
    run_peers(b, 2)
    for pa, pb in zip(a, b):
        assert torch.equal(flatten(pa.model), flatten(pb.model))
    assert all(p.transport.stats.bytes_sent > 0 for p in b)


def test_latency_moves_virtual_time_but_not_results():
    fast = make_peers(3, MemoryNetwork())
    slow = make_peers(3, MemoryNetwork(latency_s=0.25))
    clock = trio.testing.MockClock(autojump_threshold=0)
    run_peers(fast, 2)
    run_peers(slow, 2, clock)
    assert math.isclose(clock.current_time(), 2 * 0.25)
    assert all(torch.equal(flatten(a.model), flatten(b.model)) for a, b in zip(fast, slow))


def test_garbage_and_nan_frames_are_counted_not_fatal():
    network = MemoryNetwork(wire=True)
    peers = make_peers(3, network)
    liar = peers[2]

    async def main():
        async with trio.open_nursery() as nursery:
            for p in peers[:2]:
                nursery.start_soon(run_one, p)
            for p in peers[:2]:
                inbox = p.transport._send
                inbox.send_nowait((0.0, liar.id, b"\x00\x00\x00\x03abc"))        # malformed frame
                bad = torch.full((peers[0].layout.size,), float("nan"))
                await liar.transport.send(p.id, Frame(kind="model", sender=liar.id, round=0, step=0,
                                                      schema=liar.schema, dtype="f32", payload=bad.numpy()))

    async def run_one(p):
        async with p:
            await p.train(2)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for p in peers[:2]:
        assert p.round == 2
        assert p.transport.stats.rejected["non_finite"] == 1
        assert sum(p.transport.stats.rejected.values()) == 2
        assert torch.isfinite(flatten(p.model)).all()


def test_lost_frames_fall_back_to_deadline_and_are_reported():
    peers = make_peers(4, MemoryNetwork(loss=0.5, seed=3))
    events = []
    for p in peers:
        p.on_event = events.append
    run_peers(peers, 3)
    assert all(p.round == 3 for p in peers)
    assert any(e["missing"] for e in events)
    assert sum(p.transport.stats.send_failures for p in peers) > 0


def test_bad_neighbour_config_is_refused_at_construction():
    network = MemoryNetwork()
    ident = Identity.generate(b"\x09" * 32)
    model = make_model("mlp", (6,), 2, hidden=(8,))
    data = (torch.zeros(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="itself"):
        Peer(model, data, transport=network.endpoint(ident), neighbors={ident.peer_id: None})
    with pytest.raises(ConfigError, match="aggregator"):
        PeerConfig(aggregator="nope")


def test_blocking_run_returns_round_events():
    network = MemoryNetwork()
    ident = Identity.generate(b"\x07" * 32)
    x = torch.randn(8, 6)
    p = Peer(make_model("mlp", (6,), 2, hidden=(8,)), (x, (x[:, 0] > 0).long()),
             transport=network.endpoint(ident), neighbors={}, test_data=(x, (x[:, 0] > 0).long()))
    events = p.run(2)
    assert [e["round"] for e in events] == [0, 1]
    assert all(0 <= e["accuracy"] <= 1 for e in events)


def test_robust_rule_with_bucketing_runs_in_the_peer():
    config = PeerConfig(train=TrainConfig(lr=0.1, local_steps=2, batch_size=8), step_timeout_s=5.0,
                        aggregator="median", aggregator_params={"bucket_size": 2}, f=0)
    peers = make_peers(5, MemoryNetwork(), config=config)
    run_peers(peers, 2)
    assert all(p.round == 2 and not p.rejections() for p in peers)   # no step fell back to its own vector


def test_partitions_and_per_link_latency_of_the_memory_network():
    """A partition blocks the links between groups both ways (sends fail and are counted, the step
    deadline passes); `heal` restores them. A per-link latency delays that link only, in virtual time."""
    network = MemoryNetwork()
    peers = make_peers(4, network)
    a, b, c, d = (p.id for p in peers)
    network.partition([[a, b], [c, d]])
    network.link_latency[(a, b)] = 0.75
    events = []
    for p in peers:
        p.on_event = events.append
    clock = trio.testing.MockClock(autojump_threshold=0)
    run_peers(peers, 1, clock)
    # each peer reached only its own group: 1 of 3 neighbours, and waited the 5 s deadline
    assert all(e["received"] == 1 and len(e["missing"]) == 2 for e in events)
    assert sum(p.transport.stats.send_failures for p in peers) == 4 * 2
    assert math.isclose(clock.current_time(), 5.0)
    network.heal()
    events.clear()
    for p in peers:
        p.config = p.config.replace(step_timeout_s=60.0)
    run_peers(peers, 1, clock)
    # healed: everyone hears everyone; the slowest link (a -> b, 0.75 s) sets the round's length
    assert all(e["received"] == 3 for e in events)
    assert math.isclose(clock.current_time(), 5.0 + 0.75)
