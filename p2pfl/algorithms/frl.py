"""FRL, federated rank learning, decentralised: peers train supermask scores and gossip only rankings.

Theory of operation (Mozaffari, Shejwalkar, Houmansadr, USENIX Security 2023, arXiv 2110.04350).
Every peer converts its model into a supermask network from the SHARED `seed` of the algorithm's
parameters (p2pfl.learn.supermask: frozen signed-constant weights, real-valued scores, the top
`sparsity` fraction of edges by |score| active). Those parameters are in every peer's
`algorithm_params`, hashed into the hello's config digest, so peers with another seed or sparsity
never connect. Round t:
- `local_update`: SGD on the scores only (the authors' lr 0.4 decayed 0.999 per round, momentum
  0.9, weight decay 1e-4: scores need a far larger step than weights; batch size and local steps
  or epochs are the shared training keys), from the current scores with a fresh momentum, as each
  of the authors' clients starts from the global scores.
- each gossip step: send every neighbour the ranking of each layer (edge ids by ascending score),
  concatenated into one `ranks` payload of unsigned integers (u16 when every layer has fewer than
  65,536 edges, else u32). The receiving side checks each layer's slice is a permutation
  (`invalid_payload` otherwise: refused and counted, never voted).
- `combine`: the rank vote of p2pfl.robust.ranks over the neighbourhood (own ranking plus the
  neighbours'; one vote each, mixing weights do not apply), and every layer's scores become its
  sorted initial scores in the voted order. The model that is evaluated is that voted supermask.
  The round's `neighbor_distance` is the mean normalised footrule distance of our ranking to the
  neighbours' (0: the same order; 1/3 on average for unrelated rankings).

`RankAttacker` is the Byzantine version (attack `rank_reversal`): it trains benign rankings as an
honest peer, votes the honest rankings it can see (the target's neighbourhood when the engine is
omniscient, its own neighbours' otherwise) with its own, and sends the reverse of that vote.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from p2pfl.algorithms.base import Algorithm, Context, Received, Tensor, Wrapper
from p2pfl.errors import ConfigError
from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.learn.models import FlatParameters
from p2pfl.learn.supermask import score_layers, to_supermask
from p2pfl.learn.train import LocalTrainer, unpack
from p2pfl.robust.ranks import footrule, is_permutation, rank_vote, ranking, reversed_vote, scores_in_order

U16_EDGES = 1 << 16    # a layer with fewer edges than this travels as u16
ATTACKS = ("rank_reversal",)


@dataclass(frozen=True)
class FRLParams:
    """The authors' defaults (SPIN-UMass/FRL args.py); `seed` draws the network every peer shares."""

    seed: int = 0                # frozen weights and initial scores (the same on every peer)
    sparsity: float = 0.5        # k: fraction of each layer's edges that are active
    lr: float = 0.4              # the scores' SGD
    lr_decay: float = 0.999      # per round
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        checks = {"sparsity": 0 < self.sparsity <= 1, "lr": 0 < self.lr < math.inf,
                  "lr_decay": 0 < self.lr_decay <= 1, "momentum": 0 <= self.momentum < 1,
                  "weight_decay": 0 <= self.weight_decay < math.inf}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"{key}: invalid value {getattr(self, key)!r}")


