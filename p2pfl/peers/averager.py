"""Gossip for an application that keeps its own training loop: one exchange when it asks.

Theory of operation: a `GossipAverager` is a `Peer` built without training data; its algorithm
(`ExternalUpdate`) takes the model's shared parameters as the application left them instead of
training. `await averager.round()` is one round of that peer: Q gossip steps with the neighbours
(send x_i, wait for their frames until all arrived or the step deadline, combine with the
configured rule: Metropolis-Hastings mixing, or a robust rule against Byzantine neighbours) and
the result written back into the model in place, so the application's optimizer keeps its state.
Everything else is the Peer's: transport, frame checks, deadlines, counted rejections. Rounds are
numbered by calls: every peer of a federation calls `round()` after the same number of local
steps (the same K), as the peers of a `Peer.train` run do.

`GossipOptimizer` wraps a torch optimizer the way hivemind's `Optimizer` and BlueFog's
neighbour-allreduce optimizers do: `await opt.step()` is the inner step, and one gossip round every
`every` steps. The step is async because the exchange waits on the network; call it from a trio
task (see examples/own_loop.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.peers.peer import Event, Peer, PeerConfig
from p2pfl.peers.transport import Transport


class GossipAverager:
    """One gossip exchange of `model`'s trainable parameters on demand (see the module docstring)."""

    def __init__(self, model: nn.Module, *, transport: Transport, neighbors: Mapping[str, float | None],
                 config: PeerConfig | None = None, offload: bool = True,
                 settle: Callable[[], Awaitable[None]] | None = None) -> None:
        """`neighbors`, `config` (its gossip keys: gossip_steps, aggregator, f, step_timeout_s; its
        training keys are unused) and `offload` are those of `Peer`."""
        self.peer = Peer(model, None, transport=transport, neighbors=neighbors, config=config, offload=offload,
                         settle=settle)
        self.events: list[Event] = []
        self.peer.on_event = self.events.append

    async def __aenter__(self) -> GossipAverager:
        await self.peer.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        return await self.peer.__aexit__(exc_type, exc, tb)

    async def connect(self, addr: str) -> str:
        """Dial a peer (libp2p multiaddr .../p2p/<id>) and make it a neighbour; see `Peer.connect`."""
        return await self.peer.connect(addr)

    async def round(self) -> Event:
        """One gossip round: the model's parameters are replaced by the rule's combination of them and
        the neighbours' (those that arrived before the deadline). Returns the round's event
        (received, missing, wait_s, rejected, neighbor_distance, ...)."""
        await self.peer.train(1)
        return self.events[-1]

    @property
    def rounds_done(self) -> int:
        return self.peer.round


class GossipOptimizer:
    """A torch optimizer whose every `every`-th `step` also runs one gossip round."""

    def __init__(self, optimizer: torch.optim.Optimizer, averager: GossipAverager, every: int = 1) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer: got {type(optimizer).__name__}, expected a torch.optim.Optimizer")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every: must be an integer >= 1 (local steps between gossip rounds), got {every!r}")
        self.optimizer, self.averager, self.every = optimizer, averager, every
        self.steps = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    async def step(self) -> Event | None:
        """The inner optimizer's step; after every `every`-th, one gossip round (its event returned)."""
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.every:
            return None
        return await self.averager.round()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
