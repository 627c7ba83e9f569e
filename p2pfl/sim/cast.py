"""Who is who in a simulated run: the attackers' placement, the peer object for each index, and the
config-time checks of a scenario's Byzantine keys.

`choose_attackers` derives the Byzantine peers from the scenario seed through its own RNG stream, so
data, graph and initial model do not change with the attack, and the attackers of a smaller fraction
are a subset of those of a larger one (same seed). The engine asks `Cast.peer(i, ...)` for peer i: a
plain `Peer` when there are no attackers, else an `ObservedPeer` or an `AttackerPeer`
(p2pfl.peers.attacker) with the omniscient `Knowledge` of the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from p2pfl.algorithms.attack import NEIGHBORHOOD
from p2pfl.errors import ConfigError
from p2pfl.learn.train import Data
from p2pfl.peers.attacker import Board, Knowledge
from p2pfl.peers.factory import make_peer
from p2pfl.peers.peer import Peer
from p2pfl.robust import attacks as craft


def choose_attackers(attackers: float | Sequence[int], peers: int, seed: int) -> list[int]:
    """The Byzantine peer indices: an explicit list, or round(fraction * peers) drawn with `seed`."""
    if isinstance(attackers, (list, tuple)):
        bad = [a for a in attackers if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < peers]
        if bad:
            raise ConfigError(f"attackers: peer indices must be integers in [0, {peers}), got {bad[0]!r}")
        if len(set(attackers)) != len(attackers):
            raise ConfigError(f"attackers: duplicate peer index in {list(attackers)}")
        if len(attackers) >= peers:
            raise ConfigError(f"attackers: at least one peer must be honest, got all {peers}")
        return sorted(attackers)
    if isinstance(attackers, bool) or not isinstance(attackers, (int, float)) or not 0 <= attackers < 1:
        raise ConfigError(f"attackers: a fraction must be in [0, 1), got {attackers!r} "
                          "(or give a list of peer indices, e.g. [1, 5])")
    k = min(peers - 1, round(attackers * peers))
    perm = np.random.default_rng([seed, 0xB12A]).permutation(peers)  # own stream: nested across fractions
    return sorted(int(i) for i in perm[:k])


@dataclass
class Cast:
    """Who is who in a simulated run, and the peer object for each index."""

    attack: str
    params: Mapping[str, Any]
    byzantine: frozenset[int]
    ids: Sequence[str]
    num_classes: int | None
    knowledge: Knowledge | None = field(default=None)

    @classmethod
    def of(cls, attack: str, params: Mapping[str, Any], byzantine: Iterable[int], ids: Sequence[str],
           nbrs: Sequence[Sequence[int]], W: np.ndarray, aggregator: str, gossip_steps: int,
           num_classes: int | None) -> Cast:
        byz = frozenset(byzantine)
        if not byz or attack == "none":
            return cls(attack, params, frozenset(), ids, num_classes)
        neighbors = {ids[i]: [ids[j] for j in nbrs[i]] for i in range(len(ids))}
        # the weights a target mixes with: W for gossip; the uniform 1/(deg+1) of its inputs for other rules
        weights = {ids[i]: {ids[j]: float(W[i, j]) if aggregator == "mixing" else 1.0 / (len(nbrs[i]) + 1)
                            for j in nbrs[i]} for i in range(len(ids))}
        byz_ids = frozenset(ids[i] for i in byz)
        wanted = {j for b in byz for i in nbrs[b] for j in (ids[i], *neighbors[ids[i]])} - byz_ids
        if attack == "mimic":  # only the copied peer (see AttackerPeer._mimicked)
            peer = params.get("peer")
            honest = [p for p in ids if p not in byz_ids]
            wanted = {ids[peer] if isinstance(peer, int) else peer if peer is not None else honest[0]}
        board = Board(gossip_steps, wanted if attack in (*NEIGHBORHOOD, "mimic") else ())
        return cls(attack, params, byz, ids, num_classes, Knowledge(board, ids, neighbors, weights, byz_ids))

    @property
    def honest(self) -> list[int]:
        return [i for i in range(len(self.ids)) if i not in self.byzantine]

    def peer(self, i: int, model: nn.Module, train_data: Data, *, test_data: Data | None = None,
             **kwargs: Any) -> Peer:
        k = self.knowledge
        if k is None or i not in self.byzantine:
            return make_peer(model, train_data, test_data=test_data, num_classes=self.num_classes,
                             board=k.board if k is not None else None, **kwargs)
        return make_peer(model, train_data, attack=self.attack, attack_params=self.params, knowledge=k,
                         num_classes=self.num_classes, **kwargs)


def byzantine_neighbors(nbrs: Sequence[Sequence[int]], byzantine: Iterable[int]) -> dict[str, Any]:
    """Per honest peer, how many of its neighbours are Byzantine: max, mean, and the histogram."""
    byz = set(byzantine)
    counts = [sum(1 for j in nb if j in byz) for i, nb in enumerate(nbrs) if i not in byz]
    hist: dict[str, int] = {}
    for c in counts:
        hist[str(c)] = hist.get(str(c), 0) + 1
    return {"max": max(counts, default=0), "mean": float(np.mean(counts)) if counts else 0.0,
            "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0])))}



def _min_degree(topology: str, peers: int) -> int | None:
    """The smallest degree of the overlay when it does not depend on the seed (None for erdos:P)."""
    from p2pfl.gossip.topology import build_topology, parse_topology

    ts = parse_topology(topology)
    if ts.kind == "erdos":
        return None
    if ts.kind == "regular":
        return ts.k
    adj = build_topology(topology, peers, np.random.default_rng(0))  # deterministic kinds
    return int(adj.sum(1).min())


def check_scenario(s: Any) -> None:
    """Config-time checks of a Scenario's Byzantine keys and of its rule against the overlay's degree.

    (A random overlay, erdos:P, is checked when it is built: each Peer checks its own degree.)"""
    from p2pfl.robust import check_rule

    byz = choose_attackers(s.attackers, s.peers, s.seed)
    params = s.attack_settings()   # the attack and its params, as every peer checks them
    if s.attack == "none":
        if byz:
            raise ConfigError(f"attackers: {len(byz)} attacker(s) but attack = 'none'; set attack to one of: "
                              f"{', '.join(sorted(craft.ATTACKS))}, or run without them with --attackers 0")
    elif not byz:   # an attack nobody runs would be a clean run that looks like an attacked one
        given = "none" if not s.attackers else f"{s.attackers!r} of {s.peers} peers, which rounds to none"
        raise ConfigError(f"attackers: attack = {s.attack!r} but no attacker ({given}); give --attackers 0.2 "
                          "(a fraction) or --attackers 3, (peer indices)")
    else:
        peer = params.get("peer")
        if isinstance(peer, str):
            raise ConfigError("attack_params.peer (mimic): in a scenario, give a peer index")
        if isinstance(peer, int) and (peer >= s.peers or peer in byz):
            raise ConfigError(f"attack_params.peer (mimic): {peer} must be an honest peer index in "
                              f"[0, {s.peers}); the attackers are {byz}")
    degree = _min_degree(s.topology, s.peers)
    if degree is not None and s.aggregator != "mixing":
        try:
            check_rule(s.aggregator, degree, s.f, **s.aggregator_params)
        except ConfigError as e:
            raise ConfigError(f"aggregator: on topology {s.topology} with {s.peers} peers: {e}") from None
