import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import LocalProtocolError, Reject, RemoteProtocolError
from p2pfl.gossip.rounds import Arrival, StepTracker, Suspicion

NB = ["a", "b", "c"]


def reason(fn) -> Reject:
    with pytest.raises(RemoteProtocolError) as e:
        fn()
    return e.value.reason


def test_step_completes_when_all_neighbours_heard():
    tr = StepTracker(NB)
    tr.begin(0, 0)
    assert not tr.complete
    assert tr.receive("b", 0, 0, 2) is Arrival.CURRENT
    assert tr.receive("a", 0, 0, 1) is Arrival.CURRENT
    assert tr.missing() == ["c"]
    tr.receive("c", 0, 0, 3)
    assert tr.complete
    assert list(tr.finish().items()) == [("a", 1), ("b", 2), ("c", 3)]  # neighbour order, not arrival


def test_deadline_finishes_with_what_arrived():
    tr = StepTracker(NB)
    for t in range(2):
        tr.begin(t, 0)
        tr.receive("a", t, 0, t)
        assert tr.missing() == ["b", "c"]
        assert tr.finish() == {"a": t}


def test_silent_neighbours_are_set_aside_with_a_doubling_backoff():
    s = Suspicion(after=2, max_rounds=8)
    assert s.round_done(0, NB, ["b", "c"]) == {}
    assert s.round_done(1, NB, ["c"]) == {"c": 2}        # c: two in a row -> out for 2 rounds
    assert s.misses["b"] == 0 and s.benched == {"c": 4}  # b delivered: its streak reset
    assert s.release(3) == [] and s.release(4) == ["c"]
    assert s.round_done(4, NB, ["c"]) == {"c": 4}        # on probation: one more miss, twice as long
    for expected in (8, 8):                               # 2**3, then 2**4 capped at max_rounds
        until = s.benched["c"]
        s.release(until)
        assert s.round_done(until, NB, ["c"]) == {"c": expected}


def test_later_frames_are_buffered_and_delivered_at_their_step():
    tr = StepTracker(NB, steps_per_round=2)
    tr.begin(0, 0)
    assert tr.receive("a", 0, 1, "early") is Arrival.BUFFERED
    assert tr.receive("a", 1, 0, "earlier still") is Arrival.BUFFERED
    tr.finish()
    tr.begin(0, 1)
    assert tr.missing() == ["b", "c"]
    assert tr.finish() == {"a": "early"}
    tr.begin(1, 0)
    assert tr.finish() == {"a": "earlier still"}


def test_rejections_have_reasons():
    tr = StepTracker(NB, max_ahead_rounds=2, buffer_per_neighbor=2)
    tr.begin(3, 0)
    assert reason(lambda: tr.receive("mallory", 3, 0, 0)) is Reject.UNKNOWN_PEER
    assert reason(lambda: tr.receive("a", 2, 0, 0)) is Reject.STALE
    assert reason(lambda: tr.receive("b", 6, 0, 0)) is Reject.TOO_FAR_AHEAD
    assert reason(lambda: tr.receive("b", 3, 5, 0)) is Reject.BAD_HEADER
    tr.receive("a", 3, 0, 1)
    assert reason(lambda: tr.receive("a", 3, 0, 1)) is Reject.REPLAYED
    tr.receive("c", 4, 0, 1)
    tr.receive("c", 5, 0, 1)
    assert reason(lambda: tr.receive("c", 5, 0, 1)) is Reject.REPLAYED
    tr2 = StepTracker(NB, max_ahead_rounds=3, buffer_per_neighbor=2)
    tr2.begin(0, 0)
    tr2.receive("c", 1, 0, 1)
    tr2.receive("c", 2, 0, 1)
    assert reason(lambda: tr2.receive("c", 3, 0, 1)) is Reject.BUFFER_FULL


