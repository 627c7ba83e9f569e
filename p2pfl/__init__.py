"""p2pfl: decentralized peer-to-peer federated learning.

The names an application needs are re-exported here; see examples/embed.py.
"""

from p2pfl.errors import ConfigError, P2PFLError, RemoteProtocolError
from p2pfl.files import load_identity, save_identity
from p2pfl.gossip.identity import Identity
from p2pfl.learn.train import TrainConfig
from p2pfl.peers.memory import MemoryNetwork
from p2pfl.peers.peer import Peer, PeerConfig

__all__ = ["ConfigError", "Identity", "MemoryNetwork", "P2PFLError", "Peer", "PeerConfig", "RemoteProtocolError",
           "TrainConfig", "load_identity", "save_identity"]
__version__ = "0.1.0"
