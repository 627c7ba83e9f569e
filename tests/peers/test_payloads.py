"""Payloads checked at the door: a frame of the wrong kind, dtype, size or range is refused by the
transport with a counted reason, and nothing a frame can carry stops an honest peer's rounds.
Memory transport under MockClock; libp2p over real loopback TCP, every wait bounded."""

from __future__ import annotations

from contextlib import AsyncExitStack

import numpy as np
import pytest
import torch
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError, Reject, RemoteProtocolError
from p2pfl.gossip import codec, payloads, values
from p2pfl.gossip.codec import Frame
from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.learn.models import flatten
from p2pfl.learn.train import TrainConfig
from p2pfl.peers.memory import MemoryNetwork
from p2pfl.peers.peer import PeerConfig
from p2pfl.testing.transports import LIMIT_S, make_peers, started
from p2pfl.testing.transports import MODEL_SCHEMA as SCHEMA
from p2pfl.testing.transports import identity as ident
from p2pfl.testing.transports import libp2p_transport as transport

SPEC = {"model": PayloadSpec("f32", 100)}


def _bf16(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


# (what the liar sends, the reason the receiver counts)
MISMATCHES = {
    "shorter": (("model", np.ones(99, np.float32)), Reject.WRONG_SIZE),
    "longer": (("model", np.ones(101, np.float32)), Reject.WRONG_SIZE),
    "empty": (("model", np.ones(0, np.float32)), Reject.WRONG_SIZE),
    "f16": (("model", np.ones(100, np.float16)), Reject.WRONG_DTYPE),
    "bf16": (("model", _bf16(np.ones(100))), Reject.WRONG_DTYPE),
    "unknown_kind": (("scores", np.ones(100, np.float32)), Reject.UNKNOWN_KIND),
    "huge_finite": (("model", np.full(100, 3e38, np.float32)), Reject.OUT_OF_RANGE),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_check_names_each_mismatch(case):
    (kind, arr), reason = MISMATCHES[case]
    dtype = "bf16" if arr.dtype == np.uint16 else {np.float32: "f32", np.float16: "f16"}[arr.dtype.type]
    with pytest.raises(RemoteProtocolError) as e:
        payloads.check(kind, dtype, arr, SPEC, "liar")
    assert e.value.reason is reason and e.value.peer == "liar"
    payloads.check("model", "f32", np.ones(100, np.float32), SPEC, "liar")   # the matching one passes


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e7, 1e7, width=32), min_size=1, max_size=300),
       st.floats(1e-3, 1e7), st.sampled_from(["f32", "f16", "bf16"]))
def test_within_agrees_with_an_exact_scan(numbers, bound, dtype):
    arr = np.array(numbers, dtype=np.float32)
    if dtype == "f16":
        with np.errstate(over="ignore"):
            arr = arr.astype(np.float16)
        arr = arr[np.isfinite(arr)]
        wire = arr
    elif dtype == "bf16":
        wire = _bf16(arr)
        arr = (wire.astype(np.uint32) << 16).view(np.float32)
    else:
        wire = arr
    exact = bool(np.all(np.abs(arr.astype(np.float64)) <= bound))
    assert values.within(wire, dtype, bound) == exact


def test_the_frame_limit_follows_the_largest_payload():
    limit = payloads.max_frame_bytes({"model": PayloadSpec("f32", 4810), "ranks": PayloadSpec("f16", 10)})
    frame = b"".join(codec.encode(ident(0), kind="model", round=10**12, step=7, schema=SCHEMA,
                                  payload=np.ones(4810, np.float32)))
    assert len(frame) <= limit < len(frame) + 2 * codec.MAX_HEADER_BYTES
    with pytest.raises(ConfigError):
        PayloadSpec("f64", 3)
    with pytest.raises(ConfigError):
        PayloadSpec("f32", 3, max_abs=float("nan"))


def _send_raw(liar, target, kind: str, arr: np.ndarray, dtype: str | None = None) -> None:
    """A validly signed frame with the federation's schema, straight into `target`'s inbox."""
    data = b"".join(codec.encode(liar.transport.identity, kind=kind, round=0, step=0, schema=liar.schema,
                                 payload=arr, dtype=dtype))
    target.transport._send.send_nowait((0.0, liar.id, data))


