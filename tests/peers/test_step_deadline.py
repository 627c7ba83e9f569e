"""The step deadline moves on while frames are still arriving (`peer.wait_step`), under trio's
MockClock: a progress counter that a task bumps stands for the bytes a slow link delivers."""

from __future__ import annotations

import trio
import trio.testing

from p2pfl.peers.peer import wait_step

TIMEOUT_S = 30.0


def _run(bump_every_s: float | None, bumps: int, done_at: float | None, most_s: float = 4 * TIMEOUT_S):
    """(arrived, seconds waited): bytes arrive every `bump_every_s` `bumps` times; `done` is set at `done_at`."""
    result = {}

    async def main() -> None:
        done, counter = trio.Event(), [0]

        async def link() -> None:
            for _ in range(bumps):
                await trio.sleep(bump_every_s or 0)
                counter[0] += 1000
            if done_at is not None:
                await trio.sleep_until(done_at)
                done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(link)
            start = trio.current_time()
            result["arrived"] = await wait_step(done, TIMEOUT_S, lambda: counter[0], most_s)
            result["waited"] = trio.current_time() - start
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return result["arrived"], result["waited"]


def test_a_frame_still_arriving_is_waited_for_past_the_step_timeout():
    # bytes every 10 s, the frame complete at 75 s: two deadlines pass while it is arriving
    assert _run(10.0, 7, done_at=75.0) == (True, 75.0)


def test_a_silent_neighbour_costs_the_step_timeout_as_before():
    assert _run(None, 0, done_at=None) == (False, TIMEOUT_S)


def test_progress_that_stops_ends_the_wait_one_timeout_later():
    # bytes until 20 s, then nothing: the 30 s deadline is moved once (to 60 s) and not again
    assert _run(10.0, 2, done_at=None) == (False, 2 * TIMEOUT_S)


def test_a_trickling_neighbour_holds_a_step_no_longer_than_the_bound():
    assert _run(5.0, 1000, done_at=None) == (False, 4 * TIMEOUT_S)


def test_a_step_that_completes_in_time_returns_at_once():
    assert _run(None, 0, done_at=3.0) == (True, 3.0)
