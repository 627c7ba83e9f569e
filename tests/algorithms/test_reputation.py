"""The RFFL reputation wrapper: hand-computed updates, removal, new neighbours, fair rewards, state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.algorithms import Context, GossipConfig
from p2pfl.algorithms.gossip import Gossip
from p2pfl.algorithms.reputation import Reputation, ReputationParams, clip, params, top_fraction, update
from p2pfl.errors import ConfigError
from p2pfl.learn.train import TrainConfig
from p2pfl.testing.transports import tiny_model


def wrapped(neighbors: list[str], **kw: object) -> Reputation:
    model = tiny_model()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1))
    ctx = Context("me", model, (x, y), TrainConfig(lr=0.1, local_steps=1, batch_size=8), GossipConfig(),
                  {n: 1.0 / (len(neighbors) + 1) for n in neighbors})
    return Reputation(Gossip(ctx), ReputationParams(**kw))  # type: ignore[arg-type]


def test_update_by_hand() -> None:
    # a: 0.5*0.5 + 0.5*1 = 0.75; b: 0.5*0.25 + 0.5 = 0.625; c: max(0, 0.125 - 0.5) = 0
    # normalised over 1.375: a = 6/11, b = 5/11, c = 0 < (1/3)/3: removed; renormalised: unchanged
    r, removed = update({"a": 0.5, "b": 0.25, "c": 0.25}, {"a": 1.0, "b": 1.0, "c": -1.0}, alpha=0.5, beta=1 / 3)
    assert removed == {"c"}
    assert r == pytest.approx({"a": 6 / 11, "b": 5 / 11})


def test_update_keeps_the_silent_and_removes_below_beta_over_deg() -> None:
    # b did not send: keeps 0.25; a: 0.9*0.25 + 0.1*0.2 = 0.245; c: 0.9*0.5 + 0.1*1 = 0.55; sum 1.045
    r, removed = update({"a": 0.25, "b": 0.25, "c": 0.5}, {"a": 0.2, "c": 1.0}, alpha=0.9, beta=0.8)
    # threshold 0.8 / 3 = 0.2667: a (0.2344) and b (0.2392) are removed, c alone stays at 1
    assert removed == {"a", "b"} and r == pytest.approx({"c": 1.0})


@given(st.dictionaries(st.sampled_from("abcdef"), st.floats(-1, 1), min_size=1),
       st.floats(0, 0.99), st.floats(0, 0.99))
def test_update_never_removes_everyone_and_stays_normalised(phi: dict[str, float], alpha: float, beta: float) -> None:
    r0 = {j: 1.0 / len(phi) for j in phi}
    r, removed = update(r0, phi, alpha, beta)
    assert r and set(r) | removed == set(phi) and not set(r) & removed
    assert math.isclose(sum(r.values()), 1.0, rel_tol=1e-9) and all(v >= 0 for v in r.values())


def test_clip_and_top_fraction() -> None:
    v = torch.tensor([3.0, -4.0, 0.0, 1.0])
    assert torch.allclose(clip(v, 2.0), v * (2.0 / math.sqrt(26)))
    assert torch.equal(clip(v, 10.0), v)
    assert torch.equal(top_fraction(v, 0.5), torch.tensor([3.0, -4.0, 0.0, 0.0]))
    assert torch.equal(top_fraction(v, 0.25), torch.tensor([0.0, -4.0, 0.0, 0.0]))
    assert torch.equal(top_fraction(v, 1.0), v)


def test_params_are_checked_by_name() -> None:
    assert params({"alpha": 0.9}).alpha == 0.9
    for bad, needle in (({"alpha": 1.0}, "reputation_params.alpha"), ({"removal_rounds": 0}, "removal_rounds"),
                        ({"gamma": -1}, "gamma"), ({"zz": 1}, "zz")):
        with pytest.raises(ConfigError, match=needle):
            params(bad)


def _round(alg: Reputation, t: int, received: dict[str, torch.Tensor]) -> None:
    alg.local_update(t)
    alg.combine(t, 0, {j: {"model": v} for j, v in received.items()})
    alg.end_round(t)


def test_a_sign_flipper_is_removed_and_no_longer_aggregated() -> None:
    alg = wrapped(["h1", "h2", "h3", "bad"], alpha=0.5)
    for t in range(6):
        x = alg.vector().clone()
        step = torch.full_like(x, 0.01)   # the honest neighbours move the same way
        _round(alg, t, {"h1": x + step, "h2": x + 1.1 * step, "h3": x + 0.9 * step, "bad": -3 * x})
        if "bad" in alg.advice().drop:
            break
    assert alg.advice().drop == {"bad"} and set(alg.advice().scores) == {"h1", "h2", "h3"}
    assert t <= 3
    before = alg.vector().clone()
    alg.local_update(t + 1)
    trained = alg.vector().clone()
    alg.combine(t + 1, 0, {"bad": {"model": torch.full_like(before, 1e3)}})
    assert torch.equal(alg.vector(), trained)   # the removed neighbour's frame changed nothing
    assert alg.counters["reputation_removed"] == 1


def test_an_attacker_that_behaves_then_lies_is_caught_by_the_ema() -> None:
    # j agrees perfectly (phi = 1) for 20 rounds while the others score 0.5: its reputation climbs
    # above the mean; then it lies (phi = -1). With alpha = 0.95 it falls under beta/deg within 6 rounds.
    r = {k: 0.25 for k in "abcj"}
    for _ in range(20):
        r, removed = update(r, {"a": 0.5, "b": 0.5, "c": 0.5, "j": 1.0}, 0.95, 1 / 3)
        assert not removed
    assert r["j"] > 0.3
    lying = 0
    while not removed and lying < 20:
        lying += 1
        r, removed = update(r, {"a": 0.5, "b": 0.5, "c": 0.5, "j": -1.0}, 0.95, 1 / 3)
    assert removed == {"j"} and 3 <= lying <= 6


def test_new_neighbours_start_at_the_mean_and_state_survives_a_checkpoint() -> None:
    alg = wrapped(["a", "b", "bad"], alpha=0.5)
    alg.r = {"a": 0.6, "b": 0.4}
    alg.removed = {"bad": 2**62}
    alg.set_neighbors({"a": 0.25, "b": 0.25, "c": 0.25, "bad": 0.25})
    assert alg.advice().scores == pytest.approx({"a": 0.4, "b": 0.8 / 3, "c": 1 / 3})  # c at the mean 0.5
    state = alg.state_dict()
    fresh = wrapped(["a", "b", "c", "bad"])
    fresh.load_state_dict(state)
    assert fresh.advice() == alg.advice()
    with pytest.raises(ValueError, match="floats in"):
        fresh.load_state_dict({**state, "reputation": {"a": 7.0}})


def test_a_new_neighbour_is_learnt_then_scored_in_grace_before_its_reputation_moves() -> None:
    """A neighbour that joins mid-run: its first frame only sets its baseline (not aggregated); for
    grace_rounds frames its scores decide aggregation but not its reputation (two peers that just
    linked pull towards each other, so their changes oppose); then it is scored like the others."""
    alg = wrapped(["h1", "h2"], alpha=0.5, grace_rounds=2)
    x0 = alg.vector().clone()
    step = torch.full_like(x0, 0.01)

    def round_(t: int, new: torch.Tensor | None) -> torch.Tensor:
        alg.local_update(t)
        x = alg.vector().clone()
        got = {"h1": x + step, "h2": x + 1.1 * step, **({"new": new} if new is not None else {})}
        alg.combine(t, 0, {j: {"model": v} for j, v in got.items()})
        alg.end_round(t)
        return x

    round_(0, None)
    alg.set_neighbors({"h1": 0.25, "h2": 0.25, "new": 0.25})
    assert alg.advice().scores["new"] == pytest.approx(1 / 3)
    before = alg.vector().clone()
    alg.local_update(1)
    trained = alg.vector().clone()
    alg.combine(1, 0, {"new": {"model": torch.full_like(before, 1e3)}})   # first frame: baseline only
    assert torch.equal(alg.vector(), trained)
    alg.end_round(1)
    last = torch.full_like(before, 1e3)
    for t in (2, 3):   # opposed (its change points back), in grace: left out, its reputation stays
        last = last - 50 * step
        round_(t, last)
        assert "new" in alg.opposed and "new" not in alg.advice().drop
        assert alg.advice().scores["new"] == pytest.approx(1 / 3, abs=0.05)
    last = last - 50 * step
    round_(4, last)    # grown up: the same change now costs it its place
    assert "new" in alg.advice().drop


@pytest.mark.parametrize("joins_at", [None, 1])
def test_a_silent_neighbour_is_removed_whether_it_started_with_us_or_joined(joins_at: int | None) -> None:
    """A neighbour that never sends keeps its reputation while the agreeing ones grow, and falls under
    the threshold. One we start with gets no grace; one that joins mid-run gets grace_rounds (2) after
    its first round, counted in rounds, not frames (else a silent newcomer would stay for ever)."""
    alg = wrapped(["h1", "h2"] if joins_at is not None else ["h1", "h2", "quiet"], alpha=0.5, grace_rounds=2)
    removed_at = None
    for t in range(16):
        if t == joins_at:
            alg.set_neighbors({"h1": 0.25, "h2": 0.25, "quiet": 0.25})
        alg.local_update(t)
        x = alg.vector().clone()
        step = torch.full_like(x, 0.01)
        alg.combine(t, 0, {"h1": {"model": x + step}, "h2": {"model": x + 1.1 * step}})
        alg.end_round(t)
        if "quiet" in alg.advice().drop:
            removed_at = t
            break
    assert alg.advice().drop == {"quiet"} and removed_at is not None
    if joins_at is not None:
        assert removed_at > joins_at + 2


def test_removal_lasts_removal_rounds() -> None:
    alg = wrapped(["a", "b"], removal_rounds=3)
    alg.removed = {"b": 5}
    alg.local_update(4)
    assert alg.advice().drop == {"b"}
    alg.local_update(5)
    assert alg.advice().drop == frozenset()


def test_fair_rewards_send_the_top_share_of_the_update() -> None:
    alg = wrapped(["a", "b"], fair_rewards=True)
    alg.r = {"a": 0.8, "b": 0.2}
    alg.local_update(0)
    prev, x = alg.x_prev, alg.vector()
    assert torch.equal(alg.outgoing(0, 0, "a")["model"], x)   # the most reputable: everything
    to_b = alg.outgoing(0, 0, "b")["model"]                      # q = 0.25: a quarter of the coordinates
    changed = int((to_b != prev).sum())
    assert changed == math.ceil(0.25 * x.numel())
    assert torch.equal(to_b, prev + top_fraction(x - prev, 0.25))
