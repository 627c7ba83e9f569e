"""Errors that say whose fault it was.

- `ConfigError` (a `LocalProtocolError`): the user or the embedding application asked for something
  impossible (bad config key, f too large for the degree, unknown topology). Raised before any work starts.
- `RemoteProtocolError`: a peer sent something illegal. It carries the peer ID (when known) and a
  `Reject` reason code that the peer counts in its metrics. It never crashes the receiving peer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final

REMOTE_TEXT_CHARS: Final = 120   # the most of any one peer-supplied string that goes into a message or a log


class P2PFLError(Exception):
    """Root of every error p2pfl raises on purpose."""


class LocalProtocolError(P2PFLError):
    """We (the caller, the local configuration) did something wrong."""


class ConfigError(LocalProtocolError, ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


class Reject(str, enum.Enum):
    """Why an incoming frame was refused. Values are the metric label names."""

    BAD_LENGTH = "bad_length"
    BAD_MSGPACK = "bad_msgpack"
    BAD_HEADER = "bad_header"
    UNKNOWN_VERSION = "unknown_version"
    WRONG_SCHEMA = "wrong_schema"
    WRONG_SIZE = "wrong_size"        # element count differs from the declared payload's
    WRONG_DTYPE = "wrong_dtype"      # wire dtype differs from the declared payload's
    UNKNOWN_KIND = "unknown_kind"    # a payload kind the peer does not accept
    OUT_OF_RANGE = "out_of_range"    # finite, but a value beyond the payload's magnitude bound
    INVALID_PAYLOAD = "invalid_payload"   # the payload kind's own validator refused it (e.g. not a permutation)
    NON_FINITE = "non_finite"
    BAD_DIGEST = "bad_digest"
    BAD_SIGNATURE = "bad_signature"
    FORGED_SENDER = "forged_sender"
    UNKNOWN_PEER = "unknown_peer"
    REPLAYED = "replayed"
    TOO_FAR_AHEAD = "too_far_ahead"
    STALE = "stale"
    BUFFER_FULL = "buffer_full"
    OVERSIZE = "oversize"
    # stream-level (libp2p transport): the frame never arrived whole, or its sender may not talk to us
    TRUNCATED = "truncated"          # the stream ended or was reset mid-frame
    STALLED = "stalled"              # no bytes for the stall timeout mid-frame; the stream is reset
    NOT_ALLOWED = "not_allowed"      # not on the allowlist, or no accepted hello yet
    BAD_RECORD = "bad_record"        # a bulk-channel record failed authentication (altered, replayed, wrong key)


def printable(value: object, limit: int = REMOTE_TEXT_CHARS) -> str:
    """Peer-supplied text made safe for a message or a log line: control characters, newlines and
    non-ASCII escaped (a peer cannot forge a line such as "round 999/999 done"), and at most `limit`
    characters kept (a peer cannot grow our log by the size of its strings)."""
    text = value if isinstance(value, str) else repr(value)
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    if len(escaped) > limit:
        escaped = f"{escaped[:limit]}...(+{len(escaped) - limit} chars)"
    return escaped


def field_names(keys: Iterable[object], limit: int = 16) -> str:
    """The keys of a peer's map, for an error message: any types (msgpack allows bytes keys, which
    cannot be sorted with str keys), each escaped, at most `limit` of them."""
    names = sorted(printable(k, 40) for k in keys)
    more = f", +{len(names) - limit} more" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]"


class RemoteProtocolError(P2PFLError):
    """A remote peer sent something illegal."""

    def __init__(self, reason: Reject, detail: str = "", peer: str | None = None) -> None:
        self.reason = reason
        self.detail = detail = printable(detail, 200)   # it quotes what the peer sent, and goes into logs
        self.peer = peer
        who = f" from {peer}" if peer else ""
        super().__init__(f"rejected frame{who}: {reason.value}" + (f" ({detail})" if detail else ""))
