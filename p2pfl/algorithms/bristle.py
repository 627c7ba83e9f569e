"""Bristle (Verbraeken, de Vos, Pouwelse, arXiv 2110.11006): head-only learning on a frozen pre-trained
backbone, with a distance prioritizer and a per-class performance integrator.

Theory of operation
-------------------
Every layer but the output layer is a frozen pre-trained backbone (`backbone` setting,
`p2pfl.learn.backbone`), so the model's trainable parameters, and thus what travels, are the head
alone: W (C x D) and b (C), class c's parameters being row c of [W | b]. Round t: train the head on
the local data (minus the local test split), then per gossip step send the head and combine:

Prioritizer. d_j = ||h_j - h_own||_2 for every head that arrived. When fewer than `n_exploit` arrived,
the most recently received heads of other peers (`history`: at most one per peer, the newest, and at
most `history` of them; the oldest is dropped) top the candidates up to `n_exploit`. The `n_exploit`
closest are kept, and `n_explore` of the rest are drawn at random (this peer's seeded generator).

Integrator. Its test samples are `test_per_class` of each class (at most half of a class's samples),
drawn with the peer's seed from the backbone's public part when the driver hands it one
(`Context.reference_data`: a built-in dataset; every class is then known, so a peer learns the
classes it lacks from neighbours who test better on them), else held out from the peer's own data
(`test_split = "local"`, the authors' choice, which leaves the classes a peer lacks "foreign").
The backbone's features of that split are computed once; scoring a head is one matmul and an
argmax. With r the per-class recall of a head on the split, for each known class c (present in the
split) and candidate j, in peer-ID order:
    diff  = 10 |r_own,c - r_jc|
    pen   = sum over the candidates k before j of max(0, 2 (r_own,c - r_kc))   (sequential attacks)
    score = diff^(3 + r_own,c)  if r_jc > r_own,c,  else  -diff^(4 + r_own,c) (1 + pen)
    cert_j = max(0, mean_c r_jc - std_c r_jc)
    w_jc  = max(0, 10 sigmoid(max(-100, score) / 100) - 4) cert_j          (in [0, 6] cert_j)
    row_c = (h_own,c + sum_j w_jc h_jc) / (1 + sum_j w_jc)
Foreign classes (absent from the split, so not measurable) use one weight per candidate from its
summed unbounded scores: W_j = max(0, 10 sigmoid(sum_c score_jc / 100) - 4) cert_j. A head that hurts
any known class gets a steeply negative score and weight 0; one equal to ours gets cert_j.
Constants are the authors' (Bristle.kt, jverbraeken/trustchain-superapp), exposed as parameters.
Their peers also learn, by private set intersection, how many classes each neighbour shares, and
judge a head on that many of its best classes only; without that exchange every known class is
judged (their default for an unknown count), or, with `overlap_recall = t`, the known classes where
the head's recall is >= t (our stand-in for the shared count: it lets peers whose classes barely
overlap learn each other's foreign classes, at the cost of judging a head on fewer classes).
Deviation: their code ranks history models but then drops them; here they are candidates, as the
paper's text says (a peer with few neighbours still compares enough heads).

Each step's round-event keys: bristle_exploit, bristle_explore, bristle_from_history (candidates
that came from the history), bristle_zero_weight (candidates given weight 0 for every class).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from p2pfl import algorithms
from p2pfl.algorithms.base import Context, Received, Tensor
from p2pfl.algorithms.gossip import Gossip
from p2pfl.errors import ConfigError
from p2pfl.learn.backbone import head_of


@dataclass(frozen=True)
class BristleParams:
    n_exploit: int = 20          # NUM_MODELS_EXPLOITATION (also the candidate count history tops up to)
    n_explore: int = 5           # NUM_MODELS_EXPLORATION
    history: int = 20            # recently received heads kept, at most one per peer
    test_per_class: int = 10     # local test samples per held class (TEST_SET_SIZE), at most half of it
    diff_scale: float = 10.0
    exp_better: float = 3.0      # score = diff^(exp_better + r_own) when the candidate is better
    exp_worse: float = 4.0       # -diff^(exp_worse + r_own) (1 + pen) otherwise
    penalty: float = 2.0         # sequential-attack penalty factor
    score_bound: float = -100.0
    temperature: float = 100.0   # sigmoid(score / temperature)
    weight_scale: float = 10.0   # w = max(0, weight_scale sigmoid(.) - weight_offset) cert
    weight_offset: float = 4.0
    # t: head j is scored on the known classes where its recall is >= t only, a stand-in for the
    # class-overlap count the authors' peers exchange (PSI-CA; not implemented here). None: every known
    # class is scored for every head (the authors' default for a peer whose class count is unknown)
    overlap_recall: float | None = 0.5
    # where the integrator's test samples come from: "public" (the backbone's public part, every
    # class, never a peer's own data), "local" (held out from the peer's own data, the authors'
    # choice), or "auto" (public when the driver has it: a built-in dataset with a backbone)
    test_split: str = "auto"

    def __post_init__(self) -> None:
        if self.test_split not in ("auto", "public", "local"):
            raise ValueError(f"test_split must be auto, public or local, got {self.test_split!r}")
        for key in ("n_exploit", "test_per_class"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("n_explore", "history"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("n_exploit", "n_explore", "history", "test_per_class"):
            if getattr(self, key) > 100_000:
                raise ValueError(f"{key} must be <= 100000, got {getattr(self, key)}")
        for key in ("diff_scale", "penalty", "temperature", "weight_scale", "weight_offset"):
            if not 0 < getattr(self, key) < math.inf:
                raise ValueError(f"{key} must be > 0 and finite, got {getattr(self, key)}")
        for key in ("exp_better", "exp_worse"):
            if not 0 <= getattr(self, key) <= 16:
                raise ValueError(f"{key} must be in [0, 16], got {getattr(self, key)}")
        if self.overlap_recall is not None and not 0 < self.overlap_recall <= 1:
            raise ValueError(f"overlap_recall must be in (0, 1] or unset, got {self.overlap_recall}")
        if not -math.inf < self.score_bound < 0:
            raise ValueError(f"score_bound must be < 0 and finite, got {self.score_bound}")


# ------------------------------------------------------------------------------- the pure parts


def prioritize(own: Tensor, received: Mapping[str, Tensor], history: Mapping[str, Tensor], p: BristleParams,
               generator: torch.Generator) -> tuple[list[str], list[str], dict[str, Tensor]]:
    """(exploit IDs, explore IDs, every candidate's head). `history` is newest last; only peers that
    sent nothing now top the candidates up to n_exploit."""
    heads = dict(received)
    for peer in reversed(list(history)):
        if len(heads) >= p.n_exploit:
            break
        heads.setdefault(peer, history[peer])
    if not heads:
        return [], [], heads
    ids = sorted(heads)
    distances = torch.stack([torch.dist(heads[j].to(own.device, own.dtype), own) for j in ids]).tolist()
    ranked = [j for _, j in sorted(zip(distances, ids))]
    rest = ranked[p.n_exploit:]
    pick = torch.randperm(len(rest), generator=generator)[:p.n_explore].tolist()
    return ranked[:p.n_exploit], sorted(rest[i] for i in pick), heads


def recalls(heads: Tensor, features: Tensor, labels: Tensor, classes: Tensor) -> Tensor:
    """Per-class recall (m, K) of heads (m, C, D+1) on features (n, D+1) with labels (n,), for the
    K `classes` present in labels."""
    predicted = torch.einsum("nd,mcd->mnc", features, heads).argmax(-1)      # (m, n)
    onehot = (labels[:, None] == classes[None, :]).to(features.dtype)          # (n, K)
    correct = (predicted == labels[None, :]).to(features.dtype)                # (m, n)
    return (correct @ onehot) / onehot.sum(0)


def integrate(own: Tensor, heads: Tensor, own_recall: Tensor, peer_recall: Tensor, known: Tensor,
              p: BristleParams) -> tuple[Tensor, Tensor, Tensor]:
    """(new head (C, D+1), per-class weights (m, K) of the known classes, per-peer weights (m,) of the
    foreign ones). `heads` (m, C, D+1) and `peer_recall` (m, K) are in peer-ID order: the sequential
    penalty of candidate j sums over the candidates before it."""
    r0, r = own_recall.double(), peer_recall.double()
    # the classes each head is judged on: all known ones, or (overlap_recall) those it does well on
    selected = torch.ones_like(r, dtype=torch.bool) if p.overlap_recall is None else r >= p.overlap_recall
    diff = p.diff_scale * (r - r0).abs()
    contrib = (p.penalty * (r0 - r)).clamp(min=0)
    penalty = contrib.cumsum(0) - contrib                       # over the candidates before j
    score = torch.where(r > r0, diff ** (p.exp_better + r0), -(diff ** (p.exp_worse + r0)) * (1 + penalty))
    count = selected.sum(1).clamp(min=1)
    mean = (r * selected).sum(1) / count
    std = (((r - mean[:, None]) ** 2) * selected).sum(1).div(count).sqrt()
    cert = torch.where(selected.any(1), (mean - std).clamp(min=0), torch.zeros_like(mean))

    def weight(s: Tensor) -> Tensor:
        return (p.weight_scale * torch.sigmoid(s / p.temperature) - p.weight_offset).clamp(min=0)

    w_known = weight(score.clamp(min=p.score_bound)) * cert[:, None] * selected     # (m, K)
    w_foreign = weight((score * selected).sum(1)) * cert                          # (m,)
    w = w_foreign[:, None].expand(-1, own.shape[0]).clone()                       # (m, C): foreign by default
    w[:, known] = w_known
    w = w.to(own.dtype)
    new = (own + torch.einsum("mc,mcd->cd", w, heads)) / (1 + w.sum(0))[:, None]
    return new, w_known, w_foreign


# ---------------------------------------------------------------------------------- the algorithm


@algorithms.register("bristle", params=BristleParams,
                     summary="frozen backbone, head-only gossip; distance prioritizer, per-class integrator (Bristle)")
class Bristle(Gossip):
    """Bristle on a model whose only trainable parameters are its output layer."""

    def __init__(self, ctx: Context, params: BristleParams) -> None:
        _, self.head = head_of(ctx.model)
        trainable = [p for p in ctx.model.parameters() if p.requires_grad]
        if len(trainable) != 2 or any(p is not q for p, q in zip(trainable, (self.head.weight, self.head.bias))):
            raise ConfigError("algorithm bristle: the model must train its output layer only (weight and bias); "
                              "set `backbone` to a pre-trained file (`p2pfl backbone pretrain`)")
        if not isinstance(ctx.train_data, tuple):
            raise ConfigError("algorithm bristle: needs the training data as (x, y) tensors, not a DataLoader "
                              "(it holds out a per-class test split)")
        x, y = ctx.train_data
        generator = torch.Generator().manual_seed(ctx.seed ^ 0xB415)
        source = params.test_split
        if source == "auto":
            source = "public" if ctx.reference_data is not None else "local"
        if source == "public":
            if ctx.reference_data is None:
                raise ConfigError("algorithm_params.test_split: 'public' needs the backbone's public part, which "
                                  "only a built-in dataset has; use 'local'")
            rx, ry = ctx.reference_data
            test = _test_split(ry, params.test_per_class, generator)
            test_x, test_y = rx[test.to(rx.device)].to(x.device), ry[test.to(ry.device)].to(y.device)
            super().__init__(ctx, params)
        else:
            test = _test_split(y, params.test_per_class, generator)
            train = torch.ones(len(y), dtype=torch.bool, device=y.device)
            train[test.to(y.device)] = False
            test_x, test_y = x[test.to(x.device)], y[test.to(y.device)]
            super().__init__(Context(**{**vars(ctx), "train_data": (x[train], y[train])}), params)
        self.params: BristleParams = params
        self.num_classes, self.width = self.head.weight.shape
        self.explore_rng = torch.Generator().manual_seed(ctx.seed ^ 0xE4B1)
        self.history: OrderedDict[str, Tensor] = OrderedDict()
        # the frozen backbone's features of the test split, once: a forward hook reads the head's input
        captured: list[Tensor] = []
        hook = self.head.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
        was_training = ctx.model.training
        try:
            ctx.model.train(False)
            with torch.no_grad():
                ctx.model(test_x)
        finally:
            hook.remove()
            ctx.model.train(was_training)
        features = captured[0].reshape(len(test_y), -1)
        self.features = torch.cat([features, features.new_ones(len(test_y), 1)], 1)   # (n, D+1): bias column
        self.labels = test_y.to(features.device)
        self.known = torch.unique(self.labels)

    def _as_rows(self, v: Tensor) -> Tensor:
        """A flat head (weight then bias, the layout order) as its (C, D+1) class rows."""
        c, d = self.num_classes, self.width
        return torch.cat([v[:c * d].reshape(c, d), v[c * d:].reshape(c, 1)], 1)

    def _as_flat(self, rows: Tensor) -> Tensor:
        return torch.cat([rows[:, :-1].reshape(-1), rows[:, -1]])

    def combine(self, t: int, q: int, received: Received) -> Mapping[str, Any]:
        heads = {peer: r["model"].to(self.x.device) for peer, r in received.items()}
        exploit, explore, candidates = prioritize(self.x, heads, self.history, self.params, self.explore_rng)
        for peer, h in heads.items():   # newest last; the oldest goes beyond the bound
            self.history.pop(peer, None)
            self.history[peer] = h
        while len(self.history) > self.params.history:
            self.history.popitem(last=False)
        chosen = sorted(exploit + explore)
        info = {"bristle_exploit": len(exploit), "bristle_explore": len(explore),
                "bristle_from_history": sum(1 for j in chosen if j not in received), "bristle_zero_weight": 0}
        if not chosen:
            return info
        own = self._as_rows(self.x)
        stacked = torch.stack([self._as_rows(candidates[j]) for j in chosen])
        scored = recalls(torch.cat([own[None], stacked]), self.features, self.labels, self.known)
        new, w_known, w_foreign = integrate(own, stacked, scored[0], scored[1:], self.known, self.params)
        info["bristle_zero_weight"] = int(((w_known.sum(1) == 0) & (w_foreign == 0)).sum())
        x = self._as_flat(new)
        if bool(torch.isfinite(x).all()):
            self.x = x
        else:   # never adopted (cannot happen with finite inputs; kept as the other rules do)
            self.counters["non_finite_aggregate"] += 1
        return info


def _test_split(y: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Indices of min(per_class, n_c // 2) random samples of each class c held (sorted)."""
    picked = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten().cpu()
        take = min(per_class, len(idx) // 2)
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:take]])
    return torch.sort(torch.cat(picked)).values if picked else torch.zeros(0, dtype=torch.long)
