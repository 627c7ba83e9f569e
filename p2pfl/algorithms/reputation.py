"""Reputation per neighbour (RFFL, Xu & Lyu, arXiv 2011.10464), as a wrapper around any algorithm that
gossips one float vector (the gossip family; a plugin's, if it sends its vector as a payload kind).

Theory of operation: each peer i keeps a reputation r_ij for each current neighbour j. Round t, at
the first gossip step, for every neighbour j that sent its vector x_j:

    g_j   = clip(x_j - s_j, Gamma)          s_j: what j sent the round before (its own change, whatever
                                            the models' disagreement); in round 0, x_i(t-1) (every
                                            model starts from the same seed). g_i likewise for i.
    g_agg = g_i / 2 + sum_j r_ij g_j / (2 sum_j r_ij)
                                            reputation-weighted (round 0: uniform), i's own update half
                                            of it: a peer with a Byzantine majority still measures
                                            against what it knows is honest
    phi_j = cos(g_j, g_agg)
    r_ij <- max(0, alpha r_ij + (1 - alpha) phi_j);   r_i. <- r_i. / sum_j r_ij
    j with r_ij < beta / deg is removed (deg: reputable neighbours at the check); r_i. renormalised.

Gamma (None: scale-free, the norm of i's own change for the scores and the median norm of the
round's updates for what is aggregated) is scale-free by default. What
the inner algorithm aggregates is, as in RFFL, the clipped update: x_i(t-1) + clip(x_j - x_i(t-1)),
only from neighbours not removed and with phi_j >= 0 this round; any robust rule of the inner
algorithm (`aggregator`) then applies to those. These are our choices for a serverless setting
where each peer holds its own model (RFFL scores gradients from one global model; scoring x_j -
x_i(t-1) instead let sign-flipped models look like shrinking updates and score well).

A removed neighbour's frames are no longer aggregated (the inner algorithm never sees them); it is in
`advice().drop` for `removal_rounds` rounds (None: the rest of the run) and the driver unlinks it and
looks for a replacement. A new neighbour (`set_neighbors`) starts at the mean reputation of the
current ones and stays there for `grace_rounds` rounds before its scores move it. From its first
frame we learn only its baseline s_j: that round it is neither scored nor aggregated. In the next
rounds it is scored, and left out of the aggregate where opposed (phi < 0), but cannot lose
reputation: two peers that just linked pull towards each other's models, so each one's change
points against the other's until the link has mixed them (measured in a 4-process ring: the
replacement link, honest on both sides, was removed two rounds after it formed). Grace counts
rounds, not frames: a newcomer that never sends grows up and goes as a silent neighbour does. After
a resume the baselines are gone (not checkpointed): that round nobody is scored.
Because r is normalised and a neighbour is removed only below 1/3 of the mean, at least
one neighbour is always above the threshold: the wrapper never removes all. Keeping the overlay
connected (a minimum degree, replacements) is the driver's job (`p2pfl.sim.rewire`, membership).

An attacker that behaves and then lies: its reputation is an exponential moving average, so good
rounds buy it at most r_ij <= 1; each lying round (phi = -1) subtracts (1 - alpha) (1 + r_ij) before
renormalisation, and with alpha = 0.95 a neighbour at twice the mean falls under the threshold in a
few rounds (tests/algorithms/test_reputation.py computes one case).

Fair rewards (`fair_rewards`): what i sends j is x_i(t-1) + top_{q_j}(x_i - x_i(t-1)), the q_j fraction
of i's update's coordinates largest in magnitude, q_j = r_ij / max_k r_ik; the most reputable
neighbours get the whole vector, the receiver needs no change (it is still a model vector).

Sans-IO like every algorithm; reputations and removals are in `state_dict` (the checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from p2pfl import config
from p2pfl.algorithms.base import Advice, Algorithm, Received, Tensor, Wrapper
from p2pfl.errors import ConfigError


@dataclass(frozen=True)
class ReputationParams:
    """RFFL's parameters (the authors' MNIST defaults for alpha and beta)."""

    alpha: float = 0.95                # EMA weight of the old reputation
    beta: float = 1 / 3                # removal threshold, in units of the mean reputation 1/deg
    # Gamma: norm clip of each update before the cosines; None: the median norm of the round's updates
    # (own included), so that a few huge vectors cannot outweigh the honest ones whatever the model's scale
    gamma: float | None = None
    fair_rewards: bool = False         # send each neighbour only the top q_j of the update
    removal_rounds: int | None = None  # how long a removal lasts (None: the rest of the run)
    min_degree: int = 2                # the driver never unlinks below this unless a replacement links
    grace_rounds: int = 3              # a new neighbour's first scored rounds: its reputation stays at the mean

    def __post_init__(self) -> None:
        if not 0 <= self.alpha < 1:
            raise ConfigError(f"reputation_params.alpha: must be in [0, 1), got {self.alpha}")
        if not 0 <= self.beta < 1:
            raise ConfigError(f"reputation_params.beta: must be in [0, 1), got {self.beta}")
        if self.gamma is not None and not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"reputation_params.gamma: must be a finite number > 0, got {self.gamma}")
        if self.removal_rounds is not None and self.removal_rounds < 1:
            raise ConfigError(f"reputation_params.removal_rounds: must be >= 1 (or null: the run), "
                              f"got {self.removal_rounds}")
        if self.min_degree < 1:
            raise ConfigError(f"reputation_params.min_degree: must be >= 1, got {self.min_degree}")
        if self.grace_rounds < 1:
            raise ConfigError(f"reputation_params.grace_rounds: must be >= 1, got {self.grace_rounds}")


def params(values: Mapping[str, Any] | None) -> ReputationParams:
    """ReputationParams from a table; ConfigError naming `reputation_params.KEY` if bad."""
    try:
        return config.build(ReputationParams, dict(values or {}), "reputation_params")
    except ConfigError as e:
        text = str(e)
        raise ConfigError(text if text.startswith("reputation_params") else f"reputation_params.{text}") from None


def clip(v: Tensor, gamma: float) -> Tensor:
    norm = float(torch.linalg.vector_norm(v))
    return v * (gamma / norm) if norm > gamma > 0 else v


def cosine(a: Tensor, b: Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    return 0.0 if na == 0 or nb == 0 else float(torch.dot(a, b)) / (na * nb)


def update(r: Mapping[str, float], phi: Mapping[str, float], alpha: float, beta: float,
           keep: frozenset[str] = frozenset()) -> tuple[dict[str, float], set[str]]:
    """One RFFL step over the neighbours in `phi` (those that sent): EMA, clamp at 0, normalise, remove
    below beta / deg (except those in `keep`), renormalise. Neighbours in r that did not send keep
    their value (then normalised with the rest). Returns (new reputations of the kept, removed)."""
    new = {j: max(0.0, alpha * r[j] + (1 - alpha) * phi[j]) if j in phi else r[j] for j in r}
    new = _normalised(new)
    removed = {j for j, v in new.items() if v < beta / len(new) and j not in keep}
    if len(removed) == len(new):   # all zero: nothing to tell them apart
        removed = set()
    return _normalised({j: v for j, v in new.items() if j not in removed}), removed


def _normalised(r: Mapping[str, float]) -> dict[str, float]:
    total = sum(r.values())
    if total <= 0:
        return {j: 1.0 / len(r) for j in r} if r else {}
    return {j: v / total for j, v in r.items()}


def _median_norm(vectors: list[Tensor]) -> float:
    return float(torch.stack([torch.linalg.vector_norm(v) for v in vectors]).median())


def top_fraction(update_: Tensor, q: float) -> Tensor:
    """The update with all but its ceil(q d) largest-magnitude coordinates zeroed (q >= 1: unchanged)."""
    if q >= 1:
        return update_
    k = max(0, math.ceil(q * update_.numel()))
    out = torch.zeros_like(update_)
    if k:
        idx = torch.topk(update_.abs(), k, sorted=False).indices
        out[idx] = update_[idx]
    return out


class Reputation(Wrapper):
    """RFFL reputations around `inner` (see the module docstring)."""

    def __init__(self, inner: Algorithm, p: ReputationParams) -> None:
        super().__init__(inner, p)
        self.p = p
        size = inner.vector().numel()
        kinds = [k for k, s in inner.payloads().items() if s.dtype == "f32" and s.count == size]
        if not kinds:
            raise ConfigError("reputation: the algorithm sends no float vector of its state's size; "
                              "reputation wraps the gossip family")
        self.kind = kinds[0]
        self.r: dict[str, float] = {j: 1.0 / len(self.neighbors) for j in self.neighbors} if self.neighbors else {}
        self.removed: dict[str, int] = {}   # neighbour -> round its removal ends (2**62: the run)
        self.round = 0
        self.x_prev = inner.vector().clone()
        self.first = True                   # round 0 (of this run): uniform weights
        self.opposed: set[str] = set()      # this round: phi < 0 or no baseline yet, left out of the aggregate
        self.clipped: dict[str, Tensor] = {}  # this round's clipped updates g_j
        self.last_sent: dict[str, Tensor] = {}  # each neighbour's (and our own) vector of the last round
        self.joined: dict[str, int] = {}    # a neighbour that joined mid-run -> our round when it joined

    def local_update(self, t: int) -> Mapping[str, Any]:
        self.round = t
        for j in [j for j, until in self.removed.items() if until <= t]:
            del self.removed[j]   # its time is up: if it links again it starts as a new neighbour
        self.x_prev = self.inner.vector().clone()
        return self.inner.local_update(t)

    def outgoing(self, t: int, q: int, neighbor: str) -> Mapping[str, Tensor] | None:
        out = self.inner.outgoing(t, q, neighbor)
        if out is None or not self.p.fair_rewards or neighbor not in self.r or self.kind not in out:
            return out
        share = self.r[neighbor] / max(self.r.values())
        if share >= 1:
            return out
        x = out[self.kind]
        return {**out, self.kind: self.x_prev + top_fraction(x - self.x_prev, share)}

    def combine(self, t: int, q: int, received: Received) -> Mapping[str, Any]:
        kept = {j: v for j, v in received.items() if j not in self.removed}
        if q == 0:
            scored = {j: v[self.kind] for j, v in kept.items() if j in self.r}
            phi = self._score(scored)
            # removed now, opposed to the reputation-weighted update this round, or not scored (a
            # new neighbour's first frame): not aggregated
            self.opposed = {j for j, v in phi.items() if v < 0} | (scored.keys() - phi.keys())
            # as in RFFL, what is aggregated is the clipped update: x_i(t-1) + g_j
            kept = {j: {**v, self.kind: self.x_prev + self.clipped[j]} if j in self.clipped else v
                    for j, v in kept.items()}
        kept = {j: v for j, v in kept.items() if j not in self.removed and j not in self.opposed}
        return self.inner.combine(t, q, kept) if kept else {}

    def _score(self, got: Mapping[str, Tensor]) -> dict[str, float]:
        """Score this round's updates (see the module docstring); returns phi per neighbour."""
        self.clipped = {}
        if not got:
            return {}
        got = {j: v.to(self.x_prev.device) for j, v in got.items()}
        raw = {j: v - self.x_prev for j, v in got.items()}
        own_x = self.inner.vector()
        gamma = self.p.gamma if self.p.gamma is not None else _median_norm([own_x - self.x_prev, *raw.values()])
        self.clipped = {j: clip(v, gamma) for j, v in raw.items()}   # what is aggregated
        # what is scored: each one's change since what it sent last round (its own update, whatever the
        # models' disagreement); in round 0 the change from our x_i(t-1), the shared start. A later
        # first-time sender has no baseline yet: not scored this round
        change = {j: v - self.last_sent.get(j, self.x_prev) for j, v in got.items()
                  if self.first or j in self.last_sent}
        own = own_x - self.last_sent.get(self.ctx.peer_id, self.x_prev)
        self.last_sent = {**{j: v for j, v in self.last_sent.items() if j in self.r},   # silent this round
                          **{j: v.clone() for j, v in got.items()}, self.ctx.peer_id: own_x.clone()}
        if not change:
            self.first = False
            return {}
        # scored at most as long as our own change: however many large vectors arrive, own counts fully
        own_norm = float(torch.linalg.vector_norm(own))
        gamma = self.p.gamma if self.p.gamma is not None else own_norm if own_norm > 0 else \
            _median_norm([own, *change.values()])
        g = {j: clip(v, gamma) for j, v in change.items()}
        own = clip(own, gamma)
        weights = {j: 1.0 for j in g} if self.first else {j: self.r[j] for j in g}
        total = 2 * sum(weights.values())   # own update: half the reference
        g_agg = own * 0.5
        for j, v in g.items():
            g_agg = g_agg + v * (weights[j] / total)
        phi = {j: cosine(v, g_agg) for j, v in g.items()}
        self.first = False
        # young: its first round (the baseline), then grace_rounds more, whether it sent or not (a
        # silent newcomer grows up too, and is then removed as a silent neighbour is)
        young = frozenset(j for j, t in self.joined.items() if j in self.r and self.round - t <= self.p.grace_rounds + 1)
        self.r, removed = update(self.r, {j: v for j, v in phi.items() if j not in young}, self.p.alpha,
                                 self.p.beta, young)
        grown = [v for j, v in self.r.items() if j not in young]
        if young and grown:   # in grace a neighbour stays at the mean of the others
            mean = sum(grown) / len(grown)
            self.r = _normalised({j: mean if j in young else v for j, v in self.r.items()})
        until = 2**62 if self.p.removal_rounds is None else self.round + 1 + self.p.removal_rounds
        for j in removed:
            self.removed[j] = until
            self.counters["reputation_removed"] += 1
        return phi

    def set_neighbors(self, weights: Mapping[str, float]) -> None:
        super().set_neighbors(weights)
        kept = {j: v for j, v in self.r.items() if j in weights}
        # one that comes back is new again; the neighbours of our first round are not new
        self.joined = {j: t for j, t in self.joined.items() if j in weights}
        if not self.first:
            self.joined.update({j: self.round for j in weights if j not in self.r and j not in self.joined})
        mean = sum(kept.values()) / len(kept) if kept else 1.0
        self.r = _normalised({j: kept.get(j, mean) for j in weights if j not in self.removed})

    def advice(self) -> Advice:
        return Advice(scores=dict(self.r), drop=frozenset(self.removed))

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "reputation": dict(self.r), "removed": dict(self.removed),
                "first": self.first}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        r, removed = state["reputation"], state["removed"]
        if not all(isinstance(k, str) and isinstance(v, float) and 0 <= v <= 1 for k, v in r.items()):
            raise ValueError("reputation: values must be floats in [0, 1] keyed by peer ID")
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in removed.items()):
            raise ValueError("reputation: removals must be rounds keyed by peer ID")
        self.inner.load_state_dict(state["inner"])
        self.r, self.removed, self.first = dict(r), dict(removed), bool(state["first"])
