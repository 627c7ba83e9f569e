"""Helpers for testing p2pfl and applications built on it: deterministic identities, signed and
deliberately defective wire frames, started libp2p transports, small memory-network federations,
and `open_pair`/`run_pair`, two connected transports of any kind behind one interface (the
transport conformance suite runs on it).

This package ships with p2pfl, so it imports neither pytest nor anything test-only; it needs
trio, numpy and torch, and imports py-libp2p (through `p2pfl.peers.libp2p`) only when a libp2p
transport is asked for, and trio.testing only when a MockClock or a quiescence wait is. Everything lives in `p2pfl.testing.transports` and `pair`; the names are
re-exported here.
"""

from p2pfl.testing import transports
from p2pfl.testing.pair import PAIR_KINDS, Pair, open_pair, run_pair
from p2pfl.testing.transports import *  # noqa: F403 -- the public helpers, listed once (transports.__all__)

__all__ = [*transports.__all__, "PAIR_KINDS", "Pair", "open_pair", "run_pair"]
