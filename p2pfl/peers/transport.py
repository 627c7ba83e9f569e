"""The `Transport` interface that a Peer talks to, and the counters every transport keeps.

Theory of operation: a transport moves `Frame`s between authenticated peers. `send` never raises
because a neighbour is slow, gone or unknown: it returns False and counts it, since dropout is part
of the contract (the round state machine deals with missing frames at the deadline). `receive`
yields `(sender, frame)` pairs whose sender is the AUTHENTICATED remote peer (not the frame's own
claim) and whose frame already passed the codec's checks; everything rejected on the way in is
counted in `stats.rejected` by reason and never reaches the peer. The memory transport
(`peers/memory.py`) and the libp2p transport implement this same interface.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from p2pfl.errors import Reject
from p2pfl.gossip.codec import Frame


@dataclass
class TransportStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    send_failures: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def reject(self, reason: Reject) -> None:
        self.rejected[reason.value] += 1


class Transport(Protocol):
    @property
    def local_id(self) -> str: ...

    stats: TransportStats

    async def send(self, peer: str, frame: Frame) -> bool:
        """Deliver `frame` to `peer`; False (and counted) if it could not be handed over."""
        ...

    def receive(self) -> AsyncIterator[tuple[str, Frame]]:
        """Accepted frames with their authenticated sender, until the transport closes."""
        ...

    async def aclose(self) -> None: ...
