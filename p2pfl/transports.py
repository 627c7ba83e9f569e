"""The transports a `Peer` runs over, under their public names.

Theory of operation: a `Peer` talks to its neighbours through a transport (the `Transport`
protocol: `local_id`, `expect`, `send`, `receive`, `aclose`). Two ship with p2pfl:

- `MemoryNetwork` / `MemoryTransport`: every peer in one process (tests, the simulator, examples);
  `network.endpoint(identity)` is one peer's transport.
- `Libp2pTransport`: the real network (TCP, Noise, yamux; the bulk channel for model frames).
  `libp2p_transport(identity, model)` builds one for a model: peers whose models' shared
  parameters differ in names, shapes or dtype refuse each other at the hello. Open it with
  `async with transport:`, read `transport.listen_addrs()`, and join a peer with
  `await peer.connect("/ip4/.../tcp/.../p2p/12D3KooW...")` (docs/own-model.md).

An application may bring its own transport: anything with the `Transport` protocol's methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from p2pfl.gossip.identity import Identity
from p2pfl.learn.models import ParamLayout
from p2pfl.peers.libp2p import Hello, Libp2pTransport
from p2pfl.peers.memory import MemoryNetwork, MemoryTransport
from p2pfl.peers.transport import Transport


def libp2p_transport(identity: Identity, model: nn.Module, *, listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
                     settings: Mapping[str, str | int | float | bool] | None = None,
                     **options: Any) -> Libp2pTransport:
    """A libp2p transport for `model`'s peer. `settings`: what every peer of the federation must agree
    on (hashed into the hello; a peer with other settings is refused). `options`: those of
    `Libp2pTransport` (psk, allow, bulk_port, ...)."""
    hello = Hello(schema=ParamLayout.of(model).schema, settings=dict(settings or {}))
    return Libp2pTransport(identity, hello, listen=listen, **options)


__all__ = ["Hello", "Libp2pTransport", "MemoryNetwork", "MemoryTransport", "Transport", "libp2p_transport"]
