"""Libp2pTransport over real loopback TCP (127.0.0.1, port 0): trio's real clock, since libp2p
needs real I/O, but no sleeps: every wait is on a condition (`wait_until`), bounded by fail_after."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import numpy as np
import pytest
import torch
import trio

from p2pfl.errors import Reject
from p2pfl.learn.models import flatten, make_model
from p2pfl.learn.train import TrainConfig
from p2pfl.peers.libp2p import HelloRefused
from p2pfl.peers.peer import Peer, PeerConfig
from p2pfl.testing.transports import LIMIT_S, SETTINGS, started, train_all
from p2pfl.testing.transports import MODEL_SCHEMA as SCHEMA
from p2pfl.testing.transports import frame_bytes as _frame_bytes
from p2pfl.testing.transports import identity as ident
from p2pfl.testing.transports import libp2p_transport as transport
from p2pfl.testing.transports import raw_model_stream as _raw_stream


@pytest.mark.parametrize("q", [1, 3])
def test_three_peers_over_libp2p_converge(q):
    """Q gossip steps per round (DFedSAM-MGS) run over libp2p as Q (round, step) exchanges."""
    g = torch.Generator().manual_seed(0)
    config = PeerConfig(train=TrainConfig(lr=0.2, local_steps=10, batch_size=16), step_timeout_s=20.0,
                        gossip_steps=q)
    rounds = 4

    async def main():
        ts = [transport(i) for i in range(3)]
        async with AsyncExitStack() as stack:
            await started(stack, *ts)
            with trio.fail_after(LIMIT_S):
                await ts[0].connect(ts[1].listen_addrs()[0])
                await ts[0].connect(ts[2].listen_addrs()[0])
                await ts[1].connect(ts[2].listen_addrs()[0])
            peers = []
            for t in ts:
                x = torch.randn(64, 6, generator=g)
                y = (x[:, 0] > 0).long()
                nbrs = {o.local_id: None for o in ts if o is not t}
                peers.append(Peer(make_model("mlp", (6,), 2, hidden=(8,), seed=0), (x, y), transport=t,
                                  neighbors=nbrs, config=config, test_data=(x, y), offload=True))
            events = []
            await train_all(stack, peers, rounds, events.append)
            return peers, events, ts

    peers, events, ts = trio.run(main)
    assert all(p.round == rounds for p in peers)
    # full mesh, uniform weights 1/3, every frame arrived: exact consensus after every round
    assert all(e["received"] == 2 * q and e["missing"] == [] for e in events)
    vecs = [flatten(p.model) for p in peers]
    assert all(torch.allclose(vecs[0], v, atol=1e-5) for v in vecs[1:])
    last = [e["accuracy"] for e in events if e["round"] == rounds - 1]
    assert min(last) > 0.8
    assert all(t.stats.frames_sent == 2 * rounds * q and t.stats.frames_received == 2 * rounds * q for t in ts)
    assert all(not t.stats.rejected for t in ts)


def test_forged_truncated_oversize_and_stalled_frames_are_rejected_and_counted():
    async def main():
        victim = transport(0, max_frame_bytes=64 * 1024, stall_timeout_s=0.5)
        attacker = transport(1)
        async with AsyncExitStack() as stack:
            await started(stack, victim, attacker)
            inbox = victim.receive()

            async def next_frame():
                sender, frame = await inbox.__anext__()
                return sender, frame.round
            rej = victim.stats.rejected
            with trio.fail_after(LIMIT_S):
                await attacker.connect(victim.listen_addrs()[0])

                # 1. forged sender: signed by someone else, sent on the attacker's stream
                s = await _raw_stream(attacker, victim)
                await s.write(_frame_bytes(ident(7), round_=0))
                await s.write(_frame_bytes(ident(1), round_=1))   # the same stream keeps working
                assert await next_frame() == (attacker.local_id, 1)
                assert rej[Reject.FORGED_SENDER.value] == 1

                # 2. truncated: half a frame, then the writer closes its side
                s2 = await _raw_stream(attacker, victim)
                whole = _frame_bytes(ident(1), round_=2)
                await s2.write(whole[: len(whole) // 2])
                await s2.close()
                await victim.wait_until(lambda: rej[Reject.TRUNCATED.value] == 1)

                # 3. oversize: refused after the 4-byte prefix, before the body is read
                s3 = await _raw_stream(attacker, victim)
                await s3.write((1 << 20).to_bytes(4, "big") + b"\0" * 64)
                await victim.wait_until(lambda: rej[Reject.OVERSIZE.value] == 1)

                # 4. stalled mid-frame: the stream is reset after the stall timeout
                s4 = await _raw_stream(attacker, victim)
                await s4.write(whole[:100])
                await victim.wait_until(lambda: rej[Reject.STALLED.value] == 1)

                # the victim still accepts a good frame through the normal path
                from p2pfl.gossip.codec import Frame
                ok = await attacker.send(victim.local_id, Frame("model", attacker.local_id, 3, 0, SCHEMA, "f32",
                                                                np.ones(100, dtype=np.float32)))
                assert ok
                assert await next_frame() == (attacker.local_id, 3)
            assert victim.stats.frames_received == 2
            assert sum(rej.values()) == 4

    trio.run(main)


def test_hello_refuses_a_schema_mismatch_on_both_sides(caplog):
    caplog.set_level(logging.WARNING, logger="p2pfl.peers.libp2p.transport")

    async def main():
        a, b = transport(0), transport(1, schema="0" * 32)
        c = transport(2, settings={**SETTINGS, "gossip_steps": 2})
        async with AsyncExitStack() as stack:
            await started(stack, a, b, c)
            with trio.fail_after(LIMIT_S):
                with pytest.raises(HelloRefused, match="model schema differs"):
                    await b.connect(a.listen_addrs()[0])
                assert a.local_id not in b.peers and b.local_id not in a.peers
                assert "model schema differs" in a.refusals[b.local_id]
                assert "model schema differs" in b.refusals[a.local_id]
                # a config difference names the key
                with pytest.raises(HelloRefused, match="gossip_steps ours 2, theirs 1"):
                    await c.connect(a.listen_addrs()[0])
                # frames from a refused peer never get in
                with pytest.raises(Exception):  # noqa: B017 -- a resets the stream during or after negotiation
                    s = await _raw_stream(b, a)
                    await s.write(_frame_bytes(ident(1)))
                    await s.read(1)
                await a.wait_until(lambda: a.stats.rejected[Reject.NOT_ALLOWED.value] == 1)

    trio.run(main)
    logged = [r.getMessage() for r in caplog.records if "model schema differs" in r.getMessage()]
    assert any("refused hello from" in m for m in logged)     # the responder's side
    assert any("hello with" in m for m in logged)             # the initiator's side


def test_allowlist_disconnects_an_unlisted_peer_and_counts_it():
    async def main():
        a = transport(0, allow={ident(1).peer_id})
        b, c = transport(1), transport(2)
        async with AsyncExitStack() as stack:
            await started(stack, a, b, c)
            with trio.fail_after(LIMIT_S):
                await b.connect(a.listen_addrs()[0])
                with pytest.raises(HelloRefused, match="allowlist"):
                    await c.connect(a.listen_addrs()[0])
                assert a.stats.rejected[Reject.NOT_ALLOWED.value] == 1
                assert set(a.peers) == {b.local_id}

    trio.run(main)


def test_peer_exchange_tells_a_newcomer_about_known_peers():
    async def main():
        a, b, c = transport(0), transport(1), transport(2)
        async with AsyncExitStack() as stack:
            await started(stack, a, b, c)
            with trio.fail_after(LIMIT_S):
                await b.connect(a.listen_addrs()[0])
                _, hello = await c.connect(a.listen_addrs()[0])
                assert any(p.endswith(b.local_id) for p in hello.peers)
                addr = next(p for p in hello.peers if p.endswith(b.local_id))
                peer, _ = await c.connect(addr)
                assert peer == b.local_id

    trio.run(main)


def test_private_network_key_admits_only_holders_of_the_key():
    key, other = "ab" * 32, "cd" * 32

    async def main():
        a, b, c = transport(0, psk=key), transport(1, psk=key), transport(2, psk=other)
        async with AsyncExitStack() as stack:
            await started(stack, a, b, c)
            with trio.fail_after(LIMIT_S):
                peer, _ = await b.connect(a.listen_addrs()[0])
                assert peer == a.local_id
            c.dial_timeout_s = 3
            with trio.fail_after(LIMIT_S), pytest.raises(ConnectionError):
                await c.connect(a.listen_addrs()[0])

    trio.run(main)
