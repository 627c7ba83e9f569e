"""What an algorithm is to the driver: the sans-IO `Algorithm` base and the `Context` it is built from.

Theory of operation: the driver (`p2pfl.peers.peer.Peer`) owns rounds, deadlines, the transport and
events; an algorithm owns everything about learning. Per round t the driver calls

    local_update(t)                  -> stats (loss, steps, ...): train on local data
    for each gossip step q < Q:
        outgoing(t, q, neighbor)     -> {kind: 1-D tensor} or None (send nothing to that neighbour)
        ... the driver sends, waits for the neighbours' frames until all arrived or the deadline ...
        combine(t, q, received)      -> info for the round event; received = {peer ID: {kind: tensor}}
    end_round(t)                     -> write the shared state back into the model (evaluated next)

and, between rounds, `set_neighbors(weights)` when the overlay changes, `advice()` to learn which
neighbours the algorithm would drop, and `state_dict()` / `load_state_dict()` for checkpoints.
`payloads()` declares what frames may carry (kind -> dtype, exact element count, magnitude bound);
the transport refuses anything else before `combine` sees it, so an algorithm never checks shapes.

An algorithm does no I/O: no trio, no sockets, no clock, no files. It may be called from a worker
thread (never two calls at once). What it counts (inputs it refused, steps it kept its own vector)
goes into `counters`, which the driver adds to the peer's rejections.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.learn.train import Data, TrainConfig

Tensor = torch.Tensor
Received = Mapping[str, Mapping[str, Tensor]]


@dataclass(frozen=True)
class GossipConfig:
    """How received vectors are combined: a rule of `p2pfl.robust` and what it needs."""

    aggregator: str = "mixing"
    aggregator_params: Mapping[str, Any] = field(default_factory=dict)
    f: int = 0                         # Byzantine inputs the rule must tolerate
    max_abs_weight: float | None = 1e6   # the bound on every received value (payload spec)


@dataclass
class Context:
    """Everything an algorithm is built from. `neighbors` maps each neighbour's peer ID to its mixing
    weight W_ij (already resolved: None is never passed); `seed` is this peer's own seed."""

    peer_id: str
    model: nn.Module
    train_data: Data                   # (x, y) tensors on the model's device, or a DataLoader
    train: TrainConfig
    gossip: GossipConfig
    neighbors: Mapping[str, float]
    seed: int = 0
    num_classes: int | None = None
    # labelled samples every peer holds alike and none trains on (a backbone's public part), or None
    reference_data: tuple[Tensor, Tensor] | None = None


@dataclass(frozen=True)
class Advice:
    """What an algorithm tells the driver about its neighbours: scores (e.g. reputations) and the
    neighbours it would no longer hear from. The driver decides what to do with it."""

    scores: Mapping[str, float] = field(default_factory=dict)
    drop: frozenset[str] = frozenset()


class Algorithm(ABC):
    """Base class of every algorithm: the five abstract methods are what each one must say; the rest
    have defaults a subclass overrides where it differs. See the module docstring."""

    def __init__(self, ctx: Context, params: Any = None) -> None:
        self.ctx, self.params = ctx, params
        self.neighbors: dict[str, float] = dict(ctx.neighbors)
        self.counters: Counter[str] = Counter()

    @abstractmethod
    def payloads(self) -> Mapping[str, PayloadSpec]:
        """Each payload kind a neighbour's frame may carry (checked at the transport boundary)."""

    @abstractmethod
    def local_update(self, t: int) -> Mapping[str, Any]:
        """Train on local data for round t; returns keys for the round event (train_loss, ...)."""

    @abstractmethod
    def outgoing(self, t: int, q: int, neighbor: str) -> Mapping[str, Tensor] | None:
        """What to send `neighbor` at gossip step (t, q): {kind: 1-D tensor}, or None for nothing."""

    @abstractmethod
    def combine(self, t: int, q: int, received: Received) -> Mapping[str, Any]:
        """Fold in what arrived at (t, q), keyed by peer ID; returns keys for the round event."""

    def end_round(self, t: int) -> None:  # noqa: B027 -- optional hook: no work by default
        """Called once the round's gossip steps are over, before the driver evaluates the model."""

    def model_loaded(self) -> None:  # noqa: B027 -- optional hook: no state to re-read by default
        """The model's parameters were replaced from outside (a checkpoint was applied): re-read them."""

    @abstractmethod
    def vector(self) -> Tensor:
        """The shared state as one 1-D tensor (consensus distance across peers, non-finite checks)."""

    def set_neighbors(self, weights: Mapping[str, float]) -> None:
        self.neighbors = dict(weights)

    def advice(self) -> Advice:
        return Advice()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold beyond the trainer's model and optimizer (e.g. reputations)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")


class Wrapper(Algorithm):
    """An algorithm around another one (an attacker, reputation): every call it does not override goes
    to `inner`, and it shares inner's neighbours and counters, so the driver sees one algorithm."""

    def __init__(self, inner: Algorithm, params: Any = None) -> None:
        super().__init__(inner.ctx, params)
        self.inner = inner
        self.neighbors = inner.neighbors
        self.counters = inner.counters

    # the inner algorithm's parts, for the driver's checkpoints and measurements
    @property
    def trainer(self) -> Any:
        return getattr(self.inner, "trainer", None)

    @property
    def flat(self) -> Any:
        return getattr(self.inner, "flat", None)

    def payloads(self) -> Mapping[str, PayloadSpec]:
        return self.inner.payloads()

    def local_update(self, t: int) -> Mapping[str, Any]:
        return self.inner.local_update(t)

    def outgoing(self, t: int, q: int, neighbor: str) -> Mapping[str, Tensor] | None:
        return self.inner.outgoing(t, q, neighbor)

    def combine(self, t: int, q: int, received: Received) -> Mapping[str, Any]:
        return self.inner.combine(t, q, received)

    def end_round(self, t: int) -> None:
        self.inner.end_round(t)

    def model_loaded(self) -> None:
        self.inner.model_loaded()

    def vector(self) -> Tensor:
        return self.inner.vector()

    def set_neighbors(self, weights: Mapping[str, float]) -> None:
        self.inner.set_neighbors(weights)
        self.neighbors = self.inner.neighbors

    def advice(self) -> Advice:
        return self.inner.advice()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)
