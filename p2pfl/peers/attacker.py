"""Byzantine peers: `AttackerPeer` runs the normal round loop but sends crafted vectors.

Theory of operation. An attacker is a `Peer` (same transport, tracker, deadlines and events) whose
algorithm is `p2pfl.algorithms.attack.Attacker`, a wrapper around the honest gossip algorithm that
trains and aggregates as it does (or skips the work) and replaces what it sends. The driver keeps
what needs I/O and the run's knowledge: `prepare_step` works out each target's neighbourhood and
waits (bounded by the step deadline) for the honest vectors the attack crafts from, then hands
them to the algorithm's `craft`. The crafting math is in `p2pfl.robust.attacks`.

What an attacker knows:
- omniscient (the in-process engine): a `Knowledge` object with the whole graph, the mixing weights, who is
  Byzantine, and a shared `Board` on which every honest peer (an `ObservedPeer`) posts the vector it sends
  at (t, q). The attacker waits (up to its step deadline) until the honest vectors of its targets'
  neighbourhoods for the same (t, q) are posted: a rushing adversary, as in the literature.
- local (no `Knowledge`, e.g. a real `p2pfl peer --attack`): the attacker only sees the frames its own
  neighbours send it; its transport is wrapped so that each received vector is posted to a private
  `Board`. A target's neighbourhood is approximated by the attacker's own honest neighbours, and its
  Byzantine neighbours by the attacker itself plus the `colluders` it was told about.
Honest peers never wait for an attacker except through their normal step deadline, so there is no
deadlock: honest vectors of step s depend only on step s - 1 being over. An attacker's round event says
what it did (`round_info`): `crafted` vectors, computed from `crafted_from` honest ones.

Who is an attacker in a simulated run, and the engine's choice of peer class, are the simulator's
business (`p2pfl.sim.cast`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import trio
from torch import nn

from p2pfl.algorithms.attack import NEIGHBORHOOD, Attacker, View
from p2pfl.algorithms.frl import FRL, RankAttacker
from p2pfl.algorithms.gossip import Gossip
from p2pfl.errors import ConfigError
from p2pfl.gossip.codec import Frame
from p2pfl.peers.peer import Peer, PeerConfig
from p2pfl.peers.transport import Transport, TransportStats
from p2pfl.robust import attacks as craft

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------- knowledge


class Board:
    """Vectors by (step index, peer ID): what honest peers sent, readable by attackers.

    Only the `wanted` peers' vectors are kept (None: all), and only for the last `keep_steps` step
    indices, so memory stays bounded however long the run."""

    def __init__(self, steps_per_round: int, wanted: Iterable[str] | None = None, keep_steps: int = 8) -> None:
        self.steps_per_round = steps_per_round
        self.wanted = None if wanted is None else frozenset(wanted)
        self.keep_steps = keep_steps
        self._steps: dict[int, dict[str, torch.Tensor]] = {}
        self._newest = -1
        self._changed = trio.Event()

    def post(self, peer: str, t: int, q: int, x: torch.Tensor) -> None:
        if self.wanted is not None and peer not in self.wanted:
            return
        idx = t * self.steps_per_round + q
        if idx < self._newest - self.keep_steps:
            return
        self._steps.setdefault(idx, {})[peer] = x
        if idx > self._newest:
            self._newest = idx
            for old in [i for i in self._steps if i < idx - self.keep_steps]:
                del self._steps[old]
        self._changed.set()
        self._changed = trio.Event()

    def peek(self, t: int, q: int, peers: Iterable[str]) -> dict[str, torch.Tensor]:
        have = self._steps.get(t * self.steps_per_round + q, {})
        return {p: have[p] for p in peers if p in have}

    async def gather(self, t: int, q: int, peers: Iterable[str]) -> dict[str, torch.Tensor]:
        """Wait until every one of `peers` posted step (t, q); the caller bounds the wait."""
        wanted = list(peers)
        while True:
            changed = self._changed
            got = self.peek(t, q, wanted)
            if len(got) == len(wanted):
                return got
            await changed.wait()


@dataclass(frozen=True)
class Knowledge:
    """What an omniscient attacker knows: the graph, the weights each peer mixes with, the attackers,
    and the board where honest peers post their vectors."""

    board: Board
    order: Sequence[str]                          # peer IDs by peer index
    neighbors: Mapping[str, Sequence[str]]        # each peer's neighbours
    weights: Mapping[str, Mapping[str, float]]    # W_tj: the weight peer t gives neighbour j
    byzantine: frozenset[str]

    def honest_neighbors(self, target: str) -> list[str]:
        return [j for j in self.neighbors[target] if j not in self.byzantine]


class _Tap:
    """A transport that posts every received vector to a board (the local attacker's view)."""

    def __init__(self, inner: Transport, board: Board) -> None:
        self.inner, self.board = inner, board
        self.stats: TransportStats = inner.stats  # the same counters object

    def __getattr__(self, name: str) -> Any:  # anything else a transport offers (connect, listen, ...)
        return getattr(self.inner, name)

    @property
    def local_id(self) -> str:
        return self.inner.local_id

    async def send(self, peer: str, frame: Frame) -> bool:
        return await self.inner.send(peer, frame)

    async def receive(self) -> AsyncIterator[tuple[str, Frame]]:
        async for sender, frame in self.inner.receive():
            if frame.kind in ("model", "ranks"):   # floats, or FRL's rankings
                self.board.post(sender, frame.round, frame.step, frame.tensor())
            yield sender, frame

    async def aclose(self) -> None:
        await self.inner.aclose()


# ------------------------------------------------------------------------------------------- peers


class ObservedPeer(Peer):
    """An honest peer whose sent vectors an omniscient attacker can read (in-process engine only)."""

    def __init__(self, *args: Any, board: Board, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.board = board

    async def prepare_step(self, t: int, q: int, x: torch.Tensor) -> None:
        self.board.post(self.id, t, q, x)


class AttackerPeer(Peer):
    """A Byzantine peer running attack `attack` (a name in `p2pfl.robust.attacks.ATTACKS`).

    `knowledge`: omniscient view (in-process engine); None: local view (what its neighbours send it),
    with `colluders` the peer IDs of the other attackers it knows. `num_classes` is needed by label_flip.
    """

    wraps_reputation = False   # an attacker keeps no reputations: it is the one scored

    def __init__(self, model: nn.Module, train_data: tuple[torch.Tensor, torch.Tensor], *, attack: str,
                 transport: Transport, neighbors: Mapping[str, float | None],
                 attack_params: Mapping[str, Any] | None = None, config: PeerConfig | None = None,
                 knowledge: Knowledge | None = None, colluders: Iterable[str] = (),
                 num_classes: int | None = None, **kwargs: Any) -> None:
        self.attack = attack
        self.params = craft.check_attack(attack, attack_params)
        config = config or PeerConfig()
        if attack == "label_flip":
            if num_classes is None:
                raise ConfigError("label_flip: the attacker needs num_classes (C, for y -> C-1-y)")
            train_data = (train_data[0], craft.flip_labels(train_data[1], num_classes))
        self.knowledge = knowledge
        if knowledge is None:
            # only the steps the tracker may still need: the current one and those buffered ahead
            self.board = Board(config.gossip_steps, keep_steps=(config.max_ahead_rounds + 1) * config.gossip_steps)
            transport = _Tap(transport, self.board)
        else:
            self.board = knowledge.board
        super().__init__(model, train_data, transport=transport, neighbors=neighbors, config=config,
                         num_classes=num_classes, **kwargs)
        self.colluders = frozenset(knowledge.byzantine if knowledge else colluders) - {self.id}
        if attack == "mimic" and knowledge is None and isinstance(self.params["peer"], int):
            raise ConfigError("mimic: without the engine's peer order, attack_params.peer must be a peer ID")
        self.algorithm: Attacker | RankAttacker
        if isinstance(self.algorithm, FRL):
            self.algorithm = self.algorithm.attacker(attack, self.params, config.seed)
        elif isinstance(self.algorithm, Gossip):
            self.algorithm = Attacker(self.algorithm, attack, self.params, config.seed)
        else:
            raise ConfigError(f"attack: attackers wrap the gossip algorithms and frl, not {config.algorithm!r}")

    # -- what the attacker knows about a target -----------------------------------------------------
    def _targets(self) -> list[str]:
        return [nb for nb in self.tracker.neighbors if nb not in self.colluders]

    def _neighborhood(self, target: str) -> View:
        """(honest IDs the target aggregates, first the target itself; W_tj of its honest neighbours;
        sum of W_tb over its Byzantine neighbours; n = its inputs; f = its Byzantine inputs)."""
        k = self.knowledge
        if k is not None:
            good = k.honest_neighbors(target)
            row = k.weights[target]
            byz = [b for b in k.neighbors[target] if b in k.byzantine]
            return [target, *good], {j: row[j] for j in good}, sum(row[b] for b in byz), \
                len(k.neighbors[target]) + 1, len(byz)
        # local view: the target's neighbourhood ~ ours, uniform weights
        mine = self.tracker.neighbors
        w = 1.0 / (len(mine) + 1)
        good = [j for j in mine if j not in self.colluders and j != target]
        f = 1 + sum(1 for j in mine if j in self.colluders)
        return [target, *good], {j: w for j in good}, w * f, len(mine) + 1, f

    def _mimicked(self) -> str | None:
        peer = self.params["peer"]
        k = self.knowledge
        if isinstance(peer, int) and k is not None:
            return k.order[peer]
        if peer is not None:
            return str(peer)
        pool = [p for p in k.order if p not in k.byzantine] if k is not None else self._targets()
        return pool[0] if pool else None

    # -- the hooks ----------------------------------------------------------------------------------
    async def prepare_step(self, t: int, q: int, x: torch.Tensor) -> None:
        """Gather what this step's attack crafts from (waiting, bounded by the step deadline, for the
        honest vectors it reads), then let the attacker algorithm craft."""
        targets = self._targets()
        source, views, got = None, None, None
        if self.attack == "mimic":
            source = self._mimicked()
            if source is not None:
                got = await self._gather(t, q, [source])
        elif self.attack in NEIGHBORHOOD:
            views = {nb: self._neighborhood(nb) for nb in targets}
            got = await self._gather(t, q, {j for ids, *_ in views.values() for j in ids})
        self.algorithm.craft(x, self.tracker.neighbors, targets, source=source, views=views, got=got)

    def round_info(self, t: int) -> dict[str, Any]:
        """`crafted`: vectors it crafted this round (one per target and step; label_flip, free_rider
        "mean" and silent craft none); `crafted_from`: the honest vectors, received or (omniscient) read on
        the board, those were computed from, summed over the steps."""
        return self.algorithm.take_tally()

    async def _gather(self, t: int, q: int, ids: Iterable[str]) -> dict[str, torch.Tensor]:
        ids = list(ids)
        with trio.move_on_after(self.config.step_timeout_s):
            return await self.board.gather(t, q, ids)
        got = self.board.peek(t, q, ids)
        log.debug("%s: step (%d, %d): %d of %d honest vectors by the deadline", self.id, t, q, len(got), len(ids))
        return got
