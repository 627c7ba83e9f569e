"""The `Transport` interface that a Peer talks to, and the counters every transport keeps.

Theory of operation: a transport moves `Frame`s between authenticated peers. `send` never raises
because a neighbour is slow, gone or unknown: it returns False and counts it, since dropout is part
of the contract (the round state machine deals with missing frames at the deadline). `receive`
yields `(sender, frame)` pairs whose sender is the AUTHENTICATED remote peer (not the frame's own
claim) and whose frame already passed the codec's checks; everything rejected on the way in is
counted in `stats.rejected` by reason and never reaches the peer; that includes every frame whose
kind, dtype, element count or magnitude does not match what the peer declared with `expect`. The memory transport
(`peers/memory.py`) and the libp2p transport implement this same interface.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from p2pfl.errors import Reject
from p2pfl.gossip.codec import Frame
from p2pfl.gossip.payloads import PayloadSpec

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from p2pfl.peers.libp2p.control import Hello


@dataclass
class TransportStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    send_failures: int = 0
    bytes_arriving: int = 0     # bytes of frames read so far, those of a frame still arriving included
    rejected: Counter[str] = field(default_factory=Counter)

    def reject(self, reason: Reject) -> None:
        self.rejected[reason.value] += 1


class LogThrottle:
    """Warnings about what peers do, at most one line per key (e.g. (peer, what)) every `period_s`
    and at most `burst` lines per period in all; the next line for a key says how many were held
    back. A liar that repeats a refused request, or mints identities to repeat it, cannot grow the
    log faster than that. Remembers at most `max_keys` keys (the oldest are forgotten)."""

    def __init__(self, logger: logging.Logger, period_s: float = 60.0, burst: int = 50, max_keys: int = 4096) -> None:
        self.log, self.period_s, self.burst, self.max_keys = logger, period_s, burst, max_keys
        self._keys: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()   # key -> (last logged, held back)
        self._window, self._lines = -math.inf, 0

    def warning(self, key: Hashable, msg: str, *args: Any) -> bool:
        """Log unless throttled; True if the line was written."""
        now = time.monotonic()
        if now - self._window >= self.period_s:
            self._window, self._lines = now, 0
        last, held = self._keys.pop(key, (-math.inf, 0))
        if now - last < self.period_s or self._lines >= self.burst:
            self._keys[key] = (last, held + 1)
            return False
        self._keys[key] = (now, 0)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        self._lines += 1
        self.log.warning(msg + (" (%d similar held back)" if held else ""), *args, *((held,) if held else ()))
        return True


class Transport(Protocol):
    @property
    def local_id(self) -> str: ...

    stats: TransportStats

    def expect(self, payloads: Mapping[str, PayloadSpec]) -> None:
        """Accept only frames of these kinds, dtypes, sizes and ranges (refused and counted otherwise),
        and refuse any frame larger than the largest of them before reading its body."""
        ...

    async def send(self, peer: str, frame: Frame) -> bool:
        """Deliver `frame` to `peer`; False (and counted) if it could not be handed over."""
        ...

    def receive(self) -> AsyncIterator[tuple[str, Frame]]:
        """Accepted frames with their authenticated sender, until the transport closes."""
        ...

    async def aclose(self) -> None: ...


class PeerNetwork(Transport, Protocol):
    """What a real peer's membership (`p2pfl.peers.node`, `membership`) needs beyond moving frames:
    hellos that carry rounds, degrees and peer exchange, control requests (links), and waiting on
    changes. `Libp2pTransport` implements it; the node reaches its transport through nothing else."""

    @property
    def peers(self) -> Mapping[str, Hello]:
        """Accepted peers -> their latest hello."""
        ...

    round: int                   # our round, advertised in our hellos
    degree: int                  # our degree, advertised (fixed overlays mix with Metropolis-Hastings weights)
    on_hello: Callable[[str, Hello], None]
    on_control: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]] | None

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def listen_addrs(self) -> list[str]: ...

    async def connect(self, addr: str) -> tuple[str, Hello]:
        """Dial a multiaddr ending in /p2p/<id> and exchange hellos."""
        ...

    async def hello(self, peer: str) -> Hello:
        """(Re-)exchange hellos with a known peer."""
        ...

    async def request(self, peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        """One control request and its reply."""
        ...

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds; re-checked on every frame, hello, rejection or `notify`."""
        ...

    def notify(self) -> None: ...

    async def flush(self) -> None:
        """Wait until every queued frame was written or failed."""
        ...
