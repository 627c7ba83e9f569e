"""Overlay rewiring in the in-process engine, on the peers' reputation advice.

Theory of operation: with reputation on, the engine holds every peer at the start of round t+1 until
all peers finished round t (a barrier: under the MockClock it costs no wall time), then applies one
deterministic overlay change and releases them. The change, in peer-index order:

1. Removal. For each peer i and each neighbour j in i's `advice().drop`, the edge (i, j) is removed
   both ways: the overlay stays undirected, so Metropolis-Hastings weights stay symmetric and W stays
   doubly stochastic (one-way removal would leave j mixing with weight on a peer that ignores it,
   and the honest models would no longer average). The minimum degree protects i: if unlinking j
   would leave i with fewer than `min_degree` neighbours and no replacement can be linked, the edge
   stays (i's reputation wrapper still ignores j's frames) and is retried next round.
2. Replacement. A peer that removed neighbours asks, in a seeded random order, among the peers it
   knows for as many links as it removed. It knows the neighbours of its neighbours, as peer
   exchange passes them on, but only from neighbours at or above half its mean reputation, each
   passing on only its own neighbours at or above half their mean (an attacker passes on whom it likes). The
   introduction must go both ways (c must know i the same way): a candidate accepts if
   it is below its own initial degree and neither side lists the other in its `drop` (a removal
   lasts `removal_rounds`). A peer that was removed does not look for new links, except up to
   `min_degree` (so that no peer is cut off): a removed attacker can reach at most that many new
   victims at a time, each of which then finds it out itself, starting it at the mean reputation.
3. Weights. W is recomputed by Metropolis-Hastings on the new overlay and every peer whose row
   changed gets `set_neighbors`; an omniscient attacker's knowledge of the graph is updated too.

Everything is a function of the peers' state at the barrier and the seed: the same seed gives the
same overlay. `history` records each change for the results (metrics.jsonl, `p2pfl report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import trio

from p2pfl.gossip.topology import metropolis_hastings
from p2pfl.peers.attacker import Knowledge
from p2pfl.peers.peer import Peer


class Rewirer:
    def __init__(self, peers: Sequence[Peer], adjacency: np.ndarray, seed: int, min_degree: int,
                 knowledge: Knowledge | None = None, aggregator: str = "mixing") -> None:
        self.peers, self.knowledge, self.aggregator = peers, knowledge, aggregator
        self.adj = adjacency.astype(bool).copy()
        self.target = self.adj.sum(1)          # each peer's initial degree: the slots it refills
        self.min_degree = min_degree
        self.rng = np.random.default_rng([seed, 0x2E1E])
        self.index = {p.id: i for i, p in enumerate(peers)}
        self.released: dict[int, trio.Event] = {}
        self.history: list[dict[str, Any]] = []   # {"round", "change": "unlink"|"link", "peer", "other"}
        self.scores: list[dict[int, float]] = [{} for _ in peers]   # at the barrier: r_ij by index
        self.slots = np.zeros(len(peers), dtype=int)   # links each peer removed and may replace

    def _event(self, t: int) -> trio.Event:
        return self.released.setdefault(t, trio.Event())

    async def before_round(self, peer: Peer, t: int) -> None:
        """The peers' hook: round t starts once round t-1 is closed everywhere and the overlay changed."""
        if t > 0:
            await self._event(t - 1).wait()

    def _drops(self, i: int) -> set[int]:
        return {self.index[p] for p in self.peers[i].algorithm.advice().drop if p in self.index}

    def round_closed(self, t: int) -> list[dict[str, Any]]:
        """Apply the overlay change after round t (every peer is waiting) and release round t+1."""
        drops = [self._drops(i) for i in range(len(self.peers))]
        self.scores = [{self.index[p]: r for p, r in peer.algorithm.advice().scores.items() if p in self.index}
                       for peer in self.peers]
        before = self.adj.copy()
        changes: list[dict[str, Any]] = []
        n = len(self.peers)
        for i in range(n):
            for j in sorted(d for d in drops[i] if self.adj[i, d]):
                if self.adj[i].sum() - 1 < self.min_degree and not self._link_one(i, drops, t, changes, avoid=j):
                    continue   # would isolate i: keep the edge until a replacement links
                self.adj[i, j] = self.adj[j, i] = False
                self.slots[i] += 1
                changes.append({"round": t, "change": "unlink", "peer": i, "other": j})
        for i in range(n):   # the removers refill their slots; anyone refills up to the minimum degree
            while ((self.slots[i] > 0 and self.adj[i].sum() < self.target[i]) or self.adj[i].sum() < self.min_degree) \
                    and self._link_one(i, drops, t, changes):
                self.slots[i] = max(0, self.slots[i] - 1)
        if changes:
            self._apply(before)
        self.history.extend(changes)
        self._event(t).set()
        return changes

    def _link_one(self, i: int, drops: list[set[int]], t: int, changes: list[dict[str, Any]],
                  avoid: int | None = None) -> bool:
        known = self._vouched(i)
        ok = [int(c) for c in known if c != i and c != avoid and not self.adj[i, c] and
              c not in drops[i] and i not in drops[c] and self.adj[c].sum() < self.target[c]
              and i in self._vouched(c)]
        if not ok:
            return False
        c = int(self.rng.choice(ok))
        self.adj[i, c] = self.adj[c, i] = True
        changes.append({"round": t, "change": "link", "peer": i, "other": c})
        return True

    def _reputable(self, k: int) -> list[int]:
        """k's neighbours at or above half its mean reputation (all of them when k keeps no reputations)."""
        nb = [int(c) for c in np.flatnonzero(self.adj[k])]
        r = self.scores[k]
        return [c for c in nb if r.get(c, 0.0) * len(r) >= 0.5] if r else nb

    def _vouched(self, i: int) -> set[int]:
        """The peers i learns of by peer exchange from its reputable neighbours, each passing on only
        its own reputable neighbours: an attacker known to honest peers is rarely introduced."""
        return {c for k in self._reputable(i) for c in self._reputable(k)}

    def _apply(self, before: np.ndarray) -> None:
        old_w = metropolis_hastings(before)
        W = metropolis_hastings(self.adj)
        ids = [p.id for p in self.peers]
        for i, p in enumerate(self.peers):
            if not np.array_equal(old_w[i], W[i]) or not np.array_equal(before[i], self.adj[i]):
                p.set_neighbors({ids[j]: float(W[i, j]) for j in np.flatnonzero(self.adj[i])})
        k = self.knowledge
        if k is not None:   # the omniscient attacker sees the new graph (dicts built by Cast.of)
            for i, pid in enumerate(ids):
                nb = [ids[j] for j in np.flatnonzero(self.adj[i])]
                k.neighbors[pid] = nb   # type: ignore[index]
                k.weights[pid] = {j: float(W[i, self.index[j]]) if self.aggregator == "mixing"   # type: ignore[index]
                                  else 1.0 / (len(nb) + 1) for j in nb}

    def neighbors(self) -> list[list[int]]:
        return [[int(j) for j in np.flatnonzero(row)] for row in self.adj]
