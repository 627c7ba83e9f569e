"""Shared test helpers: identities, frames (valid and defective), transports, small federations.

Theory of operation
-------------------
Everything here is deterministic: `identity(i)` derives the i-th Ed25519 identity from a fixed
seed, `MODEL_SCHEMA` is the schema of `tiny_model()` (the 6-input MLP the peer tests train), and
`frame_bytes`/`forged_frame_bytes` build wire frames byte for byte, the latter with any header
field overridden (re-signed unless told otherwise), so a test can produce each of the codec's
rejection reasons on purpose.

Two connected transports of any kind behind one interface (`open_pair`, `run_pair`) are pair.py.

Importing this module imports neither pytest nor py-libp2p: libp2p comes in when a libp2p transport
is asked for, trio.testing (which imports pytest when it is installed) when a MockClock or a
quiescence wait is.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Final

import blake3
import msgpack
import numpy as np
import torch
import trio
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.gossip import codec
from p2pfl.gossip.codec import Frame
from p2pfl.gossip.identity import Identity
from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.learn.models import ParamLayout, make_model
from p2pfl.learn.train import TrainConfig
from p2pfl.peers.memory import MemoryNetwork
from p2pfl.peers.peer import Peer, PeerConfig

if TYPE_CHECKING:
    from p2pfl.peers.libp2p import Libp2pTransport

__all__ = [
    "DROP",
    "LIMIT_S",
    "MODEL_SCHEMA",
    "SETTINGS",
    "SMALL_PAYLOADS",
    "forged_frame_bytes",
    "frame_bytes",
    "identity",
    "libp2p_transport",
    "make_peers",
    "model_frame",
    "raw_model_stream",
    "run_peers",
    "started",
    "tiny_model",
]

LIMIT_S: Final = 30
"""Bound, in seconds, of any one wait in a test over real loopback libp2p (never reached when it works)."""

SETTINGS: Final[dict[str, Any]] = {"gossip_steps": 1, "aggregator": "mixing"}
"""Protocol settings for a test `Hello` (peers with different settings refuse each other)."""


def tiny_model(seed: int = 0) -> nn.Module:
    """The small model of the peer tests: an MLP 6 -> 8 -> 2."""
    return make_model("mlp", (6,), 2, hidden=(8,), seed=seed)


MODEL_SCHEMA: Final[str] = ParamLayout.of(tiny_model()).schema
"""The schema hash of `tiny_model()`: what test frames and hellos carry."""

SMALL_PAYLOADS: Final[dict[str, PayloadSpec]] = {"model": PayloadSpec("f32", 100)}
"""A payload declaration for `expect`: kind "model", 100 float32 values, |x| <= 1e6."""

DROP: Final = object()
"""A field value for `forged_frame_bytes`: leave the field out of the header."""


def identity(i: int) -> Identity:
    """The i-th deterministic test identity (0 <= i < 255); the same i gives the same peer ID."""
    if not 0 <= i < 255:
        raise ConfigError(f"test identity index: expected 0..254, got {i}")
    return Identity.generate(bytes([i + 1]) * 32)


# -- frames -----------------------------------------------------------------------------------------
def model_frame(sender: str, round_: int = 0, n: int = 100, *, kind: str = "model", step: int = 0,
                schema: str = MODEL_SCHEMA, value: float | None = None,
                payload: np.ndarray | None = None) -> Frame:
    """A `Frame` to hand to `Transport.send`: `n` float32 values, all `value` (default: the round,
    so a receiver can tell frames apart by content too), unless `payload` is given."""
    if payload is None:
        payload = np.full(n, float(round_) if value is None else value, dtype=np.float32)
    dtype = {np.float32: "f32", np.float16: "f16", np.uint16: "bf16"}[payload.dtype.type]
    return Frame(kind, sender, round_, step, schema, dtype, payload)


def frame_bytes(sender: Identity, round_: int = 0, n: int = 100, *, kind: str = "model", step: int = 0,
                schema: str = MODEL_SCHEMA, payload: np.ndarray | None = None) -> bytes:
    """One valid wire frame signed by `sender`: `n` float32 ones, unless `payload` is given."""
    if payload is None:
        payload = np.ones(n, dtype=np.float32)
    return b"".join(codec.encode(sender, kind=kind, round=round_, step=step, schema=schema, payload=payload))


def forged_frame_bytes(signer: Identity, payload: bytes = b"\0" * 8, *, raw_header: bytes | None = None,
                       **fields: Any) -> bytes:
    """A wire frame built field by field (the layout in docs/architecture.md, independent of the codec's encoder).

    The header defaults to what `codec.encode` would write for `payload` (f32, kind "model", round
    0, step 0, `MODEL_SCHEMA`, from `signer`); `fields` override any of it (`DROP` removes a field,
    a key the codec does not know is added), and the header is then signed by `signer` unless
    `sig` is among `fields`. `raw_header` replaces the encoded header with arbitrary bytes. The two
    length fields always match what follows, so only the named defect is wrong."""
    h: dict[str, Any] = {
        "digest": blake3.blake3(payload).digest(), "dtype": "f32", "from": signer.peer_id, "kind": "model",
        "nbytes": len(payload), "round": 0, "schema": MODEL_SCHEMA, "step": 0, "v": codec.VERSION,
    }
    for k, v in fields.items():
        if v is DROP:
            h.pop(k, None)
        else:
            h[k] = v
    if "sig" not in h:
        h["sig"] = signer.sign(msgpack.packb(dict(sorted(h.items())), use_bin_type=True))
    head = raw_header if raw_header is not None else msgpack.packb(dict(sorted(h.items())), use_bin_type=True)
    return struct.pack(">II", 4 + len(head) + len(payload), len(head)) + head + payload


# -- libp2p transports --------------------------------------------------------------------------------
def libp2p_transport(i: int, *, schema: str = MODEL_SCHEMA, settings: Mapping[str, Any] | None = None,
                     **kw: Any) -> Libp2pTransport:
    """A `Libp2pTransport` for `identity(i)` on 127.0.0.1 (any free port), not started yet; `kw` go
    to its constructor (`bulk_port`, `payloads`, `stall_timeout_s`, `inbox_frames`, ...)."""
    from p2pfl.peers.libp2p import Hello, Libp2pTransport

    return Libp2pTransport(identity(i), Hello(schema=schema, settings=dict(settings or SETTINGS)), **kw)


async def started(stack: AsyncExitStack, *transports: Libp2pTransport) -> None:
    """Start each transport (listen, serve) inside `stack`, which closes them on exit."""
    for t in transports:
        await stack.enter_async_context(t)


async def raw_model_stream(src: Libp2pTransport, dst: Libp2pTransport) -> Any:
    """A fresh `/p2pfl/model/1` stream from `src` to `dst` (connected, hello accepted) to write
    raw bytes on, bypassing `src`'s encoder: what a hostile peer can do."""
    from p2pfl.peers.libp2p import MODEL_PROTOCOL

    peer_id = type(src.host.get_id()).from_base58(dst.local_id)   # libp2p's ID, without importing libp2p here
    return await src.host.new_stream(peer_id, [MODEL_PROTOCOL])


async def train_all(stack: AsyncExitStack, peers: list[Peer], rounds: int, on_event: Callable[[Any], None],
                    limit_s: float = LIMIT_S) -> None:
    """Open each peer inside `stack` (which closes them), sending its round events to `on_event`,
    then train them all concurrently for `rounds` rounds, within `limit_s` (real clock)."""
    for p in peers:
        p.on_event = on_event
        await stack.enter_async_context(p)
    with trio.fail_after(limit_s):
        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(p.train, rounds)


# trio.testing imports pytest when it is installed (trio 0.35, for RaisesGroup): import it only
# where it is used, so that importing p2pfl.testing stays free of it
def _mock_clock() -> trio.abc.Clock:
    """A MockClock that jumps to the next deadline whenever every task is blocked."""
    from trio.testing import MockClock

    return MockClock(autojump_threshold=0)


async def _quiescent() -> None:
    """Return once every other task is blocked (ahead of a MockClock's autojump)."""
    from trio.testing import wait_all_tasks_blocked

    await wait_all_tasks_blocked()


# -- peers on a memory network ------------------------------------------------------------------------
def make_peers(n: int, network: MemoryNetwork, *, config: PeerConfig | None = None, data_seed: int = 0) -> list[Peer]:
    """`n` fully meshed `Peer`s of `tiny_model()` on `network`, identities `identity(0..n-1)`, each
    with 16 random samples of the task "is x[0] > 0" (seeded by `data_seed`); torch runs inline."""
    g = torch.Generator().manual_seed(data_seed)
    ids = [identity(i) for i in range(n)]
    config = config or PeerConfig(train=TrainConfig(lr=0.1, local_steps=2, batch_size=8), step_timeout_s=5.0)
    peers = []
    for ident in ids:
        x = torch.randn(16, 6, generator=g)
        y = (x[:, 0] > 0).long()
        nbrs: dict[str, float | None] = {o.peer_id: None for o in ids if o is not ident}
        peers.append(Peer(tiny_model(), (x, y), transport=network.endpoint(ident), neighbors=nbrs, config=config,
                          offload=False))
    return peers


def run_peers(peers: list[Peer], rounds: int, clock: trio.abc.Clock | None = None) -> None:
    """Train every peer for `rounds` rounds concurrently in one trio run, under `clock` (default: a
    MockClock that jumps whenever every task is blocked, so deadlines cost no wall time)."""
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(run_one, p)

    async def run_one(p: Peer) -> None:
        async with p:
            await p.train(rounds)

    trio.run(main, clock=clock or _mock_clock())
