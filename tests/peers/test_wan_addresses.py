"""Addresses that reach across machines: a peer listening on 0.0.0.0 advertises every interface's
address (loopback last), refuses to dial any of them, and a peer-exchange dial goes on to a peer's
next address when the first does not answer. Real libp2p on this machine's interfaces; every wait
is bounded by fail_after."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trio

from p2pfl.files import save_identity
from p2pfl.gossip.identity import Identity
from p2pfl.peers.exchange import DialPolicy
from p2pfl.peers.libp2p import Hello, Libp2pTransport
from p2pfl.peers.libp2p.core import interface_ipv4, order_addresses
from p2pfl.peers.node import Node
from p2pfl.peers.settings import PeerSettings

LIMIT_S = 30


def ident(i: int) -> Identity:
    return Identity.generate(bytes([i + 7]) * 32)


@pytest.mark.parametrize(("given", "expected"), [
    (["127.0.0.1", "10.0.0.2", "192.0.2.7"], ["10.0.0.2", "192.0.2.7", "127.0.0.1"]),
    (["127.0.0.1", "169.254.3.4", "0.0.0.0", "10.0.0.2", "10.0.0.2"], ["10.0.0.2", "127.0.0.1"]),
    (["127.0.1.1", "127.0.0.1"], ["127.0.1.1", "127.0.0.1"]),
])
def test_addresses_are_ordered_loopback_last_without_link_local(given, expected):
    assert order_addresses(given) == expected


def test_interface_addresses_end_with_loopback():
    ips = interface_ipv4()
    assert ips[-1] == "127.0.0.1"
    assert ips == order_addresses(ips)


def test_a_wildcard_listener_advertises_every_interface_loopback_last():
    t = Libp2pTransport(ident(0), Hello(schema="s", settings={}), listen=("/ip4/0.0.0.0/tcp/0",), bulk_port=None)

    async def main() -> None:
        async with t:
            addrs = t.listen_addrs()
            hosts = [a.split("/")[2] for a in addrs]
            assert hosts == interface_ipv4()
            assert hosts[-1] == "127.0.0.1"
            assert all(a.endswith(f"/p2p/{t.local_id}") for a in addrs)
            assert len({a.split("/")[4] for a in addrs}) == 1          # one port, every interface
            assert list(t.local_hello().addrs) == addrs                # what the hello carries
            # and none of them may be dialled by us, under our ID or anyone else's
            policy = DialPolicy(t.local_id, addrs)
            other = ident(1).peer_id
            liar = [a.replace(t.local_id, other) for a in addrs]
            assert policy.pick("liar", liar, now=0.0, known=set()) == []
            assert policy.skipped["own"] == len(addrs)

    trio.run(main)


def test_own_interface_addresses_are_refused_and_a_peers_others_are_alternatives():
    me, other = ident(0).peer_id, ident(1).peer_id
    own = [f"/ip4/{ip}/tcp/4001/p2p/{me}" for ip in ("192.0.2.2", "10.1.0.5", "127.0.0.1")]
    policy = DialPolicy(me, own)
    offered = [f"/ip4/10.1.0.5/tcp/4001/p2p/{other}",          # our own address, another ID: refused
               f"/ip4/10.9.0.1/tcp/4001/p2p/{other}",
               f"/ip4/10.9.1.1/tcp/4001/p2p/{other}",
               f"/ip4/127.0.0.1/tcp/4002/p2p/{other}"]          # out of scope for a peer on real interfaces
    assert policy.pick("x", offered, now=0.0, known=set()) == [(offered[1], other)]
    assert policy.alternatives(other, offered) == offered[1:3]
    assert policy.skipped == {"own": 1, "scope": 1}


def test_a_peer_exchange_dial_goes_on_to_the_next_address(tmp_path: Path, caplog):
    """The first address of C does not answer (a closed port, as an interface we cannot route to
    would): B logs it at WARNING and reaches C at its second address."""
    key = tmp_path / "b.key"
    save_identity(ident(2), key)
    b = Node(PeerSettings(out=str(tmp_path / "b"), key=str(key), listen=("/ip4/127.0.0.1/tcp/0",), device="cpu",
                          rounds=1), report=lambda line: None)
    c = Libp2pTransport(ident(3), b.transport.hello_template, listen=("/ip4/127.0.0.1/tcp/0",))
    with socket.socket() as s:       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]

    async def main() -> None:
        async with b.transport, c:
            dead = f"/ip4/127.0.0.1/tcp/{closed}/p2p/{c.local_id}"
            b.dialing.add(c.local_id)
            with trio.fail_after(LIMIT_S):
                await b._dial_once([dead, c.listen_addrs()[0]], c.local_id)
            assert c.local_id in b.transport.peers
            assert c.local_id not in b.dialing

    with caplog.at_level(logging.WARNING, logger="p2pfl.peers.node"):
        trio.run(main)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cannot reach" in m and str(closed) in m for m in warned), warned
