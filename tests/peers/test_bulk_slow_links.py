"""A slow link is not a stalled one (bulk.py): the bulk channel times the progress of bytes, not
whole 1 MiB records. The sockets here are stand-ins that move a few KiB per virtual interval of
trio's MockClock, so a record takes minutes of virtual time and no test waits for real."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pfl.peers.libp2p import bulk

KEY = bytes(range(32))
STALL_S = 5.0


class _Wire:
    """Accepts what a BulkSender writes (`.socket.send`), `per_call` bytes a call, every `every_s`."""

    def __init__(self, per_call: int, every_s: float) -> None:
        self.data = bytearray()
        self.per_call, self.every_s = per_call, every_s
        self.socket = self

    async def send(self, view: memoryview) -> int:
        await trio.sleep(self.every_s)     # virtual time (MockClock)
        n = min(self.per_call, view.nbytes)
        self.data += view[:n]
        return n


class _Trickle:
    """A socket that hands out `data` `per_call` bytes at a time, one call every `every_s`; after
    `stop_after` bytes it goes silent (a peer that stalls), at the end it reports EOF."""

    def __init__(self, data: bytes, per_call: int, every_s: float, stop_after: int | None = None) -> None:
        self.data, self.per_call, self.every_s, self.stop_after = memoryview(data), per_call, every_s, stop_after
        self.pos, self.last_byte_at = 0, 0.0

    async def recv_into(self, view: memoryview) -> int:
        if self.stop_after is not None and self.pos >= self.stop_after:
            await trio.sleep_forever()
        await trio.sleep(self.every_s)
        n = min(self.per_call, view.nbytes, len(self.data) - self.pos)
        view[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        self.last_byte_at = trio.current_time()
        return n


def _sealed(payload: bytes) -> bytes:
    """The records of one frame (prefix + payload) as a BulkSender writes them."""
    wire = _Wire(per_call=1 << 30, every_s=0)

    async def seal() -> None:
        sender = bulk.BulkSender(wire, KEY, write_timeout_s=STALL_S)   # type: ignore[arg-type]
        await sender.send_frame([b"\x00" * 8, payload])

    trio.run(seal)
    return bytes(wire.data)


def test_a_record_trickling_in_for_minutes_arrives_whole():
    payload = bytes(range(256)) * (bulk.RECORD_BYTES // 256)     # one full 1 MiB record
    sealed = _sealed(payload)
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        # 16 KiB every 4 s: ~4.3 minutes for the record, yet never 5 s without a byte
        reader = bulk.BulkReader(_Trickle(sealed, 16 << 10, 4.0), KEY, STALL_S, "peer")   # type: ignore[arg-type]
        out = bytearray(8 + len(payload))
        start = trio.current_time()
        await reader.read_exact(memoryview(out), None)
        assert trio.current_time() - start > 50 * STALL_S          # 50 stall timeouts: really slow
        assert bytes(out[8:]) == payload

    trio.run(main, clock=clock)


def test_a_record_that_stops_arriving_is_still_a_stall():
    payload = bytes(300_000)
    sealed = _sealed(payload)
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        trickle = _Trickle(sealed, 16 << 10, 1.0, stop_after=100_000)
        reader = bulk.BulkReader(trickle, KEY, STALL_S, "peer")   # type: ignore[arg-type]
        out = bytearray(8 + len(payload))
        with pytest.raises(trio.TooSlowError):
            await reader.read_exact(memoryview(out), None)
        assert trio.current_time() - trickle.last_byte_at == STALL_S   # cut STALL_S after the last byte

    trio.run(main, clock=clock)


@pytest.mark.parametrize(("every_s", "ok"), [(4.0, True), (STALL_S + 1, False)])
def test_a_sender_on_a_slow_link_waits_for_progress_not_for_whole_records(every_s, ok):
    """1 KiB leaves every `every_s`: slower than 1 MiB per write timeout but never stalled is
    sent; no byte within the timeout fails."""
    wire = _Wire(per_call=1 << 10, every_s=every_s)
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        sender = bulk.BulkSender(wire, KEY, write_timeout_s=STALL_S)   # type: ignore[arg-type]
        if ok:
            await sender.send_frame([b"\x00" * 8, bytes(40_000)])
            assert len(wire.data) == 2 * (4 + 16) + 8 + 40_000    # two records: prefix, payload
        else:
            with pytest.raises(trio.TooSlowError):
                await sender.send_frame([b"\x00" * 8, bytes(40_000)])

    trio.run(main, clock=clock)
