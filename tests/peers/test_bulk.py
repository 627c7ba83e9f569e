"""The bulk channel (p2pfl/peers/libp2p/bulk.py): records, tickets, and Libp2pTransport using it.

Record-level tests run over a trio socket pair; transport tests over real loopback TCP with trio's
real clock, every wait on a condition bounded by fail_after (no sleeps)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import numpy as np
import pytest
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import Reject, RemoteProtocolError
from p2pfl.gossip import codec
from p2pfl.gossip.codec import Frame
from p2pfl.peers.libp2p import bulk
from p2pfl.peers.libp2p.host import EndOfStream
from p2pfl.testing.transports import LIMIT_S, started
from p2pfl.testing.transports import MODEL_SCHEMA as SCHEMA
from p2pfl.testing.transports import frame_bytes as _frame_bytes
from p2pfl.testing.transports import identity as ident
from p2pfl.testing.transports import libp2p_transport as transport

KEY = bytes(range(32))


def _frame(t, round_: int, n: int = 100) -> Frame:
    return Frame("model", t.local_id, round_, 0, SCHEMA, "f32", np.full(n, float(round_), dtype=np.float32))


# -- records ----------------------------------------------------------------------------------------
@given(st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=4), st.integers(8, 64))
def test_records_cover_the_frame_in_order_with_the_prefix_alone(parts, first_len):
    first = bytes(range(256))[:first_len] * 1
    buffers = [first, *parts]
    recs = list(bulk.records(buffers))
    assert recs[0].nbytes == codec.FRAME_PREFIX_BYTES
    assert b"".join(bytes(r) for r in recs) == b"".join(buffers)
    assert all(0 < r.nbytes <= bulk.RECORD_BYTES for r in recs)


def test_records_split_big_buffers():
    big = memoryview(bytearray(2 * bulk.RECORD_BYTES + 5))
    sizes = [r.nbytes for r in bulk.records([b"12345678", big])]
    assert sizes == [8, bulk.RECORD_BYTES, bulk.RECORD_BYTES, 5]


async def _pair(key: bytes = KEY):
    a, b = trio.socket.socketpair()
    return bulk.BulkSender(trio.SocketStream(a), key, write_timeout_s=5), bulk.BulkReader(b, key, 5.0, "peer")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(min_size=9, max_size=5000), min_size=1, max_size=3), st.data())
def test_sealed_frames_open_byte_for_byte_whatever_the_read_sizes(frames, data):
    async def main():
        sender, reader = await _pair()
        sent = b"".join(frames)

        async def send():
            for f in frames:
                await sender.send_frame([f[:8], f[8:]])
        async with trio.open_nursery() as n:
            n.start_soon(send)
            got = bytearray()
            while len(got) < len(sent):
                k = data.draw(st.integers(1, len(sent) - len(got)))
                view = memoryview(bytearray(k))
                await reader.read_exact(view, None)
                got += view
        assert bytes(got) == sent
    trio.run(main)


def _sealed(key: bytes, index: int, plain: bytes) -> bytearray:
    n = len(plain).to_bytes(4, "big")
    return bytearray(n + AESGCM(key).encrypt(index.to_bytes(12, "big"), plain, n))


@pytest.mark.parametrize("defect", ["flipped", "replayed", "wrong_key", "length_changed"])
def test_an_altered_replayed_or_foreign_record_fails_authentication(defect):
    async def main():
        a, b = trio.socket.socketpair()
        reader = bulk.BulkReader(b, KEY, 5.0, "peer")
        first = _sealed(KEY, 0, b"A" * 8)
        second = {"flipped": _sealed(KEY, 1, b"B" * 8), "replayed": first,
                  "wrong_key": _sealed(bytes(32), 1, b"B" * 8), "length_changed": _sealed(KEY, 1, b"B" * 8)}[defect]
        if defect == "flipped":
            second[10] ^= 1
        if defect == "length_changed":     # same ciphertext, one byte shorter claimed: the tag covers the length
            second[3] -= 1
            second = second[:-1]
        await a.send(bytes(first + second))
        view = memoryview(bytearray(8))
        await reader.read_exact(view, None)
        assert bytes(view) == b"A" * 8
        with pytest.raises(RemoteProtocolError) as e:
            await reader.read_exact(view, None)
        assert e.value.reason is Reject.BAD_RECORD
    trio.run(main)


@pytest.mark.parametrize("size", [0, bulk.RECORD_BYTES + 1])
def test_an_impossible_record_length_is_refused_before_reading_it(size):
    async def main():
        a, b = trio.socket.socketpair()
        reader = bulk.BulkReader(b, KEY, 5.0, "peer")
        await a.send(size.to_bytes(4, "big"))
        with pytest.raises(RemoteProtocolError) as e:
            await reader.read_exact(memoryview(bytearray(8)), None)
        assert e.value.reason is Reject.BAD_LENGTH
    trio.run(main)


def test_a_record_cut_short_is_end_of_stream():
    async def main():
        a, b = trio.socket.socketpair()
        reader = bulk.BulkReader(b, KEY, 5.0, "peer")
        await a.send(bytes(_sealed(KEY, 0, b"A" * 8)[:-3]))
        a.close()
        with pytest.raises(EndOfStream):
            await reader.read_exact(memoryview(bytearray(8)), None)
    trio.run(main)


def test_ticket_replies_are_checked():
    t = bulk.Ticket.issue(4001)
    assert bulk.Ticket.from_wire(t.to_wire()) == t
    assert bulk.Ticket.from_wire(bulk.Ticket(0).to_wire()) is None      # the peer has no bulk channel
    for bad in ({**t.to_wire(), "port": 70000}, {**t.to_wire(), "key": b"short"}, {**t.to_wire(), "extra": 1},
                {**t.to_wire(), "port": "4001"}):
        with pytest.raises(RemoteProtocolError) as e:
            bulk.Ticket.from_wire(bad, "peer")
        assert e.value.reason is Reject.BAD_HEADER


# -- the transport ------------------------------------------------------------------------------------
def test_frames_take_the_bulk_channel_when_both_sides_have_one():
    async def main():
        a, b = transport(0), transport(1)
        async with AsyncExitStack() as stack:
            await started(stack, a, b)
            with trio.fail_after(LIMIT_S):
                await b.connect(a.listen_addrs()[0])
                big = 3 * bulk.RECORD_BYTES // 4 + 1     # a frame of several records
                for r in range(3):
                    assert await b.send(a.local_id, _frame(b, r, n=big))
                got = []
                async for sender, frame in a.receive():
                    got.append((sender, frame.round, float(frame.payload[-1]), frame.payload.size))
                    if len(got) == 3:
                        break
            assert got == [(b.local_id, r, float(r), big) for r in range(3)]
            assert a.bulk_peers == [b.local_id]
            assert sum(a.stats.rejected.values()) == 0
            # progress counts what came off the socket: the frames, plus each record's length and tag
            assert a.stats.bytes_arriving > a.stats.bytes_received > 3 * big * 4
    trio.run(main)


@pytest.mark.parametrize("off", ["receiver", "sender"])
def test_without_a_bulk_channel_on_either_side_frames_use_a_libp2p_stream(off):
    async def main():
        a = transport(0, bulk_port=None if off == "receiver" else 0)
        b = transport(1, bulk_port=None if off == "sender" else 0)
        async with AsyncExitStack() as stack:
            await started(stack, a, b)
            with trio.fail_after(LIMIT_S):
                await b.connect(a.listen_addrs()[0])
                assert await b.send(a.local_id, _frame(b, 0))
                sender, frame = await a.receive().__anext__()
            assert (sender, frame.round) == (b.local_id, 0)
            assert a.bulk_peers == []
            assert a.stats.bytes_arriving == a.stats.bytes_received > 0   # a stream carries the frame's bytes alone
    trio.run(main)


def test_an_unreachable_bulk_port_falls_back_to_a_libp2p_stream():
    async def main():
        a, b = transport(0), transport(1)
        async with AsyncExitStack() as stack:
            await started(stack, a, b)
            closed = trio.socket.socket()
            await closed.bind(("127.0.0.1", 0))
            a.bulk_port = closed.getsockname()[1]    # a's tickets now name a port nobody listens on
            with trio.fail_after(LIMIT_S):
                await b.connect(a.listen_addrs()[0])
                assert await b.send(a.local_id, _frame(b, 0))
                sender, frame = await a.receive().__anext__()
            closed.close()
            assert (sender, frame.round) == (b.local_id, 0)
            assert a.bulk_peers == []
            assert a.local_id in b._bulk_unreachable     # not dialled again on the next reconnect
    trio.run(main)


async def _bulk_socket(src, dst, token: bytes | None = None):
    """A raw connection to dst's bulk port with a ticket src asked for (or a made-up token)."""
    ticket = bulk.Ticket.from_wire(await src.request(dst.local_id, {"t": "bulk"}))
    sock = await trio.open_tcp_stream("127.0.0.1", ticket.port)
    await sock.send_all(bulk.MAGIC + (token if token is not None else ticket.token))
    return sock, ticket