class FRL(Algorithm):
    """supermask scores trained locally; rankings gossiped; a rank vote per neighbourhood"""

    attacks = ATTACKS   # what its attacker (`attacker`) can run

    def __init__(self, ctx: Context, params: FRLParams) -> None:
        if ctx.gossip.aggregator != "mixing":
            raise ConfigError(f"aggregator: frl aggregates by its own rank vote; leave aggregator at 'mixing' "
                              f"(got {ctx.gossip.aggregator!r})")
        super().__init__(ctx, params)
        to_supermask(ctx.model, seed=params.seed, sparsity=params.sparsity)
        layers = score_layers(ctx.model)
        self.sizes = [p.numel() for _, p in layers]
        self.offsets = np.cumsum([0, *self.sizes])
        self.flat = FlatParameters(ctx.model)     # the scores only: the weights are frozen buffers
        self.x = self.flat.get()
        self.sorted_initial = [s.sort().values for s in self._split(self.x)]
        train = dataclasses.replace(ctx.train, lr=params.lr, lr_decay=params.lr_decay, momentum=params.momentum,
                                    weight_decay=params.weight_decay, rho=0.0)
        self.trainer = LocalTrainer(ctx.model, *unpack(ctx.train_data), train, torch.Generator().manual_seed(ctx.seed))
        self.dtype = "u16" if max(self.sizes) < U16_EDGES else "u32"
        self.ranks = self._rank(self.x)

    def _split(self, flat: Tensor) -> list[Tensor]:
        return [flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def _rank(self, scores: Tensor) -> list[Tensor]:
        return [ranking(s).cpu() for s in self._split(scores)]

    def as_rankings(self, value: Tensor) -> list[Tensor]:
        """Per-layer rankings from a `ranks` payload (int64) or from a peer's scores (floats)."""
        return self._split(value) if not value.is_floating_point() else self._rank(value)

    def validate(self, payload: np.ndarray) -> str | None:
        for layer, (a, b) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
            if not is_permutation(payload[a:b]):
                return f"layer {layer}: not a permutation of its {b - a} edge ids"
        return None

    def payloads(self) -> Mapping[str, PayloadSpec]:
        return {"ranks": PayloadSpec(self.dtype, int(self.offsets[-1]), max_abs=max(self.sizes) - 1,
                                     validate=self.validate)}

    def local_update(self, t: int) -> Mapping[str, Any]:
        self.trainer.optimizer.state.clear()   # each round starts from the voted scores, momentum fresh
        stats = self.trainer.train_round(t)
        x = self.flat.get()
        if not bool(torch.isfinite(x).all()):
            self.counters["non_finite_update"] += 1
            self.flat.set(self.x)
            x = self.x
        self.x = x
        self.ranks = self._rank(x)
        return {"train_loss": stats.loss, "local_steps": stats.steps}

    def wire(self) -> Tensor:
        return torch.cat(self.ranks)

    def outgoing(self, t: int, q: int, neighbor: str) -> Mapping[str, Tensor] | None:
        return {"ranks": self.wire()}

    def combine(self, t: int, q: int, received: Received) -> Mapping[str, Any]:
        if not received:
            return {}
        theirs = [self._split(r["ranks"]) for r in received.values()]
        distance = footrule(self.ranks, theirs)
        order = rank_vote(self.ranks, theirs)
        self.x = torch.cat([scores_in_order(o, s) for o, s in zip(order, self.sorted_initial)])
        self.ranks = order
        return {"neighbor_distance": distance}

    def end_round(self, t: int) -> None:
        self.flat.set(self.x)

    def model_loaded(self) -> None:
        self.x = self.flat.get()
        self.ranks = self._rank(self.x)

    def vector(self) -> Tensor:
        return self.x

    def attacker(self, attack: str, params: Mapping[str, Any], seed: int) -> RankAttacker:
        if attack not in ATTACKS:
            raise ConfigError(f"attack: {attack!r} does not apply to frl (rankings); allowed: {', '.join(ATTACKS)}")
        return RankAttacker(self, attack, params)


class RankAttacker(Wrapper):
    """rank_reversal: an FRL peer that sends the reverse of the honest rankings' vote (see the module)."""

    def __init__(self, inner: FRL, attack: str, params: Mapping[str, Any]) -> None:
        super().__init__(inner, params)
        self.inner: FRL = inner
        self.attack = attack
        self.crafted: dict[str, Tensor] = {}
        self.tally = {"crafted": 0, "crafted_from": 0}

    # local_update: the inner one's, benign rankings on its own data, as the authors' attackers

    def craft(self, x: Tensor, neighbors: Iterable[str], targets: list[str], *, source: str | None = None,
              views: Mapping[str, Any] | None = None, got: Mapping[str, Tensor] | None = None) -> None:
        """Per target, the reversed vote of the honest rankings of its neighbourhood that the driver
        could gather (`views`: ids first the target's, `got`: their payloads or scores) and our own."""
        got = got or {}
        own = self.inner.ranks
        self.crafted = {}
        used: set[str] = set()
        for nb in targets:
            ids = (views or {}).get(nb, ([],))[0]
            seen = [self.inner.as_rankings(got[j]) for j in ids if j in got]
            used.update(j for j in ids if j in got)
            voters = [own, *seen]
            self.crafted[nb] = torch.cat([reversed_vote([v[layer] for v in voters]) for layer in range(len(own))])
        self.tally["crafted"] += len(self.crafted)
        self.tally["crafted_from"] += len(used)

    def take_tally(self) -> dict[str, int]:
        info, self.tally = self.tally, {"crafted": 0, "crafted_from": 0}
        return info

    def outgoing(self, t: int, q: int, neighbor: str) -> Mapping[str, Tensor] | None:
        return {"ranks": self.crafted.get(neighbor, self.inner.wire())}

