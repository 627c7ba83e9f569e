"""Building a py-libp2p host from our Identity, and exact reads off a libp2p stream.

The host: Ed25519 key pair from our 32-byte seed (same peer ID as `Identity.peer_id`), TCP,
Noise as the ONLY security transport (a default host also accepts plaintext and secio), yamux as
the only muxer, optional private-network key (`psk`).

`read_exact` fills a buffer from a stream with our own loop: py-libp2p's `read_exactly` gives up
after 100 partial reads, and a stream signals its end by raising `StreamEOF`, never with b"".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from libp2p import create_identity_from_seed, new_host
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE, Yamux, YamuxStream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID

from p2pfl.gossip.identity import Identity

_READ_CHUNK = 1 << 20


class EndOfStream(Exception):
    """The stream ended (EOF, reset, or the connection died) before the buffer was full."""


def make_host(identity: Identity, *, psk: str | None = None) -> Any:
    key_pair = create_identity_from_seed(identity.private_bytes())
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    return new_host(key_pair=key_pair, sec_opt={NOISE_ID: noise}, muxer_opt={TProtocol(YAMUX_ID): Yamux}, psk=psk)


async def widen_receive_window(stream: Any, size: int = MAX_WINDOW_SIZE) -> None:
    """Grant the sender a `size`-byte yamux window at once on a bulk stream we read (a plain
    WINDOW_UPDATE, as the yamux spec allows). py-libp2p starts at 256 KiB and only doubles the
    window when two updates fall within 4 RTTs, which on a fast link rarely happens; a sender
    that runs out of window polls every 10 ms, so a small window caps throughput."""
    muxed = getattr(stream, "muxed_stream", None)
    if not isinstance(muxed, YamuxStream):
        return
    async with muxed.window_lock:
        grow = size - muxed.recv_window
        if grow <= 0:
            return
        muxed.target_recv_window = max(muxed.target_recv_window, size)
        muxed.recv_window += grow
    await muxed.send_window_update(grow)


async def read_exact(stream: Any, view: memoryview, stall_timeout_s: float | None,
                     on_bytes: Callable[[int], None] | None = None) -> None:
    """Fill `view` from `stream`. Every single read must return within `stall_timeout_s` (None:
    wait forever), else trio.TooSlowError. Raises EndOfStream if the stream ends first.
    `on_bytes(n)` is told of every read (a slow frame's progress)."""
    n, size = 0, view.nbytes
    while n < size:
        try:
            if stall_timeout_s is None:
                chunk = await stream.read(min(size - n, _READ_CHUNK))
            else:
                with trio.fail_after(stall_timeout_s):
                    chunk = await stream.read(min(size - n, _READ_CHUNK))
        except StreamError as e:   # StreamEOF, StreamReset, StreamClosed
            raise EndOfStream(type(e).__name__) from None
        except trio.TooSlowError:
            raise
        except Exception as e:     # a dead connection surfaces as assorted muxer/raw errors
            raise EndOfStream(f"{type(e).__name__}: {e}") from None
        if not chunk:
            raise EndOfStream("empty read")
        view[n:n + len(chunk)] = chunk
        n += len(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))
