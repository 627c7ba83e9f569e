"""The Peer: one participant's round loop, the driver around a sans-IO `Algorithm` and `StepTracker`.

Theory of operation: `train(rounds)` runs, for each round t, the algorithm's local update, then Q
gossip steps: send what the algorithm gives for (t, q) to every neighbour, wait until all neighbours'
(t, q) frames arrived or `step_timeout_s` passed (longer while frames are still arriving over a slow
link: `wait_step`), and hand what arrived, keyed by peer ID, to the algorithm's `combine`. The
algorithm (`p2pfl.algorithms`, `PeerConfig.algorithm`) decides what is trained, sent and combined;
the peer owns rounds, deadlines, the transport and events. A background task drains the transport
into the tracker continuously, so frames are read even while the peer trains. Torch work runs in a
worker thread (`offload=True`, the real-network default) so the trio loop keeps serving
streams; the in-process simulator runs it inline (`offload=False`), as a thread hop costs as much as
a small model's training step there and nothing else waits on that loop's I/O.

The same class is what an application embeds:

    peer = Peer(model, (x, y), config=PeerConfig(), transport=network.endpoint(identity),
                neighbors={"12D3KooW...": None})
    async with peer:
        await peer.train(rounds=50)

`train_data` and `test_data` are (x, y) tensors or NumPy arrays, a torch Dataset or a DataLoader
(`p2pfl.learn.custom.as_data`); the model and the loss run once on two samples of each when the
peer is built, so what cannot work is refused here, not mid-run. The peer's device is its model's.
`train_data=None` is a peer whose application trains the model itself (`GossipAverager`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

import numpy as np
import torch
import trio
from torch import nn
from torch.utils.data import DataLoader

from p2pfl import algorithms
from p2pfl.algorithms import Algorithm, Context, GossipConfig, reputation
from p2pfl.algorithms.gossip import ExternalUpdate
from p2pfl.errors import ConfigError, Reject, RemoteProtocolError
from p2pfl.gossip import payloads
from p2pfl.gossip.codec import INT_DTYPES, Frame
from p2pfl.gossip.codec import storage as codec_storage
from p2pfl.gossip.payloads import DEFAULT_MAX_ABS
from p2pfl.gossip.rounds import StepTracker
from p2pfl.learn.custom import as_data, check_fit
from p2pfl.learn.models import ParamLayout
from p2pfl.learn.objectives import loss_function, name_of
from p2pfl.learn.train import Data, TrainConfig, evaluate, unpack
from p2pfl.peers.transport import Transport
from p2pfl.robust import RULES, check_rule

log = logging.getLogger(__name__)

Event = dict[str, Any]


@dataclass(frozen=True)
class PeerConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    algorithm: str = "dfedavg"         # a name in the registry (p2pfl.algorithms.names())
    algorithm_params: Mapping[str, Any] = field(default_factory=dict)   # checked by the registry
    gossip_steps: int = 1              # Q: 1 = DFedAvg/DFedSAM, >1 = -MGS
    aggregator: str = "mixing"         # a name in p2pfl.robust.RULES
    aggregator_params: Mapping[str, Any] = field(default_factory=dict)
    f: int = 0                         # Byzantine inputs the rule must tolerate
    step_timeout_s: float = 30.0       # deadline for one gossip step, from the moment we sent
    max_ahead_rounds: int = 2          # frames further ahead are refused (bounded buffering)
    eval_every: int = 1                # evaluate on the test set every k rounds (and at the last)
    seed: int = 0                      # this peer's mini-batch order
    # a received value beyond this is refused (out_of_range): finite 3e38s overflow any weighted sum
    max_abs_weight: float | None = DEFAULT_MAX_ABS
    # False where neighbours join and leave at run time (a real peer): the caller checks the rule once
    # against the planned degree, and a step with too few inputs keeps the own vector
    check_degree: bool = True
    # RFFL reputation around the algorithm (p2pfl.algorithms.reputation): its parameters; None: off
    reputation: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.gossip_steps < 1:
            raise ConfigError(f"gossip_steps: must be >= 1, got {self.gossip_steps}")
        if self.step_timeout_s <= 0:
            raise ConfigError(f"step_timeout_s: must be > 0, got {self.step_timeout_s}")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every: must be >= 1, got {self.eval_every}")
        if self.aggregator not in RULES:
            raise ConfigError(f"aggregator: unknown value {self.aggregator!r}; allowed: {', '.join(sorted(RULES))}")
        if self.f < 0:
            raise ConfigError(f"f: must be >= 0, got {self.f}")
        algorithms.params(self.algorithm, self.algorithm_params)
        if self.reputation is not None:
            reputation.params(self.reputation)

    def gossip(self) -> GossipConfig:
        return GossipConfig(self.aggregator, self.aggregator_params, self.f, self.max_abs_weight)

    def replace(self, **changes: Any) -> PeerConfig:
        return dataclasses.replace(self, **changes)


_FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
MAX_STEP_EXTENSION = 4   # a step whose frames are still arriving waits at most this many step timeouts


async def wait_step(done: trio.Event, timeout_s: float, progress: Callable[[], int], most_s: float) -> bool:
    """Wait for `done`; True if it came. The deadline is `timeout_s`, moved on by another `timeout_s`
    each time it passes while bytes of frames keep arriving (`progress()`, a byte count, grew in
    the last `timeout_s`), up to `most_s` in all: a frame that crosses a slow link in 50 s is
    waited for, a silent neighbour costs `timeout_s` as before. (A neighbour that trickles bytes
    can hold a step for `most_s`: that is the bound.)"""
    start = trio.current_time()
    deadline = start + timeout_s
    seen = progress()
    while True:
        with trio.move_on_at(deadline):
            await done.wait()
            return True
        now, count = trio.current_time(), progress()
        if count == seen or now >= start + most_s:
            return False
        seen, deadline = count, min(now + timeout_s, start + most_s)


class Peer:
    def __init__(self, model: nn.Module, train_data: Any, *, transport: Transport,
                 neighbors: Mapping[str, float | None], config: PeerConfig | None = None,
                 test_data: Any = None,
                 on_event: Callable[[Event], None] | None = None, offload: bool = True,
                 num_classes: int | None = None, settle: Callable[[], Awaitable[None]] | None = None,
                 reference_data: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`neighbors` maps each neighbour's peer ID to its mixing weight W_ij (None: uniform 1/(deg+1)).
        `settle`: awaited when a step's deadline fires, before the step closes. Under a MockClock (the
        in-process simulator passes trio.testing.wait_all_tasks_blocked), frames due at the very instant
        of the deadline are common and trio would order them against it at random: letting everything
        due now happen first makes a seed give one result."""
        self.settle = settle
        self.config = config or PeerConfig()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model: got {type(model).__name__}, expected a torch.nn.Module")
        self.model = model
        # data: tensors move to the model's device once, here; a DataLoader's batches move as drawn
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        own_loop = train_data is None   # the application trains the model itself (GossipAverager)
        if own_loop:
            train_data = (torch.empty(0), torch.empty(0))   # never read: the algorithm does not train
        else:
            train_data = self._data(train_data, "train_data")
            check_fit(model, train_data, loss_function(self.config.train.loss), "train_data")
        test_data = None if test_data is None else self._data(test_data, "test_data", shuffle=False)
        if test_data is not None:   # evaluated every few rounds: a misfit must not wait for the first
            check_fit(model, test_data, loss_function(self.config.train.loss), "test_data")
        self.transport = transport
        self.id = transport.local_id
        self.layout = ParamLayout.of(model)
        self.schema = self.layout.schema
        self.test_data = test_data
        self.on_event = on_event or (lambda e: None)
        self.offload = offload
        self.tracker: StepTracker[tuple[str, torch.Tensor]] = StepTracker(
            [], steps_per_round=self.config.gossip_steps, max_ahead_rounds=self.config.max_ahead_rounds)
        self.weights = self._weights(neighbors)
        ctx = Context(peer_id=self.id, model=model, train_data=train_data, train=self.config.train,
                      gossip=self.config.gossip(), neighbors=self.weights, seed=self.config.seed,
                      num_classes=num_classes, reference_data=reference_data)
        self.algorithm: Algorithm = (ExternalUpdate(ctx) if own_loop else
                                     algorithms.build(self.config.algorithm, ctx, self.config.algorithm_params))
        if self.config.reputation is not None and self.wraps_reputation:
            self.algorithm = reputation.Reputation(self.algorithm, reputation.params(self.config.reputation))
        # what a neighbour's frame must carry; the transport refuses anything else before we see it
        self.payloads = dict(self.algorithm.payloads())
        transport.expect(self.payloads)
        self.set_neighbors(neighbors)
        self.rejected: Counter[str] = Counter()   # reasons counted above the transport
        self.round = 0                            # next round to run
        self._step_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        # awaited before each round (the in-process engine's rewiring barrier); None: start at once
        self.before_round: Callable[[Peer, int], Awaitable[None]] | None = None

    wraps_reputation = True   # an attacker's algorithm is its own (AttackerPeer)

    def _data(self, value: Any, what: str, shuffle: bool = True) -> Data:
        data = as_data(value, what, batch_size=self.config.train.batch_size, shuffle=shuffle,
                       generator=torch.Generator().manual_seed(self.config.seed))
        return data if isinstance(data, DataLoader) else (data[0].to(self.device), data[1].to(self.device))

    def _weights(self, neighbors: Mapping[str, float | None]) -> dict[str, float]:
        if self.id in neighbors:
            raise ConfigError(f"peer {self.id} lists itself as a neighbour")
        degree = len(neighbors)
        weights = {p: (1.0 / (degree + 1) if w is None else float(w)) for p, w in neighbors.items()}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) > 1 + 1e-6:
            raise ConfigError(f"mixing weights must be >= 0 and sum to at most 1, got {sorted(weights.values())}")
        if self.config.check_degree:
            check_rule(self.config.aggregator, degree, self.config.f, **self.config.aggregator_params)
        return weights

    async def connect(self, addr: str) -> str:
        """Dial a peer at `addr` (a multiaddr ending in /p2p/<peer ID>) over a transport that dials
        (`Libp2pTransport`) and make it a neighbour; every neighbour then has the uniform weight
        1/(degree+1). Returns its peer ID. The transport must be open (`async with transport:`)."""
        dial = getattr(self.transport, "connect", None)
        if dial is None:
            raise ConfigError(f"connect: {type(self.transport).__name__} does not dial addresses; "
                              "use Libp2pTransport (p2pfl.transports)")
        peer_id, _ = await dial(addr)
        self.set_neighbors({p: None for p in (*self.weights, peer_id)})
        return str(peer_id)

    def set_neighbors(self, neighbors: Mapping[str, float | None]) -> None:
        """Set the neighbours and their mixing weights (None: uniform); also mid-step, when a
        neighbour leaves: the step then stops waiting for it."""
        self.weights = self._weights(neighbors)
        self.tracker.set_neighbors(self.weights)
        self.algorithm.set_neighbors(self.weights)
        if self.tracker.complete:
            self._step_done.set()

    # the gossip family's pieces, for the drivers that checkpoint and measure them
    @property
    def trainer(self) -> Any:
        """The algorithm's `LocalTrainer` (model, optimizer, batch order: what a checkpoint holds), or
        None for an algorithm that trains without one (it is then not checkpointed)."""
        return getattr(self.algorithm, "trainer", None)

    @property
    def flat(self) -> Any:
        return self.algorithm.flat   # type: ignore[attr-defined]

    @property
    def vector(self) -> torch.Tensor:
        """x_i: the shared state as one vector (after `train`: the last round's)."""
        return self.algorithm.vector()

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Peer:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._receive_loop)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        self._nursery = None
        return await self._nursery_cm.__aexit__(exc_type, exc, tb)

    def run(self, rounds: int) -> list[Event]:
        """Blocking convenience: start, train `rounds` rounds, stop. Returns the round events."""
        events: list[Event] = []
        user_hook = self.on_event

        def record(event: Event) -> None:
            events.append(event)
            user_hook(event)

        self.on_event = record

        async def main() -> None:
            async with self:
                await self.train(rounds)

        trio.run(main)
        return events

    # -- the round --------------------------------------------------------------------------------
    async def _compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.offload:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    async def train(self, rounds: int) -> None:
        """Run `rounds` more rounds from `self.round`."""
        if self._nursery is None:
            raise RuntimeError("use `async with peer:` (or peer.run()) before train()")
        last = self.round + rounds - 1
        for t in range(self.round, self.round + rounds):
            # Yield around training: with many inline peers on one loop, all peers' training then
            # runs back to back rather than interleaved with aggregation and sends, which keeps
            # torch's code and data in cache (about 25% faster per round at 256 peers).
            if self.before_round is not None:
                await self.before_round(self, t)
            await trio.lowlevel.checkpoint()
            bytes_before = self.transport.stats.bytes_sent
            stats = await self._compute(self.algorithm.local_update, t)
            await trio.lowlevel.checkpoint()
            step_events = [await self._gossip_step(t, q) for q in range(self.config.gossip_steps)]
            self.algorithm.end_round(t)
            event: Event = {"kind": "round", "round": t, "peer": self.id, **stats,
                            "received": sum(s["received"] for s in step_events),
                            "missing": sorted({m for s in step_events for m in s["missing"]}),
                            # seconds spent waiting for neighbours' frames after sending, over the Q steps
                            "wait_s": sum(s["wait_s"] for s in step_events),
                            "rejected": self.rejections(),
                            "neighbor_distance": step_events[0].get("neighbor_distance"),
                            "bytes_sent": self.transport.stats.bytes_sent,
                            "bytes_round": self.transport.stats.bytes_sent - bytes_before}
            extra: Counter[str] = Counter()
            for info in step_events:   # the algorithm's own keys from combine, numbers summed over the Q steps
                extra.update({k: v for k, v in info.items() if k not in event and isinstance(v, (int, float))})
            event.update(extra)
            event.update(self.round_info(t))
            advice = self.algorithm.advice()
            if advice.scores or advice.drop:
                event.update(reputation=dict(advice.scores), removed=sorted(advice.drop))
            if self.test_data is not None and (t % self.config.eval_every == 0 or t == last):
                train = self.config.train
                acc, loss = await self._compute(partial(evaluate, self.model, *unpack(self.test_data),
                                                        loss=train.loss, metric=train.metric))
                event.update(accuracy=acc, test_loss=loss)   # `accuracy`: the metric's value
                if train.metric != "accuracy":
                    event["metric"] = name_of(train.metric)
            self.round = t + 1
            self.on_event(event)

    async def _gossip_step(self, t: int, q: int) -> Event:
        self._step_done = trio.Event()
        self.tracker.begin(t, q)
        x = self.algorithm.vector()
        await self.prepare_step(t, q, x)
        # one host copy of each tensor sent this step, whatever the number of neighbours it goes to:
        # on a GPU peer that copy is the step's only transfer to the host
        host: dict[tuple[int, str], tuple[torch.Tensor, Any]] = {}
        for nb in self.tracker.neighbors:
            out = self.outgoing(t, q, x, nb)
            if out is None:
                continue
            for kind, tensor in ({"model": out} if isinstance(out, torch.Tensor) else out).items():
                key = (id(tensor), kind)
                if key not in host:   # the tensor is kept alongside, so its id is not reused
                    host[key] = (tensor, self._wire(kind, tensor))
                # never modified in place after this point, so receivers may share the memory
                await self.transport.send(nb, Frame(kind=kind, sender=self.id, round=t, step=q, schema=self.schema,
                                                    dtype=self.payloads[kind].dtype, payload=host[key][1]))
        waited = 0.0
        if not self.tracker.complete:
            start = trio.current_time()
            timeout = self.config.step_timeout_s
            arrived = await wait_step(self._step_done, timeout, lambda: self.transport.stats.bytes_arriving,
                                      MAX_STEP_EXTENSION * timeout)
            if not arrived and self.settle is not None:
                await self.settle()
            waited = trio.current_time() - start
        missing = self.tracker.missing()
        received = {p: {kind: value} for p, (kind, value) in self.tracker.finish().items()}
        info: Event = {"received": len(received), "missing": missing, "wait_s": waited}
        if received:
            info.update(await self._compute(self.combine, t, q, received))
        return info

    def _wire(self, kind: str, tensor: torch.Tensor) -> Any:
        """The payload array of a tensor the algorithm sends: its floats as they are (no copy), integers
        (an algorithm's int64 ranks, say) in the declared unsigned wire dtype."""
        dtype = self.payloads[kind].dtype
        want = _FLOAT_DTYPES.get(dtype)
        if want is not None and tensor.dtype != want:   # e.g. an attacker's f32 vector, the spec says f16
            tensor = tensor.to(want)
        if tensor.dtype == torch.bfloat16:   # no numpy bf16: its raw bits, as the codec carries them
            return tensor.detach().cpu().view(torch.int16).numpy().view(np.uint16)
        array = tensor.detach().cpu().numpy()
        return array.astype(codec_storage(dtype)) if dtype in INT_DTYPES else array

    def rejections(self) -> dict[str, int]:
        """Everything refused so far, by reason: the transport's, the algorithm's and ours. Safe from
        another thread (a metrics scrape): each live counter is copied with dict(), one step under the GIL."""
        return dict(Counter(dict(self.rejected)) + Counter(dict(self.transport.stats.rejected))
                    + Counter(dict(self.algorithm.counters)))

    def round_info(self, t: int) -> Event:
        """Extra keys for round t's event, asked once when its gossip steps are over (an honest peer
        has none; an attacker says what it crafted)."""
        return {}

    async def prepare_step(self, t: int, q: int, x: torch.Tensor) -> None:
        """Called once per step (t, q), after entering it and before `outgoing` is asked per neighbour,
        with the algorithm's shared vector. An honest peer has nothing to do; an attacker may wait here
        for what it crafts from."""

    def outgoing(self, t: int, q: int, x: torch.Tensor, neighbor: str) -> Mapping[str, torch.Tensor] | torch.Tensor | None:
        """What to send to `neighbor` at step (t, q): {kind: tensor}, a tensor (a "model"), or None
        (nothing). An honest peer sends what its algorithm says; the simulator's attackers override this."""
        return self.algorithm.outgoing(t, q, neighbor)

    def combine(self, t: int, q: int, received: Mapping[str, Mapping[str, torch.Tensor]]) -> Event:
        """Hand what arrived at (t, q) to the algorithm; attackers override this."""
        return dict(self.algorithm.combine(t, q, received))

    async def _receive_loop(self) -> None:
        async for sender, frame in self.transport.receive():
            try:
                if frame.schema != self.schema:
                    raise RemoteProtocolError(Reject.WRONG_SCHEMA, "", sender)
                # the transport checked the payload against our specs; a transport of the application's
                # own may not have: the O(1) part is checked again, as nothing past here may see a
                # vector of another shape
                spec = self.payloads.get(frame.kind)
                if spec is None or (frame.dtype, frame.payload.size) != (spec.dtype, spec.count):
                    payloads.check(frame.kind, frame.dtype, frame.payload, self.payloads, sender)
                self.tracker.receive(sender, frame.round, frame.step, (frame.kind, frame.tensor()))
            except RemoteProtocolError as e:
                self.rejected[e.reason.value] += 1
                log.debug("%s: %s", self.id, e)
                continue
            if self.tracker.complete:
                self._step_done.set()