def test_bad_bulk_connections_are_counted_and_the_peer_keeps_working():
    async def main():
        victim = transport(0, max_frame_bytes=64 * 1024, stall_timeout_s=0.5)
        attacker = transport(1)
        async with AsyncExitStack() as stack:
            await started(stack, victim, attacker)
            rej = victim.stats.rejected
            with trio.fail_after(LIMIT_S):
                await attacker.connect(victim.listen_addrs()[0])

                # a made-up token is refused
                await _bulk_socket(attacker, victim, token=b"x" * bulk.TOKEN_BYTES)
                await victim.wait_until(lambda: rej[Reject.NOT_ALLOWED.value] == 1)

                # a ticket is single use
                sock, ticket = await _bulk_socket(attacker, victim)
                again = await trio.open_tcp_stream("127.0.0.1", ticket.port)
                await again.send_all(bulk.MAGIC + ticket.token)
                await victim.wait_until(lambda: rej[Reject.NOT_ALLOWED.value] == 2)

                # a forged sender over a valid channel: refused, the connection goes on
                s = bulk.BulkSender(sock, ticket.key, write_timeout_s=5)
                forged = _frame_bytes(ident(7), round_=0)
                await s.send_frame([forged[:8], forged[8:]])
                good = _frame_bytes(ident(1), round_=1)
                await s.send_frame([good[:8], good[8:]])
                sender, frame = await victim.receive().__anext__()
                assert (sender, frame.round) == (attacker.local_id, 1)
                assert rej[Reject.FORGED_SENDER.value] == 1

                # oversize: refused from the prefix record, before any body is read
                await s.send_frame([(1 << 20).to_bytes(4, "big") + b"\0" * 4, b"\0" * 64])
                await victim.wait_until(lambda: rej[Reject.OVERSIZE.value] == 1)

                # stalled mid-frame
                sock2, ticket2 = await _bulk_socket(attacker, victim)
                s2 = bulk.BulkSender(sock2, ticket2.key, write_timeout_s=5)
                await s2.send_frame([good[:8]])             # the prefix, then nothing
                await victim.wait_until(lambda: rej[Reject.STALLED.value] == 1)

                # the normal path still works
                assert await attacker.send(victim.local_id, _frame(attacker, 2))
                sender, frame = await victim.receive().__anext__()
                assert (sender, frame.round) == (attacker.local_id, 2)
            assert dict(rej) == {"not_allowed": 2, "forged_sender": 1, "oversize": 1, "stalled": 1}
    trio.run(main)


