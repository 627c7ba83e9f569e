"""The libp2p side of p2pfl: the only package that imports py-libp2p (see transport.py)."""

from p2pfl.peers.libp2p.control import Hello, config_digest
from p2pfl.peers.libp2p.transport import CONTROL_PROTOCOL, MODEL_PROTOCOL, HelloRefused, Libp2pTransport

__all__ = ["CONTROL_PROTOCOL", "MODEL_PROTOCOL", "Hello", "HelloRefused", "Libp2pTransport", "config_digest"]