@pytest.mark.parametrize("wire", [True, False])
def test_mismatched_frames_never_reach_the_round_over_memory(wire):
    """Every mismatch from a neighbour: refused and counted by the transport; both honest peers run
    their rounds with finite models (before the check, the wrong-length frame killed them)."""
    network = MemoryNetwork(wire=wire)
    peers = make_peers(3, network)
    liar, honest = peers[2], peers[:2]
    d = honest[0].layout.size
    cases = {
        Reject.WRONG_SIZE: [("model", np.ones(10, np.float32)), ("model", np.ones(d + 1, np.float32))],
        Reject.WRONG_DTYPE: [("model", np.ones(d, np.float16))],
        Reject.UNKNOWN_KIND: [("ranks", np.ones(d, np.float32))],
        Reject.OUT_OF_RANGE: [("model", np.full(d, 3e38, np.float32))],
    }

    async def main():
        async with trio.open_nursery() as nursery:
            for p in honest:
                nursery.start_soon(run_one, p)
            for p in honest:
                for kind, arr in [c for cs in cases.values() for c in cs]:
                    if wire:
                        _send_raw(liar, p, kind, arr)
                    else:
                        dtype = "f16" if arr.dtype == np.float16 else "f32"
                        await liar.transport.send(p.id, Frame(kind, liar.id, 0, 0, liar.schema, dtype, arr))

    async def run_one(p):
        async with p:
            await p.train(2)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for p in honest:
        assert p.round == 2
        assert {r.value: len(cs) for r, cs in cases.items()} == dict(p.transport.stats.rejected)
        assert torch.isfinite(flatten(p.model)).all()


@pytest.mark.parametrize("rule", ["median", "geometric_median", "trimmed_mean"])
def test_finite_values_that_overflow_a_rule_are_never_adopted(rule):
    """With the range check off, five 3e38 frames overflow the rule's arithmetic (inf or NaN): the step
    keeps the own vector and counts it, so the model stays finite."""
    config = PeerConfig(train=TrainConfig(lr=0.1, local_steps=2, batch_size=8), step_timeout_s=5.0,
                        max_abs_weight=None, aggregator=rule)
    peers = make_peers(6, MemoryNetwork(), config=config)
    victim, liars = peers[0], peers[1:]
    d = victim.layout.size

    async def main():
        async with victim:
            for liar in liars:
                await liar.transport.send(victim.id, Frame("model", liar.id, 0, 0, liar.schema, "f32",
                                                           np.full(d, 3e38, np.float32)))
            await victim.train(1)

    before = victim.flat.get()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert victim.rejections()["non_finite_aggregate"] == 1
    assert torch.isfinite(flatten(victim.model)).all()
    assert not torch.equal(flatten(victim.model), before)   # it kept its own trained vector, not the old one


def test_a_diverging_local_update_is_discarded():
    config = PeerConfig(train=TrainConfig(lr=1e30, local_steps=3, batch_size=8), step_timeout_s=5.0)
    peers = make_peers(1, MemoryNetwork(), config=config)
    p = peers[0]
    before = p.flat.get()
    events = p.run(2)
    assert p.rejections()["non_finite_update"] >= 1
    assert torch.isfinite(flatten(p.model)).all()
    assert torch.equal(flatten(p.model), before) or all(e["round"] < 2 for e in events)


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_mismatched_frames_are_refused_over_libp2p(case):
    """The same check on the real transport, for the bulk channel and the libp2p-stream path."""
    (kind, arr), reason = MISMATCHES[case]

    async def main():
        victim = transport(0, payloads=SPEC, stall_timeout_s=5.0)
        liar = transport(1)
        rej = victim.stats.rejected
        async with AsyncExitStack() as stack:
            await started(stack, victim, liar)
            inbox = victim.receive()
            with trio.fail_after(LIMIT_S):
                await liar.connect(victim.listen_addrs()[0])
                dtype = {np.float32: "f32", np.float16: "f16", np.uint16: "bf16"}[arr.dtype.type]
                assert await liar.send(victim.local_id, Frame(kind, liar.local_id, 0, 0, SCHEMA, dtype, arr))
                await victim.wait_until(lambda: rej[reason.value] == 1)
                assert victim.bulk_peers == [liar.local_id]
                good = Frame("model", liar.local_id, 1, 0, SCHEMA, "f32", np.ones(100, np.float32))
                assert await liar.send(victim.local_id, good)
                sender, frame = await inbox.__anext__()
                assert (sender, frame.round, frame.payload.size) == (liar.local_id, 1, 100)
            assert dict(rej) == {reason.value: 1}

    trio.run(main)


