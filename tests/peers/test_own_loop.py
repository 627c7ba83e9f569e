"""An application's own training loop with one gossip round on demand (GossipAverager, GossipOptimizer):
memory transports under trio's MockClock, no sleeps."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import trio
import trio.testing
from torch import nn

from p2pfl import ConfigError, GossipAverager, GossipOptimizer, Identity, MemoryNetwork, PeerConfig
from p2pfl.learn.models import flatten, load_flat


def _mesh(n, *, config=None, models=None, network=None):
    network = network or MemoryNetwork()
    ids = [Identity.generate(bytes([i + 1]) * 32) for i in range(n)]
    models = models or [nn.Linear(3, 2) for _ in range(n)]
    avgs = [GossipAverager(models[i], transport=network.endpoint(ids[i]),
                           neighbors={o.peer_id: None for o in ids if o is not ids[i]},
                           config=config or PeerConfig(step_timeout_s=5.0), offload=False,
                           settle=trio.testing.wait_all_tasks_blocked) for i in range(n)]
    return avgs, models


def _run(avgs, body):
    """body(i, averager) in one task per averager, under a MockClock; returns the virtual time taken."""
    async def main():
        async with trio.open_nursery() as nursery:
            for i, a in enumerate(avgs):
                nursery.start_soon(one, i, a)

    async def one(i, a):
        async with a:
            await body(i, a)

    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(main, clock=clock)
    return clock.current_time()


def _set(model, value):
    load_flat(model, torch.full_like(flatten(model), value))


def test_one_round_averages_the_models_in_place_and_the_optimizer_keeps_working():
    avgs, models = _mesh(3)
    for i, m in enumerate(models):
        _set(m, float(i))                      # 0, 1, 2: the mean is 1
    params = [list(m.parameters()) for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]   # made before the averager touched them
    events = {}

    async def body(i, a):
        events[i] = await a.round()
        x = torch.ones(4, 3)
        opts[i].zero_grad()
        models[i](x).sum().backward()
        opts[i].step()                         # the user's optimizer still moves the gossiped parameters
        events[i, 2] = await a.round()

    _run(avgs, body)
    assert all(e["received"] == 2 and e["missing"] == [] for e in events.values())
    # uniform weights 1/3 on a full mesh: round 1 makes every model exactly the mean, 1.0; the same
    # SGD step everywhere keeps them equal through round 2
    assert all(torch.allclose(flatten(models[0]), flatten(m), atol=1e-6) for m in models[1:])
    assert not torch.allclose(flatten(models[0]), torch.ones(8))
    assert [list(m.parameters()) for m in models] == params
    assert all(a.rounds_done == 2 for a in avgs)


def test_a_gossip_optimizer_gossips_every_k_steps():
    avgs, models = _mesh(2)
    _set(models[0], 0.0)
    _set(models[1], 4.0)
    returned = {0: [], 1: []}

    async def body(i, a):
        opt = GossipOptimizer(torch.optim.SGD(models[i].parameters(), lr=0.0), a, every=3)
        for _ in range(7):
            opt.zero_grad()
            models[i](torch.ones(1, 3)).sum().backward()
            returned[i].append(await opt.step())

    _run(avgs, body)
    assert [r is not None for r in returned[0]] == [False, False, True, False, False, True, False]
    assert all(a.rounds_done == 2 for a in avgs)
    assert torch.allclose(flatten(models[0]), torch.full((8,), 2.0))     # lr 0: only the gossip moved them


def test_a_robust_rule_keeps_a_byzantine_neighbour_out():
    config = PeerConfig(aggregator="trimmed_mean", f=1, step_timeout_s=5.0)
    avgs, models = _mesh(4, config=config)
    for i, m in enumerate(models):
        _set(m, 1e5 if i == 3 else float(i))   # peer 3 holds (and sends) a huge model

    async def body(i, a):
        await a.round()

    _run(avgs, body)
    for m in models[:3]:
        assert float(flatten(m).min()) >= 0.0 and float(flatten(m).max()) <= 2.0


def test_a_silent_neighbour_costs_one_deadline_and_is_reported_missing():
    avgs, _ = _mesh(3, config=PeerConfig(step_timeout_s=7.0))
    events = {}

    async def body(i, a):
        if i < 2:                              # averager 2 is attached but never gossips
            events[i] = await a.round()

    elapsed = _run(avgs, body)
    assert math.isclose(elapsed, 7.0)
    assert all(e["received"] == 1 and e["missing"] == [avgs[2].peer.id] for e in events.values())


def test_a_non_finite_model_is_not_gossiped():
    avgs, models = _mesh(2)
    _set(models[0], 1.0)
    _set(models[1], 3.0)

    async def body(i, a):
        await a.round()                        # both become 2.0
        if i == 0:
            _set(models[0], float("nan"))      # the application's loop diverged
        await a.round()

    _run(avgs, body)
    assert avgs[0].peer.rejections()["non_finite_update"] == 1
    assert torch.allclose(flatten(models[0]), torch.full((8,), 2.0))   # back to its last finite model
    assert torch.allclose(flatten(models[1]), torch.full((8,), 2.0))


def test_a_gossip_optimizer_refuses_what_it_cannot_wrap():
    avgs, models = _mesh(2)
    with pytest.raises(ConfigError, match="optimizer: got list, expected a torch.optim.Optimizer"):
        GossipOptimizer([], avgs[0])
    with pytest.raises(ConfigError, match="every: must be an integer >= 1"):
        GossipOptimizer(torch.optim.SGD(models[0].parameters(), lr=0.1), avgs[0], every=0)


def test_the_own_loop_example_learns_what_no_peer_could_alone():
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    try:
        import own_loop
    finally:
        sys.path.pop(0)

    def run(every):
        return trio.run(own_loop.main, 100, every, False, clock=trio.testing.MockClock(autojump_threshold=0))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models: more intra-op threads only spin on a busy machine
    try:
        gossip, alone = run(10), run(1000)    # every 1000 > 100 steps: never gossips
    finally:
        torch.set_num_threads(threads)
    # each peer holds 5 of the 10 classes: alone it can be right on at most about half of the test set
    assert max(alone) < 0.6 < min(gossip)
