"""Embedding p2pfl in an application: your own nn.Module, your own data, four peers.

Each peer is a `p2pfl.Peer`; here they share an in-process `MemoryNetwork` so the example runs
anywhere in seconds. Over a real network the transport is the libp2p one instead
(`p2pfl.transports.libp2p_transport`, then `await peer.connect(multiaddr)`: docs/own-model.md); the
Peer code does not change.

    python examples/embed.py
"""

from __future__ import annotations

import torch
import trio
from torch import nn

from p2pfl import Identity, MemoryNetwork, Peer, PeerConfig, TrainConfig


class TinyNet(nn.Module):
    """Any nn.Module works: its trainable parameters are what the peers share."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def two_moons(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A small generated dataset: two interleaved half circles."""
    t = torch.rand(n, generator=generator) * torch.pi
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.stack([torch.cos(t) + y, torch.sin(t) * (1 - 2 * y) + 0.5 * y], 1)
    return x + 0.1 * torch.randn(n, 2, generator=generator), y


async def main(rounds: int = 20) -> list[float]:
    g = torch.Generator().manual_seed(0)
    test = two_moons(500, g)
    identities = [Identity.generate(bytes([i + 1]) * 32) for i in range(4)]
    network = MemoryNetwork()
    config = PeerConfig(train=TrainConfig(lr=0.1, local_epochs=1, batch_size=16))
    peers = []
    for i, ident in enumerate(identities):
        ring = [identities[(i - 1) % 4].peer_id, identities[(i + 1) % 4].peer_id]
        torch.manual_seed(0)  # the same initial model everywhere
        peers.append(Peer(TinyNet(), two_moons(100, g), transport=network.endpoint(ident),
                          neighbors={p: None for p in ring}, config=config, test_data=test))
    accuracy: dict[str, float] = {}

    async def run(peer: Peer) -> None:
        peer.on_event = lambda e: accuracy.__setitem__(e["peer"], e.get("accuracy", 0.0))
        async with peer:
            await peer.train(rounds)

    async with trio.open_nursery() as nursery:
        for p in peers:
            nursery.start_soon(run, p)
    for pid, acc in accuracy.items():
        print(f"{pid[:16]}...  accuracy {acc:.3f}")
    return list(accuracy.values())


if __name__ == "__main__":
    trio.run(main)
