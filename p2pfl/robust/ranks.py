"""Rank voting (FRL): aggregate rankings of edges by the sum of their positions.

Theory of operation (Mozaffari, Shejwalkar, Houmansadr, "Every Vote Counts: Ranking-Based Training
of Federated Learning to Resist Poisoning Attacks", USENIX Security 2023, arXiv 2110.04350).
A ranking of a layer of n edges is a permutation of the edge ids 0..n-1 from the least to the most
important (ascending score). Per layer, each voter's position of edge e (0..n-1, the inverse
permutation) is summed over the voters; the edges sorted by that total, ascending, are the voted
ranking. Each voter has exactly one vote per edge, so whatever it sends, it moves any edge's
total by at most n - 1: that bound is the robustness argument. Ties are broken by edge id (a stable
sort), so every peer voting on the same inputs gets the same order.

`scores_in_order(order, sorted_scores)` turns a voted ranking back into scores: edge order[r] gets
the r-th smallest of the layer's initial scores, so the scores are always a permutation of the
initial ones and only their order is learned.

Pure: torch only, no I/O. Rankings are int64 tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def ranking(scores: Tensor) -> Tensor:
    """The edge ids of `scores` (flattened) from the lowest score to the highest (stable)."""
    return torch.argsort(scores.detach().flatten(), stable=True)


def positions(rank: Tensor) -> Tensor:
    """The inverse permutation: position of each edge in `rank` (0 = least important)."""
    pos = torch.empty_like(rank)
    pos[rank] = torch.arange(rank.numel(), dtype=rank.dtype, device=rank.device)
    return pos


def vote_totals(rankings: Sequence[Tensor]) -> Tensor:
    """Per edge, the sum over the voters of its position in their ranking (one layer)."""
    if not rankings:
        raise ValueError("rank vote: needs at least one ranking")
    total = torch.zeros_like(rankings[0])
    for r in rankings:
        if r.shape != total.shape:
            raise ValueError(f"rank vote: rankings of {tuple(r.shape)} and {tuple(total.shape)} edges")
        total += positions(r)
    return total


def rank_vote(own_ranks: Sequence[Tensor], received_ranks: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """The voted ranking of each layer: `own_ranks` is this peer's ranking per layer, `received_ranks`
    one list of per-layer rankings per neighbour. Per layer: sum of positions, stable argsort."""
    out = []
    for layer, own in enumerate(own_ranks):
        votes = [own, *(r[layer] for r in received_ranks)]
        out.append(torch.argsort(vote_totals(votes), stable=True))
    return out


def reversed_vote(rankings: Sequence[Tensor]) -> Tensor:
    """The rank-reversal attack's ranking of one layer: the voted ranking of `rankings`, reversed
    (the edges the voters agree matter most are put last)."""
    return torch.argsort(vote_totals(rankings), descending=True, stable=True)


def scores_in_order(order: Tensor, sorted_scores: Tensor) -> Tensor:
    """Scores for a layer whose edge order[r] gets sorted_scores[r] (the r-th smallest initial score)."""
    out = torch.empty_like(sorted_scores)
    out[order.to(sorted_scores.device)] = sorted_scores
    return out


def footrule(own_ranks: Sequence[Tensor], received_ranks: Sequence[Sequence[Tensor]]) -> float:
    """Mean over the received rankings and the edges of |position here - position there| / n (the
    normalised Spearman footrule, in [0, 1/2]): how far a peer's ranking is from its neighbours'."""
    if not received_ranks:
        return 0.0
    total, edges = 0.0, sum(r.numel() for r in own_ranks)
    for layer, own in enumerate(own_ranks):
        mine, n = positions(own), max(1, own.numel())
        total += sum(float((positions(r[layer]) - mine).abs().sum()) for r in received_ranks) / n
    return total / (len(received_ranks) * max(1, edges))


def is_permutation(values: np.ndarray) -> bool:
    """True when the 1-D integer array holds each of 0..len-1 exactly once."""
    n = values.size
    if n == 0:
        return True
    v = values.astype(np.int64, copy=False)
    if int(v.min()) < 0 or int(v.max()) >= n:
        return False
    return bool(np.bincount(v, minlength=n).max() == 1)
