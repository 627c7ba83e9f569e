"""`Membership`: how a `Node` (node.py) finds peers, picks its neighbours, and sets silent ones
aside.

Theory of operation
-------------------
Three background jobs (`Node.main` starts them):
- bootstrap: dial each `--bootstrap` address until it answers (exponential backoff; the first
  failure is reported in one line, the rest quietly); a hello that is refused is final.
- membership: every accepted hello (ours or theirs) brings the other side's known peers (peer
  exchange); we dial those we do not know yet, within the budgets and address checks of
  `exchange.DialPolicy` (no own, out-of-scope or DNS addresses, rate-limited), and every `refresh_s` we re-hello the neighbours
  (to learn their round and notice restarts) and redial wanted ones that are gone. While a wanted
  neighbour is missing (an explicit one we have no hello from, or fewer links than `degree`), the
  refresh re-hellos every accepted peer, bootstrap peers included: two peers that joined the same
  bootstrap at the same moment are missing from each other's hello replies, and only a later
  hello tells them about each other. With nothing missing only the neighbours are re-helloed.
- neighbour selection: with `--neighbors` the set is fixed, and each hello carries the sender's
  degree, so we mix with Metropolis-Hastings weights as the simulator does; otherwise we ask
  known peers for a link (`link` control request) until we have `degree`, in an order both sides
  agree on (a hash of the pair and the seed), accept up to degree + 2 incoming requests, and mix
  uniformly (degrees still change). A fixed neighbour removed on the algorithm's advice (reputation)
  leaves its slot to a replacement: the peer re-hellos at once, dials the peers it learns of and
  asks them for a link, and a fixed-overlay peer accepts a link only into such a slot of its own.
- a link formed while both sides run starts at an agreed round, LINK_LEAD rounds ahead of the later
  of the two (`round` in the request, the agreed one in the reply), and the gossip tracker buffers
  the other side's frames from that round on (`StepTracker.expect`): each side makes the other a
  neighbour before the same round, so neither waits for a frame the other does not send yet, nor
  refuses one sent a moment before its own round began. (Links formed the moment each side saw
  it, at different rounds, missed frames both ways and were set aside as silent: measured on a
  4-process ring.) Before round 0 a link applies at once.
Before each round the node applies neighbour changes (`_apply_neighbors`; before round 0 they
apply at once, as hellos and links arrive): a neighbour that missed SUSPECT_AFTER rounds in a row
is set aside for 2, 4, 8 ... 64 rounds, then gets one more chance; a hello does not clear its
misses, only a delivered frame does, and while set aside it cannot take a link slot back. A
picked link that is set aside or no longer accepted frees its slot. The round each neighbour
claims (`_round_claims`: the later of its last accepted frame's and its last hello's) is what the
node's catch-up goes by.

`Membership` is a mixin of `Node` rather than a part the node holds: membership and the round
loop work on the same state both ways (the round event counts misses, the round loop reads the
active neighbours and their claims, a link or hello sets the peer's neighbours before round 0),
and tests and tools set node attributes (`s`, `refresh_s`, `_nursery`) that membership must see.
The class declares what it uses of the node; `_init_membership` sets up its own state.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from p2pfl.errors import ConfigError, printable
from p2pfl.gossip.identity import Identity
from p2pfl.gossip.rounds import Suspicion
from p2pfl.gossip.topology import mh_weight
from p2pfl.peers.exchange import DialPolicy
from p2pfl.peers.libp2p import Hello, HelloRefused
from p2pfl.peers.peer import Peer
from p2pfl.peers.settings import PeerSettings
from p2pfl.peers.transport import LogThrottle, PeerNetwork

# the node's logger: membership is part of the node, and log settings select it by this name
log = logging.getLogger("p2pfl.peers.node")

SUSPECT_AFTER = 3        # rounds missed in a row before a neighbour is set aside
DROPPED = 2**62          # "set aside until round DROPPED": for the rest of the run
MAX_BENCH_ROUNDS = 64    # the longest a silent neighbour is set aside (it doubles per offence up to this)
REFRESH_S = 5.0          # re-hello period
BACKOFF_MAX_S = 30.0
MAX_REMOVAL_ROUNDS = 2**20   # the longest removal a neighbour may announce (0: the run)
LINK_LEAD = 2            # a link formed mid-run starts this many rounds after the later side's round
LINK_TRIES = 3           # a link request that fails in transit is tried again after 0.5 s, then 1 s
MAX_LINK_LEAD = 8        # the furthest ahead a link's start may be put (a liar cannot park a slot)
MAX_ROUND = 2**31        # rounds in control messages are ints in [0, MAX_ROUND]


def _peer_of(addr: str) -> str:
    return addr.rsplit("/p2p/", 1)[1] if "/p2p/" in addr else addr


class Membership:
    """Peers, links and set-aside neighbours of a `Node` (not usable on its own)."""

    s: PeerSettings
    report: Callable[[str], None]
    identity: Identity
    transport: PeerNetwork
    peer: Peer
    explicit: set[str]              # the fixed neighbours (--neighbors); empty: picked at run time
    first_round: int
    _train_scope: trio.CancelScope | None   # set once the node waits for its first round
    _nursery: trio.Nursery | None   # where dials and link requests run while the node runs

    def _init_membership(self) -> None:
        """Set up membership's state and take the transport's hellos and control requests (the
        node calls this once `explicit`, `identity` and `transport` exist)."""
        self.transport.degree = len(self.explicit)   # a fixed overlay advertises its degree: MH weights
        self.links: set[str] = set(self.explicit)
        self.link_from: dict[str, int] = {}   # a link agreed mid-run -> the round it starts at
        self.suspicion = Suspicion(SUSPECT_AFTER, MAX_BENCH_ROUNDS)
        # its state, under the names the node has always used
        self.misses, self.benched, self.offences = (self.suspicion.misses, self.suspicion.benched,
                                                    self.suspicion.offences)
        self.dialing: set[str] = set()
        self.refresh_s = REFRESH_S
        # the scope (loopback or not) is known now; the ports once we listen, when it is replaced
        self.exchange = DialPolicy(self.identity.peer_id, self.s.listen, allow_dns=self.s.peer_exchange_dns)
        self._throttle = LogThrottle(log)
        rep = self.s.reputation_settings()
        self.removal_rounds: int | None = rep["removal_rounds"] if rep else None
        self.min_degree: int = rep["min_degree"] if rep else 0
        self.advised: set[str] = set()   # neighbours set aside on the algorithm's advice, still advised
        self.transport.on_hello = self._on_hello
        self.transport.on_control = self._on_control

    def _count_misses(self, event: dict[str, Any]) -> None:
        """After a round: count each neighbour's missed rounds, and set aside those silent too long."""
        out = self.suspicion.round_done(event["round"], self.peer.tracker.neighbors, event["missing"])
        for p, rounds in out.items():
            log.info("neighbour %s missed %d rounds in a row: set aside for %d rounds", p, self.misses[p], rounds)

    def _round_claims(self) -> dict[str, int]:
        """Each neighbour's round: the later of its last accepted frame's and its last hello's claim
        (a link that starts at a later round counts: a late joiner catches up to its neighbours'
        round before the link starts)."""
        hellos = self.transport.peers
        return {p: max(self.peer.tracker.peer_round(p), hellos[p].round if p in hellos else -1)
                for p in set(self.peer.tracker.neighbors) | self._linked()}

    def _linked(self) -> set[str]:
        """Links that are or will be neighbours (some may start at a later round)."""
        return {p for p in self.links if p in self.transport.peers and p not in self.benched}

    def _active(self) -> set[str]:
        return {p for p in self._linked() if self.link_from.get(p, 0) <= self.peer.round}

    def _slots(self) -> int:
        """Link slots: `degree`, or on a fixed overlay one per fixed neighbour."""
        return len(self.explicit) if self.explicit else self.s.degree

    def _picking(self) -> bool:
        """Whether links are picked at run time: always without --neighbors; on a fixed overlay only
        while a fixed neighbour removed on the algorithm's advice leaves its slot to a replacement."""
        return not self.explicit or bool(self.explicit & self.advised)

    def _free_slot(self) -> bool:
        self._prune_links()
        return self._picking() and len(self.links - self.benched.keys()) < self._slots()

    def _pending(self, peer: str) -> bool:
        """A link agreed for a round we have not reached yet."""
        return self.link_from.get(peer, -1) > self.peer.round

    def _running(self) -> bool:
        return self.peer.tracker.current[0] >= 0

    def _link_round(self) -> int:
        """The earliest round a link agreed now may start at: at once before round 0, else LINK_LEAD
        rounds on (the other side may be a round further on, and must hear of it first)."""
        return self.peer.round + LINK_LEAD if self._running() else 0

    def _apply_neighbors(self) -> None:
        self.suspicion.release(self.peer.round)   # back on probation: one more missed round sets it aside again
        drop = self.peer.algorithm.advice().drop
        self.advised &= drop   # a removal whose time is up is no longer advised
        for p in sorted(drop - self.benched.keys() - self.advised):
            # the algorithm's advice (e.g. a reputation below its threshold): set aside for removal_rounds
            # (default: the run), as a silent neighbour would be; its link slot frees and another
            # neighbour can take it; the removed peer is told, so that it unlinks too. Never below
            # min_degree links: until a replacement links, it stays (the algorithm ignores its frames)
            if len(self._active() - {p}) < self.min_degree:
                continue
            self.advised.add(p)
            self.benched[p] = DROPPED if self.removal_rounds is None else self.peer.round + self.removal_rounds
            log.info("neighbour %s dropped on the algorithm's advice", p)
            if self._nursery is not None:
                if p in self.transport.peers:
                    self._nursery.start_soon(self._tell_removed, p)
                self._nursery.start_soon(self._refresh)   # look for a replacement now, not at the next pass
        self._prune_links()
        for p in [p for p in self.link_from if not self._pending(p)]:
            del self.link_from[p]   # started
        self._set_active()

    def _set_active(self) -> None:
        active = self._active()
        if active != set(self.peer.tracker.neighbors):
            log.info("neighbours: %s", sorted(active))
            self.peer.set_neighbors({p: self._weight(p) for p in sorted(active)})
            self.transport.degree = len(self.explicit) or len(active)

    def _weight(self, p: str) -> float | None:
        """W_ij on a fixed overlay: Metropolis-Hastings 1 / (1 + max(d_i, d_j)), with d_j from p's
        hello; it sums to < 1 over any subset of neighbours, so W_ii = 1 - sum stays > 0. None
        (uniform 1 / (active + 1)) when neighbours are picked at run time and degrees still change."""
        d_j = self.transport.peers[p].degree if p in self.transport.peers else 0
        return float(mh_weight(len(self.explicit), d_j)) if self.explicit and d_j > 0 else None

    def _on_hello(self, peer: str, hello: Hello) -> None:
        # A hello proves nothing about a neighbour's frames (a silent liar can say hello every second,
        # and our own re-hellos get replies): only a delivered frame clears its missed rounds.
        if self._nursery is None:
            return
        known = self.dialing | set(self.transport.peers)
        addrs = [a for a in hello.peers if self._picking() or _peer_of(a) in self.explicit]
        for addr, other in self.exchange.pick(peer, addrs, time.monotonic(), known):
            log.debug("peer exchange: dialling %s", printable(addr))
            self.dialing.add(other)
            self._nursery.start_soon(self._dial_once, [addr, *self.exchange.alternatives(other, addrs)], other)
        if peer not in self.links and peer not in self.benched and self._free_slot():
            self._nursery.start_soon(self._ask_link, peer)
        if self.peer.round == self.first_round and self._train_scope is not None and self.peer.tracker.current[0] < 0:
            self._apply_neighbors()    # before round 0, neighbours join at once

    async def _dial_once(self, addrs: list[str], peer: str) -> None:
        """Dial `peer` at each of its addresses in turn until one answers (a peer on several
        interfaces advertises them all; loopback comes last)."""
        try:
            for addr in dict.fromkeys(addrs):
                try:
                    await self.transport.connect(addr)
                    return
                except (ConnectionError, HelloRefused, ConfigError) as e:
                    self._throttle.warning(("dial", addr), "peer exchange: cannot reach %s: %s", printable(addr),
                                           printable(str(e), 200))
                    if not isinstance(e, ConnectionError):
                        return   # it answered and refused: another of its addresses changes nothing
        finally:
            self.dialing.discard(peer)

    async def _bootstrap(self, addr: str) -> None:
        delay, reported = 1.0, False
        while True:
            try:
                await self.transport.connect(addr)
                if reported:
                    self.report(f"bootstrap {addr}: connected")
                return
            except HelloRefused as e:
                self.report(f"bootstrap {addr}: refused: {e}")
                return
            except ConfigError as e:
                self.report(f"bootstrap {addr}: {e}")
                return
            except ConnectionError as e:
                if not reported:
                    self.report(f"bootstrap {addr}: unreachable ({e}); retrying with backoff up to "
                                f"{BACKOFF_MAX_S:.0f} s")
                    reported = True
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _maintain(self) -> None:
        while True:
            await trio.sleep(self.refresh_s)
            await self._refresh()

    def _prune_links(self) -> None:
        """Free the slots of picked links that cannot be neighbours: set aside (silent), or no longer
        accepted (a later hello was refused: such a peer never misses a round, so silence alone
        would never free its slot)."""
        for p in [p for p in self.links if p not in self.explicit and
                  (p in self.benched or p not in self.transport.peers)]:
            self.links.discard(p)
            self.link_from.pop(p, None)

    def _missing(self) -> bool:
        """A wanted neighbour is missing: an explicit one we have no hello from, or too few links."""
        if any(p not in self.transport.peers for p in self.explicit - self.advised):
            return True
        return self._free_slot()

    async def _refresh(self) -> None:
        """One maintenance pass: re-hello (peer exchange rides on the replies), then ask for links."""
        targets = set(self.links)
        if self._missing():   # someone may know the missing peer now: ask everyone, not just the links
            targets |= set(self.transport.peers)
        for p in sorted(targets):
            try:
                await self.transport.hello(p)
            except HelloRefused as e:   # the transport has already warned (throttled) or counted why
                log.debug("re-hello with %s refused: %s", p, printable(str(e), 200))
            except ConnectionError as e:
                self._throttle.warning(("refresh", p), "re-hello with %s failed: %s", p, printable(str(e), 200))
        for p in self._candidates():
            if not self._free_slot():
                break
            await self._ask_link(p)

    def _candidates(self) -> list[str]:
        me = self.identity.peer_id

        def rank(p: str) -> bytes:
            pair = "|".join(sorted((me, p)))
            return hashlib.blake2b(f"{self.s.seed}|{pair}".encode(), digest_size=8).digest()
        return sorted((p for p in self.transport.peers if p not in self.links and p not in self.benched), key=rank)

    async def _ask_link(self, peer: str) -> None:
        if peer in self.links or peer in self.benched or not self._free_slot():
            return
        for attempt in range(LINK_TRIES):
            start = self._link_round()
            try:
                reply = await self.transport.request(peer, {"t": "link", "round": start})
                break
            except Exception as e:   # e.g. both sides dialled each other at once and one connection was reset
                log.debug("link %s: %s", peer, e)
                if attempt == LINK_TRIES - 1:
                    return
                await trio.sleep(0.5 * 2 ** attempt)
                if peer in self.links or peer in self.benched or not self._free_slot():
                    return
        agreed = reply.get("round", 0)
        if reply.get("ok") is not True or peer not in self.transport.peers or peer in self.benched:
            log.debug("link %s: not linked (%s)", peer, printable(repr(reply), 200))
            return
        if type(agreed) is not int or not 0 <= agreed <= max(start, self._link_round()) + MAX_LINK_LEAD:
            log.info("link %s: refused its start round %s", peer, printable(repr(agreed), 40))
            return
        self._link(peer, agreed)

    def _link(self, peer: str, start: int) -> None:
        # requests that crossed (each side asked the other) agree on the later of the two starts
        if self._pending(peer):
            start = max(start, self.link_from[peer])
        self.links.add(peer)
        if start > self.peer.round:
            self.link_from[peer] = start
            self.peer.tracker.expect(peer, start)
        else:
            self.link_from.pop(peer, None)
        if not self._running():
            self._apply_neighbors()
        self.transport.notify()   # round 0 may be waiting for this link

    async def _on_control(self, peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        if msg["t"] == "link":
            return self._on_link(peer, msg)
        if msg["t"] == "removed":
            return self._on_removed(peer, msg)
        return {"t": "error", "error": f"unknown request {msg['t']!r}"}

    def _on_link(self, peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        """A link request: granted into a free slot, starting at the later of the asker's round (if
        it says one) and our own link round."""
        asked = msg.get("round", 0)
        if not msg.keys() <= {"t", "round"} or type(asked) is not int or not 0 <= asked <= MAX_ROUND:
            self.peer.rejected["bad_link_request"] += 1
            return {"t": "error", "error": f"link: expected {{t, round?}} with round an int in [0, {MAX_ROUND}]"}
        start = max(asked, self._link_round())
        # a set-aside peer cannot take a slot back before its time is up: identities that send
        # nothing cannot hold all our slots against peers that do; a fixed overlay takes a link only
        # into the slot of a neighbour it removed itself
        self._prune_links()
        slack = 0 if self.explicit else 2
        ok = self._picking() and peer not in self.benched and start <= self._link_round() + MAX_LINK_LEAD and \
            (peer in self.links or len(self.links - self.benched.keys()) < self._slots() + slack)
        if not ok:
            return {"t": "link", "ok": False}
        if peer in self.links and not self._pending(peer):   # linked already: the asker links at once
            return {"t": "link", "ok": True, "round": self.peer.round}
        self._link(peer, start)
        return {"t": "link", "ok": True, "round": self.link_from.get(peer, start)}

    async def _tell_removed(self, peer: str) -> None:
        """Tell a neighbour we removed that it was removed, and for how long (0: the run)."""
        try:
            await self.transport.request(peer, {"t": "removed", "rounds": self.removal_rounds or 0})
        except Exception as e:   # it may be gone already: the removal stands either way
            log.debug("removed %s: cannot tell it: %s", peer, e)

    def _on_removed(self, peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        """A neighbour removed us: unlink it both ways for the rounds it says (bounded), so that our
        mixing weights no longer count it and our slot goes to a replacement."""
        rounds = msg.get("rounds")
        if msg.keys() != {"t", "rounds"} or type(rounds) is not int or not 0 <= rounds <= MAX_REMOVAL_ROUNDS:
            self.peer.rejected["bad_removed_notice"] += 1
            return {"t": "error", "error": f"removed: expected {{t, rounds}} with rounds an int in "
                                           f"[0, {MAX_REMOVAL_ROUNDS}] (0: the run)"}
        if peer in self.links or peer in self.peer.tracker.neighbors:
            self.benched[peer] = DROPPED if rounds == 0 else self.peer.round + rounds
            log.info("neighbour %s removed us (%s)", peer, f"{rounds} rounds" if rounds else "for the run")
            self._prune_links()
            self._set_active()   # mid-step too: it sends us nothing more, so the step stops waiting for it
            self.transport.notify()
        return {"t": "removed", "ok": True}
