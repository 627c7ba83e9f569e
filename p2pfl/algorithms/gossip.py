"""DFedAvg, DFedAvgM and DFedSAM: local SGD or SAM, then gossip the whole model and combine it with a
rule of `p2pfl.robust` (Metropolis-Hastings `mixing` by default). Q > 1 gossip steps is -MGS.

Theory of operation: the model's shared parameters live in one contiguous buffer (`FlatParameters`),
x_i is a copy of it. Round t: `local_update` runs K steps of SGD/SAM (`LocalTrainer`) and takes x_i
from the buffer; each step q sends x_i to every neighbour and replaces it by the rule's result over
x_i and what arrived; `end_round` writes x_i back into the model. With `mixing`,
x_i <- W_ii x_i + sum_j W_ij x_j, a missing neighbour's weight staying with x_i so the row still sums
to 1; any other rule gets x_i and the stacked received vectors.

Never adopted: a local update that is not finite (the model goes back to x_i of the last round and
the optimizer's momentum, which holds the same NaNs, is cleared: `non_finite_update`) and a rule's
result that is not finite (finite inputs near 3e38 overflow median and trimmed mean; the step keeps
x_i: `non_finite_aggregate`). A rule that has too few inputs this step keeps x_i (`too_few_inputs`).

Wire dtype (`algorithm_params.wire_dtype`, opt-in): x_i travels as f32 by default; "f16" or "bf16"
halve the bytes on the wire (for slow or lossy links, docs/wan.md). Only what is sent is rounded:
x_i itself and every combination stay f32, and what arrives is widened to f32 before the rule, so
the rounding error does not accumulate over rounds beyond one rounding of each neighbour's vector
per step (f16: relative 2^-11, bf16: 2^-8). Every peer of a federation must use the same value (it
is part of the settings their hellos compare).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from p2pfl.algorithms.base import Algorithm, Context, Received, Tensor
from p2pfl.errors import ConfigError
from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.learn.models import FlatParameters, ParamLayout
from p2pfl.learn.train import LocalTrainer, unpack
from p2pfl.robust import RULES, aggregate

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GossipParams:
    wire_dtype: str = "f32"    # what x_i is sent as: f32, or f16/bf16 for half the bytes

    def __post_init__(self) -> None:
        if self.wire_dtype not in _TORCH_DTYPES:
            raise ValueError(f"wire_dtype: unknown value {self.wire_dtype!r}; allowed: {', '.join(_TORCH_DTYPES)}")


class Gossip(Algorithm):
    def __init__(self, ctx: Context, params: Any = None) -> None:
        self._shared_state(ctx, params)   # before the optimizer: it must see the re-homed params
        self.trainer = LocalTrainer(ctx.model, *unpack(ctx.train_data), ctx.train,
                                    torch.Generator().manual_seed(ctx.seed))

    def _shared_state(self, ctx: Context, params: Any) -> None:
        Algorithm.__init__(self, ctx, params)
        self.wire_dtype = params.wire_dtype if isinstance(params, GossipParams) else "f32"
        self._sent: tuple[int, int, Tensor] | None = None   # (t, q, x_i as sent): one conversion per step
        self.layout = ParamLayout.of(ctx.model)
        self.flat = FlatParameters(ctx.model)
        self._bucket_generator = torch.Generator().manual_seed(ctx.seed + 1)
        self.x = self.flat.get()                # x_i: the shared parameters

    def payloads(self) -> Mapping[str, PayloadSpec]:
        return {"model": PayloadSpec(self.wire_dtype, self.layout.size, self.ctx.gossip.max_abs_weight)}

    def local_update(self, t: int) -> Mapping[str, Any]:
        stats = self.trainer.train_round(t)
        x = self.flat.get()
        if not bool(torch.isfinite(x).all()):
            self.counters["non_finite_update"] += 1
            log.warning("%s: round %d: local training produced NaN/Inf; keeping the previous model",
                        self.ctx.peer_id, t)
            self.flat.set(self.x)
            self.trainer.optimizer.state.clear()
            x = self.flat.get()
        self.x = x
        return {"train_loss": stats.loss, "local_steps": stats.steps}

    def outgoing(self, t: int, q: int, neighbor: str) -> Mapping[str, Tensor] | None:
        if self.wire_dtype == "f32":
            return {"model": self.x}
        if self._sent is None or self._sent[:2] != (t, q):   # the same tensor for every neighbour: encoded once
            self._sent = (t, q, self.x.to(_TORCH_DTYPES[self.wire_dtype]))
        return {"model": self._sent[2]}

    def combine(self, t: int, q: int, received: Received) -> Mapping[str, Any]:
        if not received:
            return {}
        x, distance = self.aggregate(self.x, {p: r["model"].to(self.x.dtype) for p, r in received.items()}, t)
        self.x = x
        return {"neighbor_distance": distance}

    def end_round(self, t: int) -> None:
        self.flat.set(self.x)

    def model_loaded(self) -> None:
        self.x = self.flat.get()

    def vector(self) -> Tensor:
        return self.x

    def aggregate(self, own: Tensor, received: Mapping[str, Tensor], t: int) -> tuple[Tensor, float]:
        """(rule(own, received), squared distance of own to the neighbours' mean: a real peer's view of
        consensus); own is kept when the result is not finite."""
        x, distance = self._rule(own, received, t)
        if x is not own and not bool(torch.isfinite(x).all()):
            self.counters["non_finite_aggregate"] += 1
            log.warning("%s: round %d: the aggregate is not finite; keeping own vector", self.ctx.peer_id, t)
            return own, distance
        return x, distance

    def _rule(self, own: Tensor, received: Mapping[str, Tensor], t: int) -> tuple[Tensor, float]:
        cfg = self.ctx.gossip
        if cfg.aggregator == "mixing":
            # accumulated in place: cheaper than stacking for the few neighbours of a sparse overlay
            total, mixed = torch.zeros_like(own), own * (1.0 - sum(self.neighbors[p] for p in received))
            for p, v in received.items():
                v = v.to(own.device)  # frames arrive on the CPU
                total.add_(v)
                mixed.add_(v, alpha=self.neighbors[p])
            return mixed, float(torch.dist(own, total.div_(len(received)))) ** 2
        stacked = torch.stack(list(received.values())).to(own.device)  # (m, d)
        distance = float(torch.dist(own, stacked.mean(0))) ** 2
        try:
            params = cfg.aggregator_params
            if "bucket_size" in params:   # bucketing shuffles with this peer's own seeded generator
                return aggregate(cfg.aggregator, own, stacked, f=cfg.f, generator=self._bucket_generator,
                                 **params).vector, distance
            # the rule alone: aggregate() would also compute per-input weights, which costs 2x for sorting rules
            return RULES[cfg.aggregator](own, stacked, f=cfg.f, **params), distance
        except ConfigError as e:   # too few inputs arrived for the rule this step: keep our own vector
            self.counters["too_few_inputs"] += 1
            log.warning("%s: round %d: %s; keeping own vector", self.ctx.peer_id, t, e)
            return own, distance


class ExternalUpdate(Gossip):
    """The gossip of `Gossip` without its local training: the application trained the model in its
    own loop (`p2pfl.GossipAverager`), and `local_update` takes x_i from the model as it is. A model
    that is not finite is not sent: x_i stays the last one (`non_finite_update`)."""

    def __init__(self, ctx: Context, params: Any = None) -> None:
        self._shared_state(ctx, params)   # no LocalTrainer: there is nothing to train on

    def local_update(self, t: int) -> Mapping[str, Any]:
        x = self.flat.get()
        if bool(torch.isfinite(x).all()):
            self.x = x
        else:
            self.counters["non_finite_update"] += 1
            log.warning("%s: round %d: the model is not finite; gossiping the previous one", self.ctx.peer_id, t)
        return {}
