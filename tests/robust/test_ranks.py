"""The rank vote (FRL): hand-computed cases and properties over random rankings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.robust import rank_vote
from p2pfl.robust.ranks import (
    footrule,
    is_permutation,
    positions,
    ranking,
    reversed_vote,
    scores_in_order,
    vote_totals,
)


def t(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


def test_the_vote_by_hand():
    # layer 0, three voters. own [2, 0, 1]: edge 2 least important -> positions [1, 2, 0];
    # [2, 1, 0] -> [2, 1, 0]; [0, 2, 1] -> [0, 2, 1]. Totals [3, 5, 1]: order 2, 0, 1.
    # layer 1, [1, 0] -> positions [1, 0] and [0, 1] -> [0, 1]: totals [1, 1], a tie: edge id order.
    own = [t(2, 0, 1), t(1, 0)]
    received = [[t(2, 1, 0), t(0, 1)], [t(0, 2, 1), t(0, 1)]]
    assert vote_totals([own[0], *(r[0] for r in received)]).tolist() == [3, 5, 1]
    order = rank_vote(own, received)
    assert [o.tolist() for o in order] == [[2, 0, 1], [0, 1]]
    # the layer's initial scores, sorted, assigned in that order: edge 2 gets the smallest
    assert scores_in_order(order[0], torch.tensor([-0.5, 0.1, 0.3])).tolist() == pytest.approx([0.1, 0.3, -0.5])
    # rank reversal puts the voted order backwards
    assert reversed_vote([own[0], received[0][0], received[1][0]]).tolist() == [1, 0, 2]
    # footrule: [1, 2, 0] vs [2, 1, 0] differ by 1 + 1 + 0 over 3 edges; vs [0, 2, 1] by 1 + 0 + 1;
    # layer 1: [1, 0] vs [0, 1] twice, 1 + 1 over 2 edges. Mean over 2 neighbours and 5 edges
    assert footrule(own, received) == pytest.approx((2 / 3 + 2 / 3 + 2 / 2 + 2 / 2) / (2 * 5))
    assert footrule(own, [own]) == 0.0
    # alone, a peer keeps its own ranking
    assert [o.tolist() for o in rank_vote(own, [])] == [[2, 0, 1], [1, 0]]


def test_a_ranking_is_ascending_by_score_and_positions_invert_it():
    r = ranking(torch.tensor([0.3, -1.0, 0.0, 2.0]))
    assert r.tolist() == [1, 2, 0, 3] and positions(r).tolist() == [2, 0, 1, 3]


def test_rankings_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="rankings of"):
        vote_totals([t(0, 1), t(0, 1, 2)])
    with pytest.raises(ValueError, match="at least one"):
        vote_totals([])


@st.composite
def votes(draw, max_voters: int = 8):
    n = draw(st.integers(1, 24))
    voters = draw(st.integers(1, max_voters))
    seeds = draw(st.lists(st.integers(0, 2**31), min_size=voters + 1, max_size=voters + 1))
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return n, perms[:-1], perms[-1]


@settings(max_examples=200, deadline=None)
@given(votes())
def test_the_vote_is_a_permutation_and_one_voter_moves_a_total_by_at_most_n_minus_1(case):
    n, rankings, other = case
    order = rank_vote([rankings[0]], [[r] for r in rankings[1:]])[0]
    assert sorted(order.tolist()) == list(range(n))
    # one voter replaced by any other ranking: every edge's total moves by at most n - 1
    before = vote_totals(rankings)
    after = vote_totals([other, *rankings[1:]])
    assert int((after - before).abs().max()) <= n - 1
    # the voted order sorts the totals
    assert torch.all(before[order][1:] >= before[order][:-1])


@settings(max_examples=100, deadline=None)
@given(votes())
def test_unanimous_voters_get_their_ranking_and_scores_round_trip(case):
    n, rankings, _ = case
    r = rankings[0]
    assert torch.equal(rank_vote([r], [[r]] * (len(rankings) - 1))[0], r)
    assert torch.equal(reversed_vote([r] * len(rankings)), r.flip(0))
    sorted_scores = torch.arange(n, dtype=torch.float32) * 0.5 - 3     # distinct, ascending
    assert torch.equal(ranking(scores_in_order(r, sorted_scores)), r)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=30))
def test_is_permutation_matches_its_definition(values):
    a = np.array(values, dtype=np.uint16)
    assert is_permutation(a) == (sorted(values) == list(range(len(values))))
    assert is_permutation(np.random.default_rng(len(values)).permutation(len(values)).astype(np.uint32))
