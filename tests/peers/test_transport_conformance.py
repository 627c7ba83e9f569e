"""Transport conformance: one suite, every transport (in the spirit of trio's check_two_way_stream).

Each test runs against `p2pfl.testing.PAIR_KINDS`: the memory transport with frames as signed
bytes (``memory-wire``) and as objects (``memory-objects``), and `Libp2pTransport` over real
loopback TCP, frames on the bulk channel (``libp2p-bulk``) or on libp2p streams
(``libp2p-stream``). A `Pair` gives two connected transports a -> b and drives them alike; see
p2pfl/testing/transports.py. Memory pairs run under trio's MockClock; libp2p pairs on the real
clock with every wait on a condition, bounded by fail_after; nothing sleeps and no assertion reads
the wall clock (the memory slow-reader test checks that virtual time did not move).

What is the same everywhere is asserted everywhere. Where a transport has no such behaviour (no
bytes to forge between objects, no streams to cut in memory) the test is skipped with the reason;
where the transports differ and their documentation allows both, each one's documented behaviour
is asserted; where they differ against the documentation, the test is xfail(strict) naming it.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import trio

from p2pfl.errors import Reject
from p2pfl.gossip import payloads
from p2pfl.gossip.codec import Frame
from p2pfl.testing import (
    MODEL_SCHEMA,
    PAIR_KINDS,
    SMALL_PAYLOADS,
    Pair,
    forged_frame_bytes,
    frame_bytes,
    identity,
    run_pair,
)

A, STRANGER = identity(0), identity(7)   # a Pair's sender is identity(0); identity(7) is nobody's peer


def kinds(*only: str, xfail: dict[str, str] | None = None) -> list:
    """Pair kinds as parameters (default: all); libp2p ones are marked slow (each connect costs
    ~0.3 s, most of it py-libp2p's happy-eyeballs wait), `xfail` maps a kind to a strict-xfail reason."""
    params = []
    for kind in only or PAIR_KINDS:
        marks = [pytest.mark.slow] if kind.startswith("libp2p") else []
        if xfail and kind in xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=xfail[kind]))
        params.append(pytest.param(kind, marks=marks, id=kind))
    return params


KINDS = kinds()
WIRE_KINDS = kinds("memory-wire", "libp2p-bulk", "libp2p-stream")   # where raw bytes can reach the decoder


def only_libp2p(kind: str, why: str) -> None:
    if not kind.startswith("libp2p"):
        pytest.skip(f"{kind}: {why}")


def _reasons(pair: Pair) -> dict[str, int]:
    return dict(+pair.b.stats.rejected)


