"""`TransportCore`: the state both paths of the libp2p transport share, and the bookkeeping they
do with it: waking waiters, counting rejections, throttling warnings, naming our own addresses.

Theory of operation
-------------------
The bottom layer of `Libp2pTransport` (the layers: transport.py). It declares what more than one
layer reads or writes: who we are, the libp2p host, the accepted peers and their latest hello, the
counters, the nursery that runs the transport's tasks, and the bulk tickets that the control path
hands out and the frame path redeems; each layer above declares the state only it works on, and
`Libp2pTransport.__init__` assigns all of it. Whatever a caller may wait on (a frame, a rejection,
a send result, a hello, a link) calls `_notify`, which wakes every `wait_until` to re-check its
predicate: no wait polls. Warnings about what a peer did go through one `LogThrottle` keyed by
(peer, what), so a peer that repeats itself cannot flood the log. Every layer logs through the one
logger `log` below, named `p2pfl.peers.libp2p.transport` whichever module the line comes from: the
transport is one object, and log settings and tests select it by that name.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from p2pfl.errors import Reject
from p2pfl.gossip.identity import Identity
from p2pfl.peers.libp2p.control import Hello
from p2pfl.peers.transport import LogThrottle, TransportStats

log = logging.getLogger("p2pfl.peers.libp2p.transport")

ControlHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class TransportCore:
    """The shared state of a `Libp2pTransport` and its bookkeeping (not usable on its own)."""

    identity: Identity
    hello_template: Hello           # our side of the hello; its round/peers/addrs are filled in per exchange
    host: Any                       # the py-libp2p host (host.make_host)
    dial_timeout_s: float
    stats: TransportStats
    peers: dict[str, Hello]         # accepted peers: their latest hello
    bulk_port: int | None           # our bulk channel's port, the bound one once listening (None: no bulk channel)
    _bulk_tickets: dict[bytes, tuple[str, bytes]]   # token -> (peer, key), single use
    _bulk_issued: dict[str, bytes]                  # peer -> its one outstanding token
    _nursery: trio.Nursery | None   # runs the transport's tasks while it is entered
    _activity: trio.Event
    _throttle: LogThrottle

    def _notify(self) -> None:
        self._activity.set()
        self._activity = trio.Event()

    def _warn(self, peer: str, what: str, msg: str, *args: Any) -> None:
        self._throttle.warning((peer, what), msg, *args)

    def _reject(self, reason: Reject) -> None:
        self.stats.reject(reason)
        self._notify()

    def notify(self) -> None:
        """Wake `wait_until` waiters: something they wait on changed outside the transport (a link)."""
        self._notify()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (no polling) until `predicate()` holds; it is re-checked whenever a frame, a
        rejection, a send result or a hello is recorded. Bound it with trio.fail_after."""
        while not predicate():
            await self._activity.wait()

    @property
    def local_id(self) -> str:
        return self.identity.peer_id

    def listen_addrs(self) -> list[str]:
        """Every address we listen on, with /p2p/<our id>; a wildcard 0.0.0.0 is spelled out as
        every IPv4 address of this machine's interfaces, loopback last: a peer on another machine
        dials them in order, and one on this machine still finds the loopback one."""
        out: list[str] = []
        for a in map(str, self.host.get_addrs()):
            if a.startswith("/ip4/0.0.0.0/"):
                out.extend(a.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in interface_ipv4())
            else:
                out.append(a)
        return list(dict.fromkeys(out))


_SIOCGIFADDR = 0x8915   # Linux: an interface's (primary) IPv4 address


def interface_ipv4() -> list[str]:
    """This machine's IPv4 addresses, link-local ones left out, loopback last. On Linux, every
    interface's address (a machine's host name often resolves to 127.0.0.1 only, or to one of
    several interfaces); elsewhere, what the host name resolves to."""
    ips: list[str] = []
    try:
        import fcntl
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    req = struct.pack("256s", name.encode()[:15])
                    ips.append(socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24]))
                except OSError:   # no IPv4 address on this interface (or it went away meanwhile)
                    continue
    except (ImportError, OSError, AttributeError):   # not Linux: no SIOCGIFADDR
        pass
    try:
        ips += [str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    return order_addresses([*ips, "127.0.0.1"])


def order_addresses(ips: list[str]) -> list[str]:
    """Distinct addresses, link-local and unspecified ones out, loopback last (stable otherwise)."""
    keep = []
    for ip in dict.fromkeys(ips):
        a = ipaddress.ip_address(ip)
        if not (a.is_link_local or a.is_unspecified or a.is_multicast):
            keep.append((a.is_loopback, ip))
    return [ip for _, ip in sorted(keep, key=lambda k: k[0])]


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f": {cause}"
    return text.splitlines()[0][:200] if text else type(e).__name__
