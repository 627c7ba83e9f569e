"""Peer-exchange address poisoning: which addresses a node dials, and how many, from hostile hellos."""

from __future__ import annotations

from p2pfl.gossip.identity import Identity
from p2pfl.peers.exchange import DialPolicy, parse

ME = Identity.generate(b"\x01" * 32).peer_id
IDS = [Identity.generate(i.to_bytes(2, "big") * 16).peer_id for i in range(2, 60)]


def loopback_node(**kw) -> DialPolicy:
    return DialPolicy(ME, ["/ip4/127.0.0.1/tcp/4001/p2p/" + ME], **kw)


def test_own_dns_out_of_scope_and_malformed_addresses_are_skipped():
    lan = DialPolicy(ME, ["/ip4/0.0.0.0/tcp/4001"])
    addrs = [
        f"/ip4/127.0.0.1/tcp/4001/p2p/{IDS[0]}",     # our own listener under a fake ID
        f"/ip4/10.0.0.7/tcp/4001/p2p/{ME}",          # our own ID
        f"/dns4/evil.example/tcp/4001/p2p/{IDS[1]}",  # a name the liar chose
        f"/ip4/127.0.0.1/tcp/9/p2p/{IDS[2]}",        # loopback, from a node on a real interface
        f"/ip4/169.254.1.1/tcp/9/p2p/{IDS[3]}",      # link-local
        f"/ip4/0.0.0.0/tcp/9/p2p/{IDS[4]}",          # unspecified
        "/ip4/10.0.0.9/tcp/9",                       # no peer ID
        "/ip4/10.0.0.9/tcp/0/p2p/x",                 # port 0
        "garbage\n/round 999",
        f"/ip4/10.0.0.8/tcp/4001/p2p/{IDS[5]}",      # the only good one
    ]
    assert lan.pick("liar", addrs, 0.0, set()) == [(addrs[-1], IDS[5])]
    assert lan.skipped == {"own": 2, "dns": 1, "scope": 3, "malformed": 3}
    # a loopback-only node (a test, a simulation) dials loopback only
    local = loopback_node()
    assert local.pick("liar", [f"/ip4/10.0.0.8/tcp/4001/p2p/{IDS[5]}"], 0.0, set()) == []
    assert local.skipped == {"scope": 1}


def test_dns_names_are_opt_in():
    lan = DialPolicy(ME, ["/ip4/0.0.0.0/tcp/4001"], allow_dns=True)
    addr = f"/dns4/peer.example/tcp/4001/p2p/{IDS[1]}"
    assert lan.pick("p", [addr], 0.0, set()) == [(addr, IDS[1])]
    assert parse("/dns4/peer.example/tcp/4001") is None   # not without the opt-in


def test_dials_are_budgeted_per_hello_per_sender_and_in_all():
    node = loopback_node(per_hello=8, sender_burst=16, burst=20, rate_per_s=1.0)
    hello = [f"/ip4/127.0.0.{2 + i % 200}/tcp/{1000 + i}/p2p/{IDS[i]}" for i in range(32)]
    first = node.pick("liar", hello, 0.0, set())
    assert len(first) == 8                                     # one hello: at most per_hello
    total = len(first) + sum(len(node.pick("liar", hello, 0.0, {p for _, p in first})) for _ in range(39))
    assert total == 16                                         # 40 hellos from one sender: its burst
    others = sum(len(node.pick(f"s{i}", hello[16:], 0.0, set())) for i in range(10))
    assert total + others == 20                                # everyone together: the global burst
    # the same target is not redialled within the cooldown, even when named again
    assert node.pick("s99", hello[:1], 30.0, set()) == []
    assert node.skipped["cooldown"] >= 1
    # time refills the buckets
    assert len(node.pick("liar", hello[20:], 20_000.0, set())) == 8