def test_cannot_go_backwards():
    tr = StepTracker(NB)
    tr.begin(2, 0)
    with pytest.raises(LocalProtocolError):
        tr.begin(1, 0)


def test_neighbour_change_drops_removed_peer_state():
    tr = StepTracker(NB)
    tr.begin(0, 0)
    tr.receive("a", 0, 0, 1)
    tr.receive("b", 1, 0, 1)
    tr.set_neighbors(["c", "d"])
    assert tr.missing() == ["c", "d"]
    tr.finish()
    tr.begin(1, 0)
    assert tr.missing() == ["c", "d"]


def test_a_link_agreed_for_a_later_round_buffers_the_new_neighbours_early_frames():
    """The other side of a new link may begin the agreed round first: its frames from that round on
    are kept, not refused, and count once it is a neighbour; earlier ones are still refused."""
    tr = StepTracker(["a"])
    tr.begin(3, 0)
    tr.expect("d", 5)
    assert reason(lambda: tr.receive("d", 4, 0, "early")) is Reject.UNKNOWN_PEER
    assert tr.receive("d", 5, 0, "d5") is Arrival.BUFFERED
    assert reason(lambda: tr.receive("e", 5, 0, "stranger")) is Reject.UNKNOWN_PEER
    tr.finish()
    tr.begin(4, 0)
    assert tr.missing() == ["a"]
    tr.finish()
    tr.set_neighbors(["a", "d"])     # the driver, before round 5
    tr.begin(5, 0)
    assert tr.missing() == ["a"]     # d's frame was waiting
    tr.receive("a", 5, 0, "a5")
    assert tr.complete and tr.finish() == {"a": "a5", "d": "d5"}


def test_a_link_called_off_drops_the_frames_kept_for_it():
    tr = StepTracker(["a"])
    tr.begin(0, 0)
    tr.expect("d", 2)
    tr.receive("d", 2, 0, "d2")
    tr.finish()
    tr.begin(1, 0)
    tr.finish()
    tr.begin(2, 0)                   # d never became a neighbour: its frame is dropped, and later ones refused
    tr.receive("a", 2, 0, "a2")
    assert tr.complete and tr.finish() == {"a": "a2"}
    assert reason(lambda: tr.receive("d", 3, 0, "d3")) is Reject.UNKNOWN_PEER


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NB + ["x", "y"]), st.integers(0, 6), st.integers(0, 1)), max_size=40),
       st.integers(0, 4), st.integers(0, 6), st.booleans())
def test_any_interleaving_keeps_invariants(arrivals, start, link_round, joins):
    """Whatever arrives, in any order: no crash, each accepted value is delivered at most once and
    only at its own step, and every refusal carries a reason. x is never a neighbour; a link with y
    is agreed for `link_round` (y made a neighbour then, if `joins`): y's values are delivered only
    at steps of that round or later, and only if it joined."""
    tr = StepTracker(NB, steps_per_round=2, max_ahead_rounds=1, buffer_per_neighbor=2)
    delivered: list[tuple[str, int, int]] = []
    accepted = set()
    step = start * 2
    tr.begin(*divmod(step, 2))
    tr.expect("y", link_round)
    for sender, t, q in arrivals:
        try:
            tr.receive(sender, t, q, (sender, t, q))
            accepted.add((sender, t, q))
        except RemoteProtocolError as e:
            assert isinstance(e.reason, Reject)
        if tr.complete or len(accepted) % 3 == 0:
            cur = divmod(step, 2)
            got = tr.finish()
            assert all(v[1:] == cur and v[0] == k for k, v in got.items())
            delivered += got.values()
            step += 1
            if joins and step == link_round * 2:
                tr.set_neighbors([*NB, "y"])
            tr.begin(*divmod(step, 2))
    assert len(delivered) == len(set(delivered))
    assert set(delivered) <= accepted and not any(s == "x" for s, t, q in delivered)
    assert all(joins and t >= link_round for s, t, q in delivered if s == "y")