def test_a_frame_larger_than_any_payload_is_refused_before_its_body():
    """The derived limit (about 1.4 KB for 100 floats) refuses a 4 MB frame from its length prefix:
    the victim reads a few bytes, never the body, and its buffer pool stays empty."""
    async def main():
        victim = transport(0, payloads=SPEC, stall_timeout_s=5.0)
        liar = transport(1)
        async with AsyncExitStack() as stack:
            await started(stack, victim, liar)
            with trio.fail_after(LIMIT_S):
                await liar.connect(victim.listen_addrs()[0])
                big = Frame("model", liar.local_id, 0, 0, SCHEMA, "f32", np.ones(1 << 20, np.float32))
                assert await liar.send(victim.local_id, big)
                await victim.wait_until(lambda: victim.stats.rejected[Reject.OVERSIZE.value] == 1)
            assert victim.max_frame_bytes == payloads.max_frame_bytes(SPEC)
            assert victim.stats.bytes_received == 0 and victim._buffers.held_bytes == 0

    trio.run(main)


def test_the_buffer_pool_is_bounded_in_count_and_bytes():
    from p2pfl.peers.libp2p.frame_path import _BufferPool

    pool = _BufferPool(keep=4, max_bytes=10_000)
    for n in (4000, 4000, 4000, 3000, 20_000):
        pool._give(np.empty(n, np.uint8))
    assert pool.held_bytes <= 10_000 and len(pool._free) <= 4
    assert pool.take(20_000).nbytes == 20_000   # never pooled: a fresh buffer


def test_without_the_range_check_a_huge_mix_still_never_becomes_nan():
    """`mixing` is a convex combination, so 3e38s give a finite, absurd model (what the default range
    check refuses at the door). Turned off, the next local update diverges and is discarded: the peer
    never holds or sends a NaN model."""
    config = PeerConfig(train=TrainConfig(lr=0.1, local_steps=2, batch_size=8), step_timeout_s=5.0,
                        max_abs_weight=None)
    network = MemoryNetwork()
    peers = make_peers(6, network, config=config)
    victim, liars = peers[0], peers[1:]
    d = victim.layout.size
    sent = []
    send = victim.transport.send

    async def spy(peer, frame):
        sent.append(frame.payload.copy())
        return await send(peer, frame)

    victim.transport.send = spy

    async def main():
        async with victim:
            for liar in liars:
                await liar.transport.send(victim.id, Frame("model", liar.id, 0, 0, liar.schema, "f32",
                                                           np.full(d, 3e38, np.float32)))
            await victim.train(3)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert victim.rejections()["non_finite_update"] >= 1
    assert torch.isfinite(flatten(victim.model)).all()
    assert sent and all(np.isfinite(v).all() for v in sent)


