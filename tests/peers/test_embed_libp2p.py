"""The embedding API over real libp2p on 127.0.0.1, through the public names only: a user's own
nn.Module and DataLoader, `p2pfl.transports.libp2p_transport` and `await peer.connect(multiaddr)`.
trio's real clock (libp2p does real I/O); every wait is bounded by fail_after."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import torch
import trio
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import p2pfl
from p2pfl import ConfigError, Identity, MemoryNetwork, Peer, PeerConfig, TrainConfig
from p2pfl.testing.transports import started, train_all
from p2pfl.transports import Libp2pTransport, libp2p_transport

LIMIT_S = 60


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(seed))
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_two_embedded_peers_train_over_libp2p_after_connect():
    rounds = 3
    config = PeerConfig(train=TrainConfig(lr=0.3, local_steps=10), step_timeout_s=20.0)

    async def main():
        ids = [Identity.generate(bytes([40 + i]) * 32) for i in range(2)]
        models = []
        for _ in ids:
            torch.manual_seed(0)
            models.append(Net())
        transports = [libp2p_transport(ident, m, listen=["/ip4/127.0.0.1/tcp/0"]) for ident, m in zip(ids, models)]
        assert all(isinstance(t, Libp2pTransport) for t in transports) and p2pfl.Libp2pTransport is Libp2pTransport
        events = []
        async with AsyncExitStack() as stack:
            await started(stack, *transports)
            peers = [Peer(m, DataLoader(TensorDataset(*_data(i)), batch_size=16, shuffle=True,
                                        generator=torch.Generator().manual_seed(i)),
                          transport=t, neighbors={}, config=config, test_data=_data(9))
                     for i, (m, t) in enumerate(zip(models, transports))]
            with trio.fail_after(LIMIT_S):
                got = [await peers[0].connect(transports[1].listen_addrs()[0]),
                       await peers[1].connect(transports[0].listen_addrs()[0])]
            assert got == [ids[1].peer_id, ids[0].peer_id]
            await train_all(stack, peers, rounds, events.append, LIMIT_S)
        return peers, events

    peers, events = trio.run(main)
    assert all(e["received"] == 1 and e["missing"] == [] for e in events)
    # two peers, weights 1/2 each: the same model after every round
    assert torch.allclose(peers[0].vector, peers[1].vector, atol=1e-6)
    assert min(e["accuracy"] for e in events if e["round"] == rounds - 1) > 0.8
    assert all(p.transport.stats.frames_received == rounds for p in peers)


def test_connect_on_a_transport_that_does_not_dial_says_which_to_use():
    peer = Peer(Net(), _data(0), transport=MemoryNetwork().endpoint(Identity.generate(b"\x07" * 32)), neighbors={})

    async def main():
        await peer.connect("/ip4/127.0.0.1/tcp/1/p2p/12D3KooWxyz")

    with pytest.raises(ConfigError, match="connect: MemoryTransport does not dial addresses; use Libp2pTransport"):
        trio.run(main)