# -- delivery -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_many_frames_arrive_in_order_whole_and_from_the_authenticated_sender(kind):
    n = 40

    async def body(pair: Pair) -> None:
        a, b = pair
        pair.start_reading()
        for r in range(n):
            assert await pair.send(pair.frame(r, step=r % 3))
        got = await pair.frames(n)
        assert [(s, f.sender, f.kind, f.round, f.step, f.schema, f.dtype) for s, f in got] == \
            [(a.local_id, a.local_id, "model", r, r % 3, MODEL_SCHEMA, "f32") for r in range(n)]
        assert all(f.payload.shape == (100,) and (f.payload == r).all() for r, (_, f) in enumerate(got))
        assert (a.stats.frames_sent, a.stats.send_failures, b.stats.frames_received) == (n, 0, n)
        assert a.stats.bytes_sent == b.stats.bytes_received > 0
        assert not b.stats.rejected

    run_pair(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_the_sender_is_the_authenticated_peer_not_the_frames_own_claim(kind):
    """`a` sends a Frame whose `sender` field names someone else: receive() says it came from `a`.
    Over the wire the encoder signs as `a`, so the frame's own field says `a` too; between objects
    (memory-objects) the field arrives as `a` wrote it (the transport doc allows it: consumers must
    use the yielded sender)."""
    async def body(pair: Pair) -> None:
        a, _ = pair
        assert await pair.send(Frame("model", STRANGER.peer_id, 0, 0, MODEL_SCHEMA, "f32", np.ones(100, np.float32)))
        [(sender, frame)] = await pair.frames(1)
        assert sender == a.local_id
        assert frame.sender == (STRANGER.peer_id if kind == "memory-objects" else a.local_id)

    run_pair(kind, body)


# -- expect(): payloads checked at the door -------------------------------------------------------------
MISMATCHES = [   # (what a sends: kind, payload; the reason b counts)
    ("model", np.ones(99, np.float32), Reject.WRONG_SIZE),
    ("model", np.ones(101, np.float32), Reject.WRONG_SIZE),
    ("model", np.ones(100, np.float16), Reject.WRONG_DTYPE),
    ("scores", np.ones(100, np.float32), Reject.UNKNOWN_KIND),
    ("model", np.full(100, 3e38, np.float32), Reject.OUT_OF_RANGE),
]


@pytest.mark.parametrize("kind", KINDS)
def test_expect_refuses_frames_that_do_not_match_the_declared_payloads(kind):
    async def body(pair: Pair) -> None:
        a, b = pair
        pair.start_reading()
        want: dict[str, int] = {}
        for i, (payload_kind, arr, reason) in enumerate(MISMATCHES):
            assert await pair.send(pair.frame(i, kind=payload_kind, payload=arr))
            want[reason.value] = want.get(reason.value, 0) + 1
            await pair.wait_until(lambda: _reasons(pair) == want)
        assert await pair.send(pair.frame(7))
        [(sender, frame)] = await pair.frames(1)
        assert (sender, frame.round, frame.payload.size) == (a.local_id, 7, 100)
        assert b.stats.frames_received == 1 and _reasons(pair) == want

    run_pair(kind, body, payloads=SMALL_PAYLOADS)


@pytest.mark.parametrize("kind", KINDS)
def test_expect_derives_the_frame_limit_and_refuses_a_bigger_frame(kind):
    """The limit becomes the largest frame the payloads can make; a frame above it is refused as
    oversize (libp2p: from its length prefix, so none of its body is read). Then frames from `a`
    flow again: over libp2p `b` dropped the channel, so the frame or two `a` writes before it
    notices can be lost (counted as send failures when it does notice)."""
    async def body(pair: Pair) -> None:
        a, b = pair
        assert b.max_frame_bytes == payloads.max_frame_bytes(SMALL_PAYLOADS)   # type: ignore[attr-defined]
        pair.start_reading()
        assert await pair.send(pair.frame(0, n=1 << 12))
        await pair.wait_until(lambda: _reasons(pair) == {"oversize": 1})
        if pair.is_libp2p:
            assert b.stats.bytes_received == 0
        for r in range(1, 6):
            assert await pair.send(pair.frame(r))
            if pair.is_memory or pair.received:
                break
        [(sender, frame)] = await pair.frames(1)
        assert sender == a.local_id and 1 <= frame.round <= 5
        assert _reasons(pair) == {"oversize": 1}

    run_pair(kind, body, payloads=SMALL_PAYLOADS)


# -- frames the codec refuses ---------------------------------------------------------------------------
# raw bytes from a (identity 0) that an honest encoder never writes, and the reason b counts
CODEC_DEFECTS = {
    "bad_length": (struct.pack(">II", 100, 200) + bytes(96), Reject.BAD_LENGTH),   # header longer than the frame
    "bad_msgpack": (forged_frame_bytes(A, raw_header=b"\xc1"), Reject.BAD_MSGPACK),
    "bad_header": (forged_frame_bytes(A, extra=1), Reject.BAD_HEADER),
    "unknown_version": (forged_frame_bytes(A, v=2), Reject.UNKNOWN_VERSION),
    "wrong_schema": (forged_frame_bytes(A, schema="0" * 32), Reject.WRONG_SCHEMA),
    "wrong_size": (forged_frame_bytes(A, nbytes=12), Reject.WRONG_SIZE),           # header says 12, body has 8
    "bad_digest": (forged_frame_bytes(A, digest=bytes(32)), Reject.BAD_DIGEST),
    "bad_signature": (forged_frame_bytes(A, sig=b"x" * 64), Reject.BAD_SIGNATURE),
    "forged_sender": (frame_bytes(STRANGER), Reject.FORGED_SENDER),                # validly signed by another peer
    "claims_another_peer": (forged_frame_bytes(A, **{"from": STRANGER.peer_id}), Reject.FORGED_SENDER),
    "non_finite": (frame_bytes(A, payload=np.array([1.0, np.nan, 2.0], np.float32)), Reject.NON_FINITE),
    "oversize": ((1 << 20).to_bytes(4, "big") + bytes(68), Reject.OVERSIZE),        # limit: 64 KiB
}


@pytest.mark.parametrize("defect", sorted(set(CODEC_DEFECTS) - {"claims_another_peer"}))
@pytest.mark.parametrize("kind", WIRE_KINDS)
def test_every_codec_defect_is_refused_with_its_reason_and_the_link_keeps_working(kind, defect):
    check_codec_defect(kind, defect)


@pytest.mark.parametrize("kind", kinds("memory-wire", "libp2p-bulk", "libp2p-stream"))
def test_a_frame_signed_by_its_sender_but_claiming_another_peer_is_a_forged_sender(kind):
    check_codec_defect(kind, "claims_another_peer")


def check_codec_defect(kind: str, defect: str) -> None:
    raw, reason = CODEC_DEFECTS[defect]

    async def body(pair: Pair) -> None:
        a, b = pair
        pair.start_reading()
        await pair.inject(raw)
        await pair.wait_until(lambda: sum(b.stats.rejected.values()) == 1)
        assert _reasons(pair) == {reason.value: 1}
        await pair.inject(frame_bytes(A, round_=1))    # a's next frame gets in (a fresh channel where one was dropped)
        [(sender, frame)] = await pair.frames(1)
        assert (sender, frame.sender, frame.round) == (a.local_id, a.local_id, 1)
        assert b.stats.frames_received == 1 and _reasons(pair) == {reason.value: 1}
        if reason is Reject.OVERSIZE and pair.is_libp2p:
            assert b.stats.bytes_received == len(frame_bytes(A, round_=1))   # the oversize body was never read

    run_pair(kind, body, max_frame_bytes=64 * 1024)


@pytest.mark.parametrize("kind", KINDS)
def test_frames_with_a_wrong_schema_or_non_finite_values_are_refused_whatever_carries_them(kind):
    """The same two checks through `send` (object frames are checked too: no NaN reaches a peer)."""
    async def body(pair: Pair) -> None:
        a, _ = pair
        pair.start_reading()
        assert await pair.send(pair.frame(0, schema="0" * 32))
        assert await pair.send(pair.frame(1, payload=np.array([0.0, np.inf], np.float32)))
        assert await pair.send(pair.frame(2, payload=np.array([np.nan], np.float32)))
        assert await pair.send(pair.frame(3))
        [(sender, frame)] = await pair.frames(1)
        assert (sender, frame.round) == (a.local_id, 3)
        await pair.wait_until(lambda: _reasons(pair) == {"wrong_schema": 1, "non_finite": 2})

    run_pair(kind, body)


# -- streams that end badly -----------------------------------------------------------------------------
@pytest.mark.parametrize("end", ["close", "reset"])
@pytest.mark.parametrize("kind", WIRE_KINDS)
def test_a_frame_cut_short_is_counted_and_the_link_keeps_working(kind, end):
    """libp2p: the channel ends (closed or reset) mid-frame: truncated. The memory transport has no
    streams: the cut frame arrives as one item and is refused as bad_length."""
    if kind == "memory-wire" and end == "reset":
        pytest.skip("memory-wire: no streams to reset (the close case covers the cut frame)")
    whole = frame_bytes(A, round_=0, n=1000)
    reason = "bad_length" if kind == "memory-wire" else "truncated"

    async def body(pair: Pair) -> None:
        a, b = pair
        pair.start_reading()
        await pair.inject_partial(whole, len(whole) // 2, end=end)
        await pair.wait_until(lambda: sum(b.stats.rejected.values()) == 1)
        assert _reasons(pair) == {reason: 1}
        await pair.inject(frame_bytes(A, round_=1))
        [(sender, frame)] = await pair.frames(1)
        assert (sender, frame.round) == (a.local_id, 1)

    run_pair(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_sender_that_stalls_mid_frame_loses_the_channel_and_is_counted(kind):
    only_libp2p(kind, "no streams, nothing to stall (an item arrives whole or not at all)")
    whole = frame_bytes(A, round_=0, n=1000)

    async def body(pair: Pair) -> None:
        a, _ = pair
        pair.start_reading()
        await pair.inject(whole[:100])        # then nothing, until b's stall timeout
        await pair.wait_until(lambda: _reasons(pair) == {"stalled": 1})
        await pair.inject(frame_bytes(A, round_=1))
        [(sender, frame)] = await pair.frames(1)
        assert (sender, frame.round) == (a.local_id, 1)

    run_pair(kind, body, stall_timeout_s=0.2)


# -- send failures --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_send_to_an_unknown_peer_returns_false_and_is_counted(kind):
    async def body(pair: Pair) -> None:
        a, b = pair
        assert await a.send(STRANGER.peer_id, pair.frame(0)) is False
        assert (a.stats.send_failures, a.stats.frames_sent, a.stats.bytes_sent) == (1, 0, 0)
        assert await pair.send(pair.frame(1))           # the known peer still gets frames
        [(_, frame)] = await pair.frames(1)
        assert frame.round == 1 and a.stats.send_failures == 1 and not b.stats.rejected

    run_pair(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_send_after_closing_returns_false_and_is_counted(kind):
    async def body(pair: Pair) -> None:
        a, _ = pair
        await pair.aclose(a)
        assert await a.send(pair.b.local_id, pair.frame(0)) is False
        assert (a.stats.send_failures, a.stats.frames_sent) == (1, 0)

    run_pair(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_send_to_a_closed_peer_fails_and_is_counted(kind):
    """memory: `send` returns False at once. libp2p: `send` only queues (it returns at once, True),
    and the writer counts the failure when the dead connection refuses a write; a frame written
    before that can vanish in the kernel (TCP), so a few frames may go before one is counted."""
    async def body(pair: Pair) -> None:
        a, b = pair
        pair.start_reading()
        assert await pair.send(pair.frame(0))
        await pair.frames(1)
        await pair.aclose(b)
        await pair.wait_until(lambda: pair.reading_ended)
        if pair.is_memory:
            assert await a.send(b.local_id, pair.frame(1)) is False
            assert (a.stats.send_failures, a.stats.frames_sent) == (1, 1)
        else:
            for r in range(1, 4):
                assert await pair.send(pair.frame(r)) is True
                if a.stats.send_failures:
                    break
            assert a.stats.send_failures == 1
        assert len(pair.received) == 1

    run_pair(kind, body)


# -- close ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_aclose_ends_receive(kind):
    """A receive() loop waiting for frames ends when its transport closes, and one started after
    the close ends at once. Frames accepted before the close are still handed out, in order."""
    async def body(pair: Pair) -> None:
        _, b = pair
        for r in range(3):
            assert await pair.send(pair.frame(r))
        if pair.is_libp2p:   # accepted into b's inbox, nobody reading yet
            await pair.wait_until(lambda: b.stats.frames_received == 3)
        await pair.aclose(b)
        pair.start_reading()
        await pair.wait_until(lambda: pair.reading_ended)
        assert [f.round for _, f in pair.received] == [0, 1, 2]
        with trio.fail_after(5):
            async for item in b.receive():
                raise AssertionError(f"a closed transport handed out {item}")

    run_pair(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_aclose_wakes_a_blocked_receive(kind):
    async def body(pair: Pair) -> None:
        _, b = pair
        pair.start_reading()
        assert await pair.send(pair.frame(0))
        await pair.frames(1)                      # the reader now waits for a frame that never comes
        await pair.aclose(b)
        await pair.wait_until(lambda: pair.reading_ended)
        assert len(pair.received) == 1

    run_pair(kind, body)


# -- a reader that does not read ------------------------------------------------------------------------
INBOX = 8


@pytest.mark.parametrize("kind", KINDS)
def test_a_slow_reader_never_blocks_the_sender_and_extra_frames_are_dropped_and_counted(kind):
    """b does not consume; a sends INBOX + 4 frames, one after another. No send blocks. The first
    INBOX frames wait for b's reader, in order; the other 4 are dropped and counted. Where they are
    counted differs, each as documented: memory refuses them at the door (send returns False, a
    counts a send failure: 'False if it could not be handed over'); libp2p hands every frame to its
    writer (send returns True) and b drops the extras as buffer_full ('a full inbox drops the frame
    and counts it')."""
    extra = 4

    async def body(pair: Pair) -> None:
        a, b = pair
        t0 = trio.current_time()
        results = [await pair.send(pair.frame(r)) for r in range(INBOX + extra)]
        if pair.is_memory:
            assert trio.current_time() == t0       # virtual time: no send waited for anything
            assert results == [True] * INBOX + [False] * extra
            assert (a.stats.send_failures, a.stats.frames_sent) == (extra, INBOX)
        else:
            assert results == [True] * (INBOX + extra)
            await pair.wait_until(lambda: b.stats.rejected["buffer_full"] == extra)
            assert (a.stats.send_failures, a.stats.frames_sent) == (0, INBOX + extra)
        got = await pair.frames(INBOX)
        assert [f.round for _, f in got] == list(range(INBOX))
        assert _reasons(pair) == ({} if pair.is_memory else {"buffer_full": extra})
        assert await pair.send(pair.frame(99))        # once read, b takes frames again
        assert (await pair.frames(INBOX + 1))[-1][1].round == 99

    run_pair(kind, body, inbox_frames=INBOX)


@pytest.mark.parametrize("kind", kinds(*PAIR_KINDS))
def test_frames_received_counts_only_frames_handed_to_the_reader(kind):
    extra = 2

    async def body(pair: Pair) -> None:
        _, b = pair
        for r in range(INBOX + extra):
            await pair.send(pair.frame(r))
        if pair.is_libp2p:
            await pair.wait_until(lambda: b.stats.rejected["buffer_full"] == extra)
        await pair.frames(INBOX)
        assert b.stats.frames_received == len(pair.received) == INBOX

    run_pair(kind, body, inbox_frames=INBOX)
