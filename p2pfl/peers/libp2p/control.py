"""The control protocol `/p2pfl/ctl/1`: hello (compatibility check, round, peer exchange) and link
requests. Sans-IO: this module builds, parses and compares messages; the transport moves them.

Theory of operation: a control exchange is one request and one reply on a fresh stream, each a u32
big-endian length followed by a msgpack map (at most `MAX_CONTROL_BYTES`). The first exchange on a
connection is `hello`: both sides send the same `Hello` (protocol version, model schema hash, a
digest of the protocol settings that must agree, the settings themselves so a refusal can name the
key that differs, current round, listen addresses, and the multiaddrs of peers they know: peer
exchange). The responder refuses (`refused` set in its reply) when `incompatibility` finds a
difference or the caller is not on its allowlist; the initiator runs the same comparison on the
reply, so a mismatch is found and logged on both sides. A refusal reply carries the reason only
(`refusal`): a refused outsider learns nothing of the federation. Other message types (`link`,
`bulk`) are requests the node or the transport answers. Decoding is strict and total: wrong types, non-str
keys, unknown keys and oversize strings or lists raise `RemoteProtocolError` (counted by the
caller), never another exception; text a peer supplied is escaped before it reaches a message.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from p2pfl.errors import Reject, RemoteProtocolError, field_names, printable

PROTOCOL_VERSION: Final = 1
MAX_CONTROL_BYTES: Final = 64 * 1024
MAX_ADDRS: Final = 16          # listen addresses in one hello
MAX_PEERS: Final = 32          # peer-exchange entries in one hello (more are refused, not truncated)
MAX_ADDR_CHARS: Final = 256
MAX_SETTINGS: Final = 64       # keys of the settings map
MAX_TEXT_CHARS: Final = 256    # schema, config digest, a settings string value, a refusal reason
_U32: Final = struct.Struct(">I")
Scalar = str | int | float | bool | None


def config_digest(settings: Mapping[str, Scalar]) -> str:
    """A short stable hash of the settings that every peer of a federation must share."""
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Hello:
    schema: str
    settings: Mapping[str, Scalar]
    round: int = 0
    addrs: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    degree: int = 0
    version: int = PROTOCOL_VERSION
    refused: str | None = None
    config: str = field(default="")

    def __post_init__(self) -> None:
        if not self.config:
            object.__setattr__(self, "config", config_digest(self.settings))

    def to_wire(self) -> dict[str, Any]:
        return {"t": "hello", "v": self.version, "schema": self.schema, "config": self.config,
                "settings": dict(self.settings), "round": self.round, "addrs": list(self.addrs),
                "peers": list(self.peers), "degree": self.degree, "refused": self.refused}

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any], peer: str | None = None) -> Hello:
        def bad(what: str) -> RemoteProtocolError:
            return RemoteProtocolError(Reject.BAD_HEADER, f"hello: {what}", peer)

        if type(msg.get("v")) is not int:
            raise bad("no protocol version")
        if msg["v"] != PROTOCOL_VERSION:  # check first: a later version may change every other field
            return cls(schema="", settings={}, version=msg["v"], config="?")
        expected = {"t", "v", "schema", "config", "settings", "round", "addrs", "peers", "degree", "refused"}
        if msg.keys() != expected:   # never sort the keys: msgpack allows bytes keys beside str ones
            raise bad(f"fields {field_names(msg)} are not {sorted(expected)}")
        text = lambda v: type(v) is str and len(v) <= MAX_TEXT_CHARS
        strs = lambda v, n: type(v) is list and len(v) <= n and all(type(a) is str and len(a) <= MAX_ADDR_CHARS
                                                                     for a in v)
        scalar = lambda v: v is None or type(v) in (int, float, bool) or text(v)
        settings = msg["settings"]
        if not (text(msg["schema"]) and text(msg["config"]) and type(settings) is dict
                and len(settings) <= MAX_SETTINGS and all(text(k) and scalar(v) for k, v in settings.items())
                and type(msg["round"]) is int and msg["round"] >= 0
                and type(msg["degree"]) is int and 0 <= msg["degree"] <= 1 << 16
                and strs(msg["addrs"], MAX_ADDRS) and strs(msg["peers"], MAX_PEERS)
                and (msg["refused"] is None or text(msg["refused"]))):
            raise bad("a field has the wrong type or size")
        return cls(schema=msg["schema"], settings=settings, round=msg["round"], addrs=tuple(msg["addrs"]),
                   peers=tuple(msg["peers"]), degree=msg["degree"], version=msg["v"], refused=msg["refused"],
                   config=msg["config"])


def incompatibility(ours: Hello, theirs: Hello) -> str | None:
    """None if the two peers may federate, else a sentence naming the first difference (what the
    other side sent is escaped and truncated: it goes into logs and refusal replies)."""
    if theirs.version != ours.version:
        return f"protocol version differs: ours {printable(ours.version)}, theirs {printable(theirs.version)}"
    if theirs.schema != ours.schema:
        return f"model schema differs: ours {printable(ours.schema, 40)}, theirs {printable(theirs.schema, 40)}"
    if theirs.config != ours.config:
        if theirs.settings.get("backbone") != ours.settings.get("backbone"):   # full hashes: they are what to compare
            return (f"backbone differs: ours {printable(ours.settings.get('backbone'), 64)}, "
                    f"theirs {printable(theirs.settings.get('backbone'), 64)} (every peer must load the same file)")
        keys = sorted(set(ours.settings) | set(theirs.settings))
        diff = [f"{printable(k, 40)} ours {printable(repr(ours.settings.get(k)), 40)}, "
                f"theirs {printable(repr(theirs.settings.get(k)), 40)}"
                for k in keys if ours.settings.get(k) != theirs.settings.get(k)]
        more = f"; +{len(diff) - 4} more" if len(diff) > 4 else ""
        return "config differs: " + ("; ".join(diff[:4]) + more if diff else
                                     f"digest {printable(ours.config, 40)} != {printable(theirs.config, 40)}")
    return None


def refusal(reason: str) -> dict[str, Any]:
    """A hello refusal: the reason only. The refused side learns nothing of the federation (schema,
    settings, round, addresses, peers), which matters when the refusal is the allowlist's."""
    return {"t": "refused", "v": PROTOCOL_VERSION, "reason": reason[:MAX_TEXT_CHARS]}


