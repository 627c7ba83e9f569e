"""Byzantine peers as an algorithm: a wrapper around the honest gossip algorithm that replaces what it sends.

Theory of operation: `Attacker` trains and aggregates as the honest algorithm it wraps does (sign_flip
and label_flip train; sign_flip, label_flip and free_rider aggregate; the others keep their model
and skip the work), and sends, per neighbour and gossip step, what `craft` prepared: a flipped,
noisy or copied vector, or one computed from the honest vectors of the target's neighbourhood
(ALIE, IPM, dissensus; the math is `p2pfl.robust.attacks`). Which honest vectors it may read, and
waiting for them, is the driver's (`p2pfl.peers.attacker.AttackerPeer`): an omniscient attacker
reads its targets' neighbourhoods off a board as they are sent, a rushing adversary, and that wait
is I/O; this class stays sans-IO and is handed what arrived.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from p2pfl.algorithms.base import Received, Tensor, Wrapper
from p2pfl.algorithms.gossip import Gossip
from p2pfl.errors import ConfigError
from p2pfl.robust import attacks as craft

TRAINING = ("sign_flip", "label_flip")              # attackers that run local training
AGGREGATING = ("sign_flip", "label_flip", "free_rider")  # attackers whose own model matters
# craft from the target's honest neighbourhood (rank_reversal: FRL's, crafted by frl.RankAttacker)
NEIGHBORHOOD = ("alie", "ipm", "dissensus", "rank_reversal")

# What the driver knows of a target: (honest IDs it aggregates, first the target itself; W_tj of its
# honest neighbours; sum of W_tb over its Byzantine neighbours; n = its inputs; f = its Byzantine inputs)
View = tuple[list[str], dict[str, float], float, int, int]


class Attacker(Wrapper):
    def __init__(self, inner: Gossip, attack: str, params: Mapping[str, Any], seed: int) -> None:
        if attack == "rank_reversal":
            raise ConfigError("attack: 'rank_reversal' reverses rankings; it applies to algorithm 'frl' only")
        super().__init__(inner, params)
        self.inner: Gossip = inner
        self.attack = attack
        self.noise = torch.Generator().manual_seed(seed ^ 0x5EED_B12A)
        self.crafted: dict[str, Tensor | None] = {}
        # this round so far: vectors crafted (one per neighbour and step) and the honest vectors they came from
        self.tally = {"crafted": 0, "crafted_from": 0}

    def local_update(self, t: int) -> Mapping[str, Any]:
        if self.attack in TRAINING:
            return self.inner.local_update(t)
        return {"train_loss": 0.0, "local_steps": 0}

    def craft(self, x: Tensor, neighbors: Iterable[str], targets: list[str], *, source: str | None = None,
              views: Mapping[str, View] | None = None, got: Mapping[str, Tensor] | None = None) -> None:
        """Prepare this step's vector for each neighbour (the own x for colluders and, where nothing can
        be crafted, for targets too): `source` is the peer mimic copies, `views` the neighbourhoods
        NEIGHBORHOOD attacks craft from, `got` the honest vectors the driver could gather."""
        p, name, got = self.params, self.attack, got or {}
        crafted: dict[str, Tensor | None] = {nb: x for nb in neighbors}
        made, used = 0, set[str]()   # crafted vectors; the honest peers whose vectors they came from
        if name == "silent":
            crafted = dict.fromkeys(crafted)
        elif name == "sign_flip":
            flipped = craft.sign_flip(x, scale=p["scale"])
            crafted.update({nb: flipped for nb in targets})
            made = len(targets)
        elif name == "gaussian":
            crafted.update({nb: craft.gaussian(x, sigma=p["sigma"], generator=self.noise) for nb in targets})
            made = len(targets)
        elif name == "free_rider" and p["mode"] == "noise":
            crafted.update({nb: craft.uniform_noise(x, scale=p["scale"], generator=self.noise) for nb in targets})
            made = len(targets)
        elif name == "mimic":
            if source is not None and source in got:
                crafted.update({nb: got[source] for nb in targets})
                made, used = len(targets), {source}
        elif name in NEIGHBORHOOD:
            for nb, view in (views or {}).items():
                vector = self._from_neighborhood(view, got)
                if vector is not None:
                    crafted[nb] = vector
                    made += 1
                    used.update(j for j in view[0] if j in got)
        # sign_flip/label_flip/free_rider "mean": x is the model it trained / the mean it received
        self.crafted = crafted
        self.tally["crafted"] += made
        self.tally["crafted_from"] += len(used)

    def take_tally(self) -> dict[str, int]:
        """What this round crafted (see `AttackerPeer.round_info`); starts the next round's count."""
        info, self.tally = self.tally, {"crafted": 0, "crafted_from": 0}
        return info

    def _from_neighborhood(self, view: View, got: Mapping[str, Tensor]) -> Tensor | None:
        ids, good_w, byz_w, n, f = view
        target = ids[0]
        if target not in got:
            return None  # the target's own vector never came: send our own x this step
        if self.attack == "dissensus":
            good = [j for j in ids[1:] if j in got]
            stacked = torch.stack([got[j] for j in good]) if good else got[target].new_zeros(0, got[target].numel())
            w = torch.tensor([good_w[j] for j in good], dtype=stacked.dtype)
            return craft.dissensus(got[target], stacked, w, byz_w, eps=self.params["eps"])
        honest = torch.stack([got[j] for j in ids if j in got])  # (k, d)
        if self.attack == "ipm":
            return craft.ipm(honest, eps=self.params["eps"])
        z = self.params["z"] if self.params["z"] is not None else craft.alie_z(n, f)
        return craft.alie(honest, z=z)

    def outgoing(self, t: int, q: int, neighbor: str) -> Mapping[str, Tensor] | None:
        vector = self.crafted.get(neighbor, self.inner.x)
        return None if vector is None else {"model": vector}

    def combine(self, t: int, q: int, received: Received) -> Mapping[str, Any]:
        if self.attack == "free_rider" and self.params["mode"] == "mean":
            self.inner.x = craft.received_mean(torch.stack([r["model"] for r in received.values()]))
            return {"neighbor_distance": 0.0}
        if self.attack not in AGGREGATING:
            return {"neighbor_distance": 0.0}  # its own model plays no part in what it sends
        return self.inner.combine(t, q, received)

