"""`ControlPath`: the libp2p transport's side of the control protocol: hellos and refusals,
control requests, accepting peers, the control stream handler, bulk tickets.

Theory of operation
-------------------
Control (`/p2pfl/ctl/1`, see control.py) runs one request/reply per stream. A peer may open model
streams only after its hello was accepted (version, schema, config digest, allowlist); anything
else is reset and counted as NOT_ALLOWED, so frames from a refused or unlisted peer never reach
the round loop. Verified peers' addresses are kept in the peerstore with ttl 0 (py-libp2p expires
them after 120 s otherwise).

Both sides of a hello run the same check: `hello` (we dial) compares the reply with ours, and
`_answer` (they dial) compares theirs with ours and replies with our hello or a refusal that names
the reason only; an accepted hello goes into `peers` and to `on_hello`, a failed one into
`refusals`. Any other request from a peer without an accepted hello gets "say hello first". A
`bulk` request is answered here with a fresh single-use ticket for our bulk port (bulk.py), which
the frame path redeems when the peer connects to it; other requests (`link`) go to `on_control`
(the node). A refused peer that is not on our allowlist is disconnected once its control stream
is done.

This is the second layer of `Libp2pTransport` (transport.py): it builds on core.py, and the frame
path (frame_path.py) builds on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import multiaddr  # type: ignore[import-untyped]
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pfl.errors import ConfigError, Reject, RemoteProtocolError, printable
from p2pfl.peers.libp2p import bulk, control
from p2pfl.peers.libp2p.control import Hello
from p2pfl.peers.libp2p.core import ControlHandler, TransportCore, _reason, log
from p2pfl.peers.libp2p.host import EndOfStream, read_exact

CONTROL_PROTOCOL = TProtocol("/p2pfl/ctl/1")


class HelloRefused(Exception):
    """The remote peer refused us at hello, or we refused its reply; the text names the reason."""


class ControlPath(TransportCore):
    """Hellos, control requests and bulk tickets of a `Libp2pTransport` (not usable on its own)."""

    round: int                      # ours and our degree, sent in every hello: the node keeps these two current
    degree: int
    allow: frozenset[str] | None    # peer IDs that may talk to us (None: anyone compatible)
    refusals: dict[str, str]        # peer -> why the last hello failed
    _reached: dict[str, str]        # peer -> the address we reached it at, or saw it come from
    on_hello: Callable[[str, Hello], None]
    on_control: ControlHandler | None

    def local_hello(self, exclude: str | None = None) -> Hello:
        peers: list[str] = []
        for pid, h in self.peers.items():
            if pid != exclude:
                peers.extend(a if "/p2p/" in a else f"{a}/p2p/{pid}" for a in h.addrs[:4])
        return replace(self.hello_template, round=self.round, degree=self.degree, addrs=tuple(self.listen_addrs()[:control.MAX_ADDRS]),
                       peers=tuple(peers[:control.MAX_PEERS]))

    async def connect(self, addr: str) -> tuple[str, Hello]:
        """Dial `addr` (a multiaddr ending in /p2p/<id>) and exchange hellos. Returns the remote
        peer ID and its hello; raises HelloRefused, or OSError-like `ConnectionError` if unreachable."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as e:
            raise ConfigError(f"bad peer address {addr!r}: {e} (expected /ip4/A/tcp/P/p2p/12D3KooW...)") from None
        peer = str(info.peer_id)
        if peer == self.local_id:
            raise ConfigError(f"address {addr} is our own peer ID")
        # py-libp2p refuses for 60 s to dial a peer whose addresses all failed once; our callers
        # pace their own dials (backoff, peer-exchange budgets) and try a peer's next address at once
        self.host.get_network().unblock_peer(info.peer_id)
        # py-libp2p dials only the first TCP address it knows of a peer: make it this one
        self.host.get_peerstore().clear_addrs(info.peer_id)
        try:
            with trio.fail_after(self.dial_timeout_s):
                await self.host.connect(info)
        except Exception as e:  # libp2p raises SwarmException and friends
            raise ConnectionError(_reason(e)[:100]) from None
        self._reached[peer] = addr if "/p2p/" in addr else f"{addr}/p2p/{peer}"
        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 0)
        return peer, await self.hello(peer)

    async def hello(self, peer: str) -> Hello:
        """(Re-)exchange hellos with a connected or known peer; on success it is an accepted peer."""
        ours = self.local_hello(exclude=peer)
        try:
            reply = await self.request(peer, ours.to_wire())
            refused = control.refusal_reason(reply, peer)
            theirs = Hello.from_wire(reply, peer) if refused is None else None
        except RemoteProtocolError as e:
            self._reject(e.reason)
            raise HelloRefused(f"{peer}: bad hello reply: {e}") from None
        problem: str | None
        if theirs is None or theirs.refused is not None:   # (a hello with `refused` set: an older peer's refusal)
            problem, who = refused or printable(theirs.refused if theirs else ""), "refused us"
        else:
            problem, who = control.incompatibility(ours, theirs), "was refused"   # named from our side
        if problem is None and self.allow is not None and peer not in self.allow:
            self._reject(Reject.NOT_ALLOWED)
            problem = "not on our allowlist"
        if problem is not None:
            self.peers.pop(peer, None)
            self._reached.pop(peer, None)
            self.refusals[peer] = problem
            self._warn(peer, "hello", "%s: hello with %s failed (%s): %s", self.local_id, peer, who, problem)
            raise HelloRefused(f"peer {peer} {who}: {problem}")
        assert theirs is not None   # a reply that holds no hello always names a problem
        self._accept(peer, theirs)
        return theirs

    async def request(self, peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        """One control request/reply on a fresh stream."""
        return (await self._request(peer, msg))[0]

    async def _request(self, peer: str, msg: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """`request`, plus the remote host the stream's connection goes to."""
        stream = None
        try:
            with trio.fail_after(self.dial_timeout_s):
                stream = await self.host.new_stream(ID.from_base58(peer), [CONTROL_PROTOCOL])
                await stream.write(control.pack(msg))
                reply = await _read_control(stream, peer)
            remote = stream.get_remote_address()
            await stream.close()
            return reply, (str(remote[0]) if remote else None)
        except RemoteProtocolError:
            if stream is not None:
                await stream.reset()
            raise
        except (Exception, trio.TooSlowError) as e:
            if stream is not None:
                await stream.reset()
            raise ConnectionError(f"control request to {peer} failed: {_reason(e)}") from None

    def _accept(self, peer: str, hello: Hello) -> None:
        reached = self._reached.get(peer)
        if reached is not None:   # the address that answered (or that it came from) first: others may not route
            hello = replace(hello, addrs=tuple(dict.fromkeys((reached, *hello.addrs)))[:control.MAX_ADDRS])
        self.peers[peer] = hello
        self.refusals.pop(peer, None)
        addrs = []
        for a in hello.addrs:
            try:
                m = multiaddr.Multiaddr(a)
                addrs.append(m.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer}")) if "/p2p/" in a else m)
            except Exception:
                continue
        if addrs:
            self.host.get_peerstore().clear_addrs(ID.from_base58(peer))   # in this order: see `connect`
            self.host.get_peerstore().add_addrs(ID.from_base58(peer), addrs, 0)
        self.on_hello(peer, hello)
        self._notify()

    async def _control_handler(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(self.dial_timeout_s):
                msg = await _read_control(stream, peer)
                reply = await self._answer(peer, msg, stream)
                await stream.write(control.pack(reply))
            await stream.close()
        except RemoteProtocolError as e:
            self._reject(e.reason)
            await stream.reset()
        except EndOfStream as e:   # the other side closed or went away mid-request: routine at shutdown
            log.info("%s: control stream from %s ended: %s", self.local_id, peer, e)
            await stream.reset()
        except (Exception, trio.TooSlowError) as e:
            self._warn(peer, "control", "%s: control stream from %s failed: %s", self.local_id, peer,
                       printable(_reason(e), 200))
            await stream.reset()
        if peer in self.refusals and self.allow is not None and peer not in self.allow and self._nursery:
            self._nursery.start_soon(self._disconnect, peer)

    async def _answer(self, peer: str, msg: dict[str, Any], stream: Any) -> dict[str, Any]:
        if msg["t"] == "hello":
            theirs = Hello.from_wire(msg, peer)
            ours = self.local_hello(exclude=peer)
            if self.allow is not None and peer not in self.allow:
                self._reject(Reject.NOT_ALLOWED)
                problem: str | None = "not on the allowlist"
                reason = problem
            else:
                problem = control.incompatibility(ours, theirs)
                reason = control.incompatibility(theirs, ours)   # the same difference, in the other side's words
            if problem is not None:
                self.peers.pop(peer, None)
                self._reached.pop(peer, None)
                self.refusals[peer] = problem
                self._warn(peer, "refused", "%s: refused hello from %s: %s", self.local_id, peer, problem)
                return control.refusal(reason or problem)
            remote = stream.get_remote_address()   # a peer listening on 0.0.0.0 is reachable where it came from
            if remote:
                theirs = replace(theirs, addrs=tuple(a.replace("/ip4/0.0.0.0/", f"/ip4/{remote[0]}/")
                                                     for a in theirs.addrs))
                observed = _observed(str(remote[0]), theirs.addrs, peer)
                if observed is not None:
                    self._reached[peer] = observed
            self._accept(peer, theirs)
            return ours.to_wire()
        if peer not in self.peers:
            self._reject(Reject.NOT_ALLOWED)
            return {"t": "error", "error": "say hello first"}
        if msg["t"] == "bulk":
            return self._issue_ticket(peer).to_wire()
        if self.on_control is None:
            return {"t": "error", "error": f"unknown request {msg['t']!r}"}
        return await self.on_control(peer, msg)

    async def _disconnect(self, peer: str) -> None:
        with trio.move_on_after(self.dial_timeout_s):
            try:
                await self.host.disconnect(ID.from_base58(peer))
            except Exception as e:
                log.debug("%s: disconnect %s: %s", self.local_id, peer, _reason(e))

    def _issue_ticket(self, peer: str) -> bulk.Ticket:
        """A fresh single-use ticket for `peer`, replacing any it did not use."""
        if self.bulk_port is None:
            return bulk.Ticket(0)
        self._bulk_tickets.pop(self._bulk_issued.pop(peer, b""), None)
        ticket = bulk.Ticket.issue(self.bulk_port)
        self._bulk_tickets[ticket.token] = (peer, ticket.key)
        self._bulk_issued[peer] = ticket.token
        return ticket


def _observed(ip: str, addrs: tuple[str, ...], peer: str) -> str | None:
    """The address a dialer is seen from: its connection's IP with the port it listens on (the
    first TCP port it advertises), which we can route to even when the interface addresses it
    lists are not all reachable from here. None if it advertises no TCP port."""
    for a in addrs:
        parts = a.split("/")
        if len(parts) >= 5 and parts[3] == "tcp" and parts[4].isdigit():
            proto = "ip6" if ":" in ip else "ip4"
            return f"/{proto}/{ip}/tcp/{parts[4]}/p2p/{peer}"
    return None


async def _read_control(stream: Any, peer: str) -> dict[str, Any]:
    prefix = bytearray(4)
    await read_exact(stream, memoryview(prefix), None)
    body = bytearray(control.body_length(bytes(prefix), peer))
    await read_exact(stream, memoryview(body), None)
    return control.unpack(bytes(body), peer)
