"""p2pfl: decentralized peer-to-peer federated learning.

The names an application needs are re-exported here; see examples/embed.py, examples/own_loop.py
and docs/own-model.md. The libp2p transport is in `p2pfl.transports` (also reachable here as
`p2pfl.Libp2pTransport`, imported on first use: py-libp2p is slow to import).
"""

from typing import Any

from p2pfl.errors import ConfigError, P2PFLError, RemoteProtocolError
from p2pfl.files import load_identity, save_identity
from p2pfl.gossip.identity import Identity
from p2pfl.learn.train import TrainConfig
from p2pfl.peers.averager import GossipAverager, GossipOptimizer
from p2pfl.peers.memory import MemoryNetwork
from p2pfl.peers.peer import Peer, PeerConfig

__all__ = ["ConfigError", "GossipAverager", "GossipOptimizer", "Identity", "Libp2pTransport", "MemoryNetwork",
           "P2PFLError", "Peer", "PeerConfig", "RemoteProtocolError", "TrainConfig", "libp2p_transport",
           "load_identity", "save_identity"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Libp2pTransport", "libp2p_transport"):
        from p2pfl import transports

        return getattr(transports, name)
    raise AttributeError(f"module 'p2pfl' has no attribute {name!r}")
