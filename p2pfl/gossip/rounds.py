"""The per-step gossip state machine (sans-IO).

Theory of operation: a round t has Q gossip steps; each (t, q) is one exchange in which the peer
sends its vector to every neighbour and collects theirs. `StepTracker` is fed the events of that
exchange and answers the questions a driver needs, without any clock, socket or event loop:

    tracker.begin(t, q)                  the peer entered step (t, q) and has sent its vector
    tracker.receive(sender, t, q, value) a neighbour's vector arrived -> CURRENT | BUFFERED,
                                         or raises RemoteProtocolError with the reason
    tracker.complete                     every neighbour has been heard for the current step
    tracker.finish()                     close the step -> {neighbour: value} in neighbour order

Invariants: steps are totally ordered by index t*Q + q. A frame for a later step is buffered
(at most `buffer_per_neighbor` per neighbour, at most `max_ahead_rounds` rounds ahead); a frame for an
earlier step is dropped as STALE; a second frame from the same sender for a step it already
covered is REPLAYED; a sender that is not a neighbour is UNKNOWN_PEER, unless a link with it was
agreed to start at a later round (`expect`): the other side may begin that round first, so its
frames from then on are buffered as a neighbour's would be. The driver owns time: it
decides when a deadline has passed and calls finish(). Which neighbours to set aside
for silence is `Suspicion`'s (per round, below).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from typing import Generic, TypeVar

from p2pfl.errors import LocalProtocolError, Reject, RemoteProtocolError

V = TypeVar("V")


class Arrival(enum.Enum):
    CURRENT = "current"    # counts toward the step in progress
    BUFFERED = "buffered"  # kept for a later step of ours


class StepTracker(Generic[V]):
    def __init__(self, neighbors: Iterable[str], *, steps_per_round: int = 1, max_ahead_rounds: int = 2,
                 buffer_per_neighbor: int = 8) -> None:
        if steps_per_round < 1 or max_ahead_rounds < 0 or buffer_per_neighbor < 1:
            raise LocalProtocolError("StepTracker limits must be positive")
        self.steps_per_round = steps_per_round
        self.max_ahead_steps = max(1, max_ahead_rounds) * steps_per_round
        self.buffer_per_neighbor = buffer_per_neighbor
        self.neighbors: list[str] = []
        self._last_seen: dict[str, int] = {}     # highest step index received per sender
        self._expected: dict[str, int] = {}      # not yet a neighbour -> first step index of its link
        self._buffer: dict[int, dict[str, V]] = {}
        self._current = -1
        self._received: dict[str, V] = {}
        self.set_neighbors(neighbors)

    # -- configuration ---------------------------------------------------------------------------
    def set_neighbors(self, neighbors: Iterable[str]) -> None:
        """Replace the neighbour set (overlay change); state of kept neighbours survives."""
        self.neighbors = sorted(set(neighbors))
        for p in self.neighbors:
            self._expected.pop(p, None)
        keep = set(self.neighbors) | self._expected.keys()
        self._received = {p: v for p, v in self._received.items() if p in keep}
        for frames in self._buffer.values():
            for p in [p for p in frames if p not in keep]:
                del frames[p]

    def expect(self, peer: str, round_: int) -> None:
        """A link with `peer` starts at `round_` (the driver makes it a neighbour then): buffer its
        frames for that round on, which may come before we get there."""
        if peer not in self.neighbors:
            self._expected[peer] = self.index(round_, 0)

    def index(self, round_: int, step: int) -> int:
        return round_ * self.steps_per_round + step

    @property
    def current(self) -> tuple[int, int]:
        return divmod(self._current, self.steps_per_round) if self._current >= 0 else (-1, 0)

    # -- events ----------------------------------------------------------------------------------
    def begin(self, round_: int, step: int) -> None:
        idx = self.index(round_, step)
        if not 0 <= step < self.steps_per_round or idx <= self._current:
            raise LocalProtocolError(f"cannot begin step ({round_}, {step}) after {self.current}")
        self._current = idx
        # a link that was expected by now and is no neighbour was called off: its frames go
        for p in [p for p, start in self._expected.items() if start <= idx]:
            del self._expected[p]
            for frames in self._buffer.values():
                frames.pop(p, None)
        self._received = self._buffer.pop(idx, {})
        for old in [i for i in self._buffer if i < idx]:
            del self._buffer[old]

    def receive(self, sender: str, round_: int, step: int, value: V) -> Arrival:
        if sender not in self.neighbors and sender not in self._expected:
            raise RemoteProtocolError(Reject.UNKNOWN_PEER, "not a neighbour", sender)
        if not 0 <= step < self.steps_per_round or round_ < 0:
            raise RemoteProtocolError(Reject.BAD_HEADER, f"step ({round_}, {step}) out of range", sender)
        idx = self.index(round_, step)
        if sender not in self.neighbors and not (self._expected[sender] <= idx and idx > self._current):
            raise RemoteProtocolError(Reject.UNKNOWN_PEER, "not a neighbour before its link starts", sender)
        if idx <= self._last_seen.get(sender, -1):
            raise RemoteProtocolError(Reject.REPLAYED, f"({round_}, {step}) already covered", sender)
        if idx < self._current:
            self._last_seen[sender] = idx
            raise RemoteProtocolError(Reject.STALE, f"({round_}, {step}) arrived after we moved on", sender)
        if idx - max(self._current, 0) > self.max_ahead_steps:
            raise RemoteProtocolError(Reject.TOO_FAR_AHEAD, f"({round_}, {step}) while we are at {self.current}",
                                      sender)
        if idx == self._current:
            self._last_seen[sender] = idx
            self._received[sender] = value
            return Arrival.CURRENT
        held = sum(1 for frames in self._buffer.values() if sender in frames)
        if held >= self.buffer_per_neighbor:
            raise RemoteProtocolError(Reject.BUFFER_FULL, f"{held} frames already buffered", sender)
        self._last_seen[sender] = idx
        self._buffer.setdefault(idx, {})[sender] = value
        return Arrival.BUFFERED

    @property
    def complete(self) -> bool:
        return self._current >= 0 and len(self._received) == len(self.neighbors)

    def missing(self) -> list[str]:
        return [p for p in self.neighbors if p not in self._received]

    def finish(self) -> dict[str, V]:
        """Close the current step and hand over what arrived, in neighbour order."""
        out = {p: self._received[p] for p in self.neighbors if p in self._received}
        self._received = {}
        return out

    def peer_round(self, sender: str) -> int:
        """The latest round seen from `sender` (-1 if none): lets a late joiner catch up."""
        return self._last_seen.get(sender, -1) // self.steps_per_round if sender in self._last_seen else -1


def agreed_round(claims: Iterable[int]) -> int:
    """The highest round that a majority of neighbours claim to have reached: a peer catches up to
    it, never to one neighbour's word. With n claims, floor(n/2) + 1 of them must be at or past the
    result, so a liar moves a peer only where liars are a majority of its neighbours (and there it
    controls what the peer mixes anyway); an honest peer that caught up then claims a round that a
    majority of its own neighbours vouched for, so a lie does not spread. -1 with no claims."""
    ordered = sorted(claims, reverse=True)
    return ordered[len(ordered) // 2] if ordered else -1


class Suspicion:
    """Which neighbours to set aside for silence (sans-IO: the driver tells it what each round saw).

    A neighbour that delivered nothing for `after` rounds in a row is set aside for 2, 4, 8 ... up to
    `max_rounds` rounds (doubling per offence), then gets one more chance: back on probation, one more
    silent round sets it aside again for twice as long. Only a delivered frame clears a neighbour's
    misses; nothing it says (a hello) does. A silent liar thus costs an honest peer one deadline per
    backoff period, amortised to almost nothing, while a peer that restarted comes back."""

    def __init__(self, after: int = 3, max_rounds: int = 64) -> None:
        if after < 1 or max_rounds < 1:
            raise LocalProtocolError("Suspicion limits must be positive")
        self.after, self.max_rounds = after, max_rounds
        self.misses: Counter[str] = Counter()    # rounds missed in a row
        self.benched: dict[str, int] = {}         # set aside -> the round it may come back
        self.offences: Counter[str] = Counter()   # times set aside

    def round_done(self, t: int, neighbors: Iterable[str], missing: Iterable[str]) -> dict[str, int]:
        """Round t is over; `missing` delivered nothing in it. Returns those set aside now, with the
        number of rounds each is out for."""
        gone, out = set(missing), {}
        for p in neighbors:
            self.misses[p] = self.misses[p] + 1 if p in gone else 0
            if self.misses[p] >= self.after and p not in self.benched:
                self.offences[p] += 1
                out[p] = min(2 ** self.offences[p], self.max_rounds)
                self.benched[p] = t + 1 + out[p]
        return out

    def release(self, round_: int) -> list[str]:
        """Before running `round_`: those whose time is up, back on probation."""
        back = [p for p, until in self.benched.items() if until <= round_]
        for p in back:
            del self.benched[p]
            self.misses[p] = self.after - 1
        return back
