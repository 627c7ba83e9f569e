"""The control protocol's parsers are total, refusals say only why, and what a peer says is escaped
and throttled before it reaches a log. Plain values, plus real loopback libp2p for the replies."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import msgpack
import pytest
import trio

from p2pfl.errors import Reject, RemoteProtocolError, printable
from p2pfl.peers.libp2p import Hello, HelloRefused, bulk, control
from p2pfl.peers.transport import LogThrottle
from p2pfl.testing.transports import LIMIT_S, SETTINGS, started
from p2pfl.testing.transports import MODEL_SCHEMA as SCHEMA
from p2pfl.testing.transports import libp2p_transport as transport

HELLO = Hello(schema=SCHEMA, settings=SETTINGS, round=3, addrs=("/ip4/127.0.0.1/tcp/1",)).to_wire()


@pytest.mark.parametrize("msg", [
    {**HELLO, b"t": "hello"},                        # a bytes key beside the str ones (used to raise TypeError)
    {**HELLO, 7: 1},
    {**HELLO, "v": True},                             # a bool is not a version
    {**HELLO, "settings": {b"k": 1}},
    {**HELLO, "settings": {"k": "x" * 10_000}},
    {**HELLO, "peers": ["/ip4/1.2.3.4/tcp/1"] * (control.MAX_PEERS + 1)},
    {**HELLO, "addrs": ["a" * (control.MAX_ADDR_CHARS + 1)]},
    {**HELLO, "degree": -1},
    {**HELLO, "round": 1.5},
    {**HELLO, "schema": "s" * 200_000},
])
def test_a_bad_hello_is_one_counted_refusal(msg):
    with pytest.raises(RemoteProtocolError) as e:
        Hello.from_wire(msg, "liar")
    assert e.value.reason is Reject.BAD_HEADER and len(str(e.value)) < 400


@pytest.mark.parametrize("msg", [
    {"t": "bulk", "port": 1, "token": b"x" * 16, "key": b"k" * 32, b"extra": 1},
    {"t": "bulk", "port": True, "token": b"", "key": b""},
    {"t": "bulk", "port": 70_000, "token": b"", "key": b""},
])
def test_a_bad_ticket_is_a_refusal(msg):
    with pytest.raises(RemoteProtocolError):
        bulk.Ticket.from_wire(msg, "liar")


def test_control_messages_need_str_keys():
    with pytest.raises(RemoteProtocolError, match="str keys"):
        control.unpack(msgpack.packb({"t": "link", b"x": 1}), "liar")
    assert control.unpack(msgpack.packb({"t": "link"}), "p") == {"t": "link"}


def test_peer_supplied_text_cannot_forge_or_flood_a_log_line():
    forged = "ok\nround 999/999 done\r\x1b[2K" + "x" * 200_000
    text = printable(forged)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and len(text) < 200
    ours = Hello(schema=SCHEMA, settings={"a": 1})
    theirs = Hello(schema=SCHEMA, settings={"a": forged[:250], **{f"k{i}": i for i in range(50)}})
    problem = control.incompatibility(ours, theirs)
    assert problem is not None and "\n" not in problem and len(problem) < 1000
    assert control.refusal(problem)["reason"] == problem[:control.MAX_TEXT_CHARS]


def test_repeated_warnings_are_throttled_per_key_and_in_all(caplog):
    caplog.set_level(logging.WARNING)
    throttle = LogThrottle(logging.getLogger("t"), period_s=3600, burst=5)
    for _ in range(100):
        throttle.warning(("liar", "refused"), "refused %s", "liar")
    assert len(caplog.records) == 1
    for i in range(100):   # fresh identities: the overall burst still holds
        throttle.warning((f"id{i}", "refused"), "refused %s", i)
    assert len(caplog.records) == 5


def test_a_refused_outsider_learns_only_the_reason():
    """With an allowlist, the refusal reply is the reason: no schema, settings, round, addresses or peers."""
    async def main():
        member, outsider = transport(0, allow=set()), transport(1)
        seen = {}
        request = outsider.request

        async def spy(peer, msg):
            seen["reply"] = reply = await request(peer, msg)
            return reply

        outsider.request = spy
        async with AsyncExitStack() as stack:
            await started(stack, member, outsider)
            with trio.fail_after(LIMIT_S), pytest.raises(HelloRefused, match="not on the allowlist"):
                await outsider.connect(member.listen_addrs()[0])
        return seen["reply"]

    reply = trio.run(main)
    assert reply == {"t": "refused", "v": control.PROTOCOL_VERSION, "reason": "not on the allowlist"}


def test_a_hello_reply_with_a_bytes_key_is_counted_not_fatal():
    """The liar answers our hello with a map holding a bytes key: we count it and refuse the peer
    (this used to raise TypeError through the node's refresh and end the process)."""
    async def main():
        honest, liar = transport(0), transport(1)
        answer = liar._answer

        async def lying_answer(peer, msg, stream):
            return {**(await answer(peer, msg, stream)), b"t": "x"}

        liar._answer = lying_answer
        async with AsyncExitStack() as stack:
            await started(stack, honest, liar)
            with trio.fail_after(LIMIT_S):
                with pytest.raises(HelloRefused, match="bad hello reply"):
                    await honest.connect(liar.listen_addrs()[0])
                with pytest.raises(HelloRefused):
                    await honest.hello(liar.local_id)   # the node's 5 s re-hello: the same, again
        return honest

    honest = trio.run(main)
    assert honest.stats.rejected[Reject.BAD_HEADER.value] == 2
    assert not honest.peers
