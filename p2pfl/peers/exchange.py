"""Which peer-exchange addresses a node dials, and how fast (sans-IO: the caller passes the time).

Theory of operation: every accepted hello lists up to 32 addresses of peers its sender knows. A liar
can fill them with anything, so an address is dialled only if it
- has the one shape we advertise ourselves, `/ip4|ip6/HOST/tcp/PORT/p2p/ID` (DNS names `/dns*/` only
  when the user opted in: resolving a name a peer chose leaks that we are reading its hellos, and
  points our resolver wherever the liar likes);
- is not ours (our peer ID, or one of the host:port pairs we listen on, under any ID);
- is in our scope: a node that listens on loopback only dials loopback (it is a test or a simulation
  on one machine), and a node on a real interface never dials loopback, unspecified, link-local or
  multicast addresses (a peer must not turn us into a scanner of our own machine);
- fits the budgets: at most `per_hello` dials from one hello, a token bucket per sender (`sender_burst`,
  refilled every `sender_refill_s`), a global token bucket (`burst`, `rate_per_s`), and one dial per
  target peer ID every `cooldown_s`.
What is skipped is counted by reason in `skipped`; nothing is queued (the next hello brings the
addresses again, so a dropped address costs at most a refresh period).
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

_DNS = ("dns", "dns4", "dns6")
_MAX_TRACKED = 4096   # senders and targets remembered (identities are cheap to mint: the oldest are forgotten)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class DialPolicy:
    own_id: str
    own_addrs: Iterable[str]
    allow_dns: bool = False
    per_hello: int = 8
    sender_burst: int = 16
    sender_refill_s: float = 30.0
    burst: int = 16
    rate_per_s: float = 2.0
    cooldown_s: float = 60.0
    skipped: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        own = [parse(a) for a in self.own_addrs]
        self._own_endpoints = {(h, p) for h, p, _ in filter(None, own)}
        hosts = [h for h, _, _ in filter(None, own)]
        self._loopback_only = bool(hosts) and all(_is_loopback(h) for h in hosts)
        self._own_ports = {p for h, p, _ in filter(None, own) if _is_unspecified(h)}
        self._global = _Bucket(float(self.burst), -1e18)
        self._senders: OrderedDict[str, _Bucket] = OrderedDict()
        self._last_dial: OrderedDict[str, float] = OrderedDict()

    def pick(self, sender: str, addrs: Iterable[str], now: float, known: set[str]) -> list[tuple[str, str]]:
        """The (address, peer ID) pairs of `sender`'s hello to dial now; `known` are peer IDs we have
        or are dialling already."""
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for addr in addrs:
            reason = self._refusal(addr)
            if reason is not None:
                self.skipped[reason] += 1
                continue
            peer = addr.rsplit("/p2p/", 1)[1]
            if peer in known or peer in seen:
                continue
            if len(out) >= self.per_hello or not self._take(self._sender(sender, now), now, self.sender_burst,
                                                            1 / self.sender_refill_s):
                self.skipped["sender_budget"] += 1
                continue
            if now - self._last_dial.get(peer, -1e18) < self.cooldown_s:
                self.skipped["cooldown"] += 1
                continue
            if not self._take(self._global, now, self.burst, self.rate_per_s):
                self.skipped["rate"] += 1
                continue
            self._last_dial[peer] = now
            self._last_dial.move_to_end(peer)
            while len(self._last_dial) > _MAX_TRACKED:
                self._last_dial.popitem(last=False)
            seen.add(peer)
            out.append((addr, peer))
        return out

    def alternatives(self, peer: str, addrs: Iterable[str]) -> list[str]:
        """Every address in `addrs` of `peer` that we would dial, in the order given: a peer on
        several interfaces advertises them all, and the first may be one we cannot route to."""
        return [a for a in addrs if a.endswith(f"/p2p/{peer}") and self._refusal(a) is None]

    def _refusal(self, addr: str) -> str | None:
        parsed = parse(addr, allow_dns=True)
        if parsed is None:
            return "malformed"
        host, port, peer = parsed
        if peer is None or port == 0:
            return "malformed"
        if peer == self.own_id or (host, port) in self._own_endpoints or \
                (port in self._own_ports and (_is_loopback(host) or _is_unspecified(host))):
            return "own"
        if not _is_ip(host):
            return None if self.allow_dns and not self._loopback_only else "dns"
        if self._loopback_only != _is_loopback(host):
            return "scope"
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified or ip.is_link_local or ip.is_multicast:
            return "scope"
        return None

    def _sender(self, sender: str, now: float) -> _Bucket:
        bucket = self._senders.pop(sender, None) or _Bucket(float(self.sender_burst), now)
        self._senders[sender] = bucket
        while len(self._senders) > _MAX_TRACKED:
            self._senders.popitem(last=False)
        return bucket

    @staticmethod
    def _take(bucket: _Bucket, now: float, capacity: int, per_s: float) -> bool:
        bucket.tokens = min(capacity, bucket.tokens + max(0.0, now - bucket.stamp) * per_s)
        bucket.stamp = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True


def parse(addr: str, allow_dns: bool = False) -> tuple[str, int, str | None] | None:
    """(host, port, peer ID or None) of `/ip4|ip6[|dns*]/HOST/tcp/PORT[/p2p/ID]`, else None."""
    parts = addr.split("/")
    if len(parts) not in (5, 7) or parts[0] != "" or parts[3] != "tcp":
        return None
    proto, host, port = parts[1], parts[2], parts[4]
    if proto not in ("ip4", "ip6") and not (allow_dns and proto in _DNS):
        return None
    if (proto in ("ip4", "ip6") and not _is_ip(host)) or not host or len(host) > 253:
        return None
    if not port.isdigit() or not 0 <= int(port) < 65536:   # 0 only in our own listen addresses
        return None
    if len(parts) == 7 and (parts[5] != "p2p" or not parts[6].isalnum()):
        return None
    return host, int(port), parts[6] if len(parts) == 7 else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    return host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


def _is_unspecified(host: str) -> bool:
    return _is_ip(host) and ipaddress.ip_address(host).is_unspecified
