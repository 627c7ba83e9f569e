"""Keep your own training loop; gossip every K local steps.

Each of four peers trains its own model with its own loop and optimizer (Adam here: any torch
optimizer works) on its own part of scikit-learn's digits (each peer sees 5 of the 10 classes, so
no peer can learn them all alone). `GossipOptimizer` wraps the optimizer: every `every` steps, one
gossip round averages the model with the ring neighbours' (Metropolis-Hastings mixing, or any
robust rule set in PeerConfig). The peers share an in-process `MemoryNetwork` so the example runs
anywhere; over a real network, give each a `p2pfl.transports.libp2p_transport` (docs/own-model.md).

    python examples/own_loop.py
"""

from __future__ import annotations

import numpy as np
import torch
import trio
from sklearn.datasets import load_digits
from torch import nn

from p2pfl import GossipAverager, GossipOptimizer, Identity, MemoryNetwork, PeerConfig

PEERS = 4


def shards(seed: int = 0) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """Peer i holds the classes i*5/2 .. +5 (mod 10), from 80% of the images; the rest is the test set."""
    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    test, train = order[:360], order[360:]
    parts = []
    for i in range(PEERS):
        classes = torch.tensor([(i * 5 // 2 + k) % 10 for k in range(5)])
        mine = train[torch.isin(y[train], classes)]
        parts.append((x[mine], y[mine]))
    return parts, (x[test], y[test])


def make_model() -> nn.Module:
    torch.manual_seed(0)   # the same initial weights on every peer
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


async def train_peer(averager: GossipAverager, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
                     steps: int, every: int, seed: int) -> None:
    """An ordinary PyTorch loop; the only change is the wrapped optimizer and `await opt.step()`."""
    x, y = data
    opt = GossipOptimizer(torch.optim.Adam(model.parameters(), lr=3e-3), averager, every=every)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    async with averager:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            await opt.step()   # the inner step; every `every` steps, also one gossip round


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).float().mean())


async def main(steps: int = 300, every: int = 10, offload: bool = True) -> list[float]:
    parts, test = shards()
    identities = [Identity.generate(bytes([i + 1]) * 32) for i in range(PEERS)]
    network = MemoryNetwork()
    models = [make_model() for _ in range(PEERS)]
    averagers = []
    for i, ident in enumerate(identities):
        ring = [identities[(i - 1) % PEERS].peer_id, identities[(i + 1) % PEERS].peer_id]
        averagers.append(GossipAverager(models[i], transport=network.endpoint(ident), neighbors={p: None for p in ring},
                                        config=PeerConfig(step_timeout_s=30.0), offload=offload))
    async with trio.open_nursery() as nursery:
        for i in range(PEERS):
            nursery.start_soon(train_peer, averagers[i], models[i], parts[i], steps, every, i)
    accs = [accuracy(m, test) for m in models]
    for i, acc in enumerate(accs):
        print(f"peer {i}: test accuracy {acc:.3f} after {steps} local steps, {averagers[i].rounds_done} gossip rounds")
    return accs


if __name__ == "__main__":
    trio.run(main)