def test_a_payload_kinds_own_validator_runs_at_the_door():
    """An algorithm's validator (here: the payload must be a permutation of 0..n-1, as a ranking
    would) refuses a frame with a counted reason; it runs only once dtype and size match."""
    def permutation(a: np.ndarray) -> str | None:
        return None if np.array_equal(np.sort(a), np.arange(a.size, dtype=a.dtype)) else "not a permutation"

    specs = {"ranks": PayloadSpec("f32", 5, max_abs=None, validate=permutation)}
    payloads.check("ranks", "f32", np.array([3, 1, 0, 4, 2], np.float32), specs, "p")
    with pytest.raises(RemoteProtocolError) as e:
        payloads.check("ranks", "f32", np.array([3, 3, 0, 4, 2], np.float32), specs, "liar")
    assert e.value.reason is Reject.INVALID_PAYLOAD and "not a permutation" in str(e.value)
    with pytest.raises(RemoteProtocolError) as e:
        payloads.check("ranks", "f32", np.ones(4, np.float32), specs, "liar")
    assert e.value.reason is Reject.WRONG_SIZE


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=50), st.sampled_from(["u16", "u32"]))
def test_integer_payloads_round_trip_through_the_codec(values, dtype):
    store = codec.storage(dtype)
    arr = np.array([v % (2**16) if dtype == "u16" else v for v in values], dtype=store)
    data = b"".join(codec.encode(ident(0), kind="ranks", round=1, step=0, schema=SCHEMA, payload=arr, dtype=dtype))
    frame = codec.decode(data, schema=SCHEMA, max_frame_bytes=len(data))
    assert frame.dtype == dtype and np.array_equal(frame.payload, arr)
    assert frame.tensor().tolist() == arr.astype(np.int64).tolist()
    # without a dtype, uint16 storage means bf16 bits, and a wrong storage is refused
    bits = np.array([0x3F80, 0x4000], np.uint16)   # bf16 1.0 and 2.0
    assert codec.decode(b"".join(codec.encode(ident(0), kind="m", round=1, step=0, schema=SCHEMA, payload=bits)),
                        schema=SCHEMA, max_frame_bytes=1 << 20).dtype == "bf16"
    with pytest.raises(codec.LocalProtocolError):
        codec.encode(ident(0), kind="m", round=1, step=0, schema=SCHEMA, payload=arr.astype(np.int64), dtype=dtype)


def test_an_algorithm_sends_integer_rankings_checked_at_the_door():
    """A test-defined algorithm gossips a ranking (u16 on the wire, int64 in torch), validated as a
    permutation: honest peers receive each other's rankings; a liar's duplicate ranks are refused."""
    from dataclasses import dataclass

    from p2pfl import algorithms
    from p2pfl.algorithms import Algorithm

    n = 12

    def permutation(a: np.ndarray) -> str | None:
        return None if np.array_equal(np.sort(a), np.arange(a.size)) else "not a permutation"

    @dataclass(frozen=True)
    class NoParams:
        pass

    @algorithms.register("rank_echo_test", params=NoParams)
    class RankEcho(Algorithm):
        """rankings only"""

        def __init__(self, ctx, params):
            super().__init__(ctx, params)
            self.gen = torch.Generator().manual_seed(ctx.seed)
            self.heard: dict[str, torch.Tensor] = {}

        def payloads(self):
            return {"ranks": PayloadSpec("u16", n, max_abs=n - 1, validate=permutation)}

        def local_update(self, t):
            self.ranks = torch.randperm(n, generator=self.gen)
            return {}

        def outgoing(self, t, q, neighbor):
            return {"ranks": self.ranks}

        def combine(self, t, q, received):
            self.heard = {p: r["ranks"] for p, r in received.items()}
            return {}

        def vector(self):
            return self.ranks.float()

    config = PeerConfig(train=TrainConfig(lr=0.1, local_steps=1, batch_size=8), step_timeout_s=5.0,
                        algorithm="rank_echo_test")
    network = MemoryNetwork(wire=True)
    peers = make_peers(3, network, config=config)
    honest, liar = peers[:2], peers[2]

    async def main():
        async with trio.open_nursery() as nursery:
            for p in honest:
                nursery.start_soon(run_one, p)
            for p in honest:
                _send_raw(liar, p, "ranks", np.array([0] * n, np.uint16), "u16")   # not a permutation

    async def run_one(p):
        async with p:
            await p.train(1)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    a, b = honest
    assert torch.equal(a.algorithm.heard[b.id], b.algorithm.ranks) and a.algorithm.heard[b.id].dtype == torch.int64
    assert all(p.transport.stats.rejected == {"invalid_payload": 1} for p in honest)
    algorithms.REGISTRY.pop("rank_echo_test")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=0, max_size=200),
       st.one_of(st.none(), st.floats(1e-3, 1e7)))
def test_one_pass_range_check_agrees_with_the_separate_checks(values_, bound):
    arr = np.array(values_, dtype=np.float32)
    expected = ("non_finite" if not values.all_finite(arr, "f32") else
                "out_of_range" if bound is not None and not values.within(arr, "f32", bound) else None)
    assert values.bounded(arr, "f32", bound) == expected