def test_a_bulk_ticket_needs_an_accepted_hello():
    async def main():
        a, b = transport(0), transport(1, schema="other")
        async with AsyncExitStack() as stack:
            await started(stack, a, b)
            with trio.fail_after(LIMIT_S):
                with pytest.raises(Exception):  # noqa: B017 -- refused at hello
                    await b.connect(a.listen_addrs()[0])
                reply = await b.request(a.local_id, {"t": "bulk"})
            assert reply["t"] == "error"
            assert a.stats.rejected[Reject.NOT_ALLOWED.value] >= 1
    trio.run(main)


def test_a_receive_buffer_is_reused_only_once_no_view_of_its_payload_is_left():
    import gc

    from p2pfl.peers.libp2p.frame_path import _BufferPool
    pool = _BufferPool(keep=4, max_bytes=1 << 20)
    prefix = _frame_bytes(ident(1), n=1000)
    buf = codec.frame_buffer(prefix[:8], max_frame_bytes=1 << 20, alloc=pool.take)
    buf[8:] = prefix[8:]
    raw = buf.obj
    frame = codec.decode(buf, schema=SCHEMA, max_frame_bytes=1 << 20)
    pool.give_back_after(frame.payload, raw)
    part = frame.payload[10:20]          # a view that outlives the frame
    del frame, buf
    gc.collect()
    assert pool.take(raw.nbytes) is not raw   # still readable through `part`: not handed out
    del part
    gc.collect()
    assert pool.take(raw.nbytes + 1) is not raw   # another size never gets it
    assert pool.take(raw.nbytes) is raw