def refusal_reason(msg: Mapping[str, Any], peer: str | None = None) -> str | None:
    """The reason of a `refusal` reply, escaped for our logs; None if `msg` is not a refusal."""
    if msg.get("t") != "refused":
        return None
    if msg.keys() != {"t", "v", "reason"} or type(msg["reason"]) is not str:
        raise RemoteProtocolError(Reject.BAD_HEADER, f"refusal: fields {field_names(msg)}", peer)
    return printable(msg["reason"], MAX_TEXT_CHARS)


def pack(msg: Mapping[str, Any]) -> bytes:
    body = msgpack.packb(dict(msg), use_bin_type=True)
    if len(body) > MAX_CONTROL_BYTES:
        raise ValueError(f"control message of {len(body)} bytes > {MAX_CONTROL_BYTES}")
    return _U32.pack(len(body)) + body


def body_length(prefix: bytes, peer: str | None = None) -> int:
    (n,) = _U32.unpack(prefix)
    if n > MAX_CONTROL_BYTES:
        raise RemoteProtocolError(Reject.OVERSIZE, f"control message of {n} bytes", peer)
    return n


def unpack(body: bytes, peer: str | None = None) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises a zoo of exception types on garbage
        raise RemoteProtocolError(Reject.BAD_MSGPACK, str(e)[:100], peer) from None
    if type(msg) is not dict or any(type(k) is not str for k in msg) or type(msg.get("t")) is not str:
        raise RemoteProtocolError(Reject.BAD_HEADER, "control message is not a map of str keys with a type 't'", peer)
    return msg
