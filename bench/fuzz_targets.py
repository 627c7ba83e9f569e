"""Fuzz targets: the generators and contract checks shared by `bench/fuzz.py` (long random runs)
and `tests/test_fuzz.py` (short hypothesis runs in CI).

Every parser of remote or untrusted input must be total: for any input it returns a value or raises
its ONE documented error type. A target here is a `Target`: `case(rng)` builds one input from a
`random.Random` (in the tests, hypothesis' own `Random`, so failures shrink and replay), `check(case)`
feeds it to the parser and raises on a contract violation (the parser's own unexpected exception,
or an AssertionError naming a broken invariant of an accepted value), and `dump(case)` gives the
input's bytes for a report.

- `CodecTarget`: `p2pfl.gossip.codec.decode` -> Frame | RemoteProtocolError, on mutated signed
  frames (bit flips, byte inserts/deletes, truncation, length-field edits, headers re-packed with
  changed, extra, bytes-typed or wrong-typed fields and re-signed, so the deep checks are reached).
  An accepted frame must re-encode to the same bytes (one wire form per frame, signed by a key
  the fuzzer holds) and hold only finite values; `read_frame_length` and the aligned receive path
  (`frame_buffer`) must agree with `decode`.
- `ControlTarget`: `control.body_length` -> `control.unpack` -> `Hello.from_wire` (then
  `incompatibility`), `bulk.Ticket.from_wire` and `refusal_reason`, as the transport runs them ->
  value | RemoteProtocolError, on msgpack maps mutated from valid hellos, tickets and requests:
  keys of str, bytes and int types, nested values, huge strings and lists, wrong types for each
  field. Refusal messages and what goes into logs must be printable single lines of bounded size.
- `CheckpointTarget`: `p2pfl.peers.checkpoint.load` -> Checkpoint | ConfigError, on byte-mutated
  checkpoint files and on structurally valid `torch.save` dicts with missing keys, wrong types,
  NaN tensors and huge rounds (re-sealed, so they pass the integrity seal); then
  `Checkpoint.apply` -> None | ConfigError, a refused checkpoint leaving the trainer unchanged.
- `ConfigTarget`: scenario and peer-settings loading -> Scenario / PeerSettings | ConfigError, on
  key/value dicts (the CLI's path) and on TOML files, mutated from the examples; a dict and its
  TOML rendering must load to the same settings (or both be refused).

Nothing here uses hypothesis: the bench runs it with plain `random` for throughput.
"""

from __future__ import annotations

import copy
import importlib.resources
import inspect
import io
import math
import os
import random
import shutil
import struct
import tempfile
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Final

import blake3
import msgpack
import numpy as np

from p2pfl.errors import ConfigError, Reject, RemoteProtocolError
from p2pfl.gossip import codec
from p2pfl.gossip.identity import Identity

__all__ = ["TARGETS", "CheckpointTarget", "CodecTarget", "ConfigTarget", "ControlTarget", "Target", "make_target"]

ALICE: Final = Identity.generate(bytes(32))
BOB: Final = Identity.generate(b"\x01" * 32)
SIGNERS: Final = {ALICE.peer_id: ALICE, BOB.peer_id: BOB}
SCHEMA: Final = "ab" * 32
MAX_FRAME: Final = 1 << 20
HEX_BYTES: Final = 256  # how much of a failing input a report shows

# Values that sit on a validator's boundary or outside a type's usual range.
INTS: Final = (0, 1, 2, 3, 4, 7, 16, 64, 255, 256, 65535, 65536, -1, -2, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**63 - 1, 2**63, 2**64 - 1, -(2**63))
FLOATS: Final = (0.0, -0.0, 0.5, 1.0, 0.999999, 1.5, -1.0, 1e-300, 5e-324, 1e300, 3.4028235e38,
                 math.nan, math.inf, -math.inf)


class Target:
    """One parser under fuzz. Subclasses set `name` and implement the three methods."""

    name = "target"

    def case(self, rng: random.Random) -> Any:
        raise NotImplementedError

    def check(self, case: Any) -> None:
        """Run the parser on `case`; return if it kept its contract, raise otherwise."""
        raise NotImplementedError

    def dump(self, case: Any) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the target holds (temporary folders)."""


# --- generic generators -------------------------------------------------------------------------


def rand_str(rng: random.Random, n: int | None = None) -> str:
    """A short str that msgpack can pack (no lone surrogates), mixing ASCII, controls and non-ASCII."""
    n = rng.choice((0, 1, 3, 8, 20)) if n is None else n
    alphabet = "abcXYZ019 /:._-\0\t\n\"'\\é✓😀\x7f\u2028"
    return "".join(rng.choice(alphabet) for _ in range(n))


def big_str(rng: random.Random) -> str:
    """A long string without drawing a byte per character (hypothesis' Random has a small budget)."""
    return rng.choice("x€😀") * rng.choice((511, 512, 513, 4096, 70_000, 300_000))


def rand_value(rng: random.Random, depth: int = 0, *, key_types: tuple[type, ...] = (str, bytes, int)) -> Any:
    """Any msgpack-packable value: scalars on type boundaries, strings, bytes, nested lists and maps
    (whose keys are of `key_types`), huge strings, ext types."""
    kind = rng.randrange(12 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(INTS) if rng.random() < 0.7 else rng.randrange(-(2**63), 2**64)
    if kind == 3:
        return rng.choice(FLOATS) if rng.random() < 0.7 else rng.uniform(-1e6, 1e6)
    if kind == 4:
        return rand_str(rng)
    if kind == 5:
        return rng.randbytes(rng.choice((0, 1, 16, 32, 64)))
    if kind == 6:
        return big_str(rng) if rng.random() < 0.2 else rand_str(rng, 40)
    if kind == 7:
        return [rand_value(rng, depth + 1, key_types=key_types) for _ in range(rng.choice((0, 1, 2, 5)))]
    if kind == 8:
        return {rand_key(rng, key_types): rand_value(rng, depth + 1, key_types=key_types)
                for _ in range(rng.choice((0, 1, 2, 4)))}
    if kind == 9:
        return [rand_str(rng, 3)] * rng.choice((64, 65, 256, 257, 5000))
    if kind == 10:
        if rng.random() < 0.2:  # ext type -1, which msgpack unpacks into a Timestamp object
            return msgpack.Timestamp(rng.randrange(-(2**40), 2**40), rng.randrange(10**9))
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.choice((0, 1, 4, 8, 12))))
    return [[[[rand_value(rng, 3, key_types=key_types)]]]]


def rand_key(rng: random.Random, key_types: tuple[type, ...] = (str, bytes, int)) -> Any:
    kind = rng.choice(key_types)
    if kind is str:
        return rng.choice(("t", "v", "schema", "port", "key", "x", "", "T", "t ")) if rng.random() < 0.5 else rand_str(rng)
    if kind is bytes:
        return rng.choice((b"t", b"v", b"schema", b"port", b"", b"\xff")) if rng.random() < 0.5 else rng.randbytes(3)
    return rng.choice((0, 1, -1, 2**64 - 1))


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """One byte-level mutation: bit flips, insert, delete, truncate, overwrite, duplicate, junk."""
    b = bytearray(data)
    op = rng.randrange(8)
    if op == 0 and b:  # flip 1-8 bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # insert bytes
        i = rng.randint(0, len(b))
        b[i:i] = rng.randbytes(rng.choice((1, 1, 2, 4, 9)))
    elif op == 2 and b:  # delete a span
        i = rng.randrange(len(b))
        del b[i:i + rng.choice((1, 1, 2, 4, 16))]
    elif op == 3:  # truncate
        del b[rng.randint(0, len(b)):]
    elif op == 4 and b:  # overwrite a span with a byte that means something to msgpack or to a length
        i = rng.randrange(len(b))
        fill = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0xC2, 0xC4, 0xCC, 0xCF, 0xD9, 0xDC, 0xDE, 0xDF))
        n = min(rng.choice((1, 2, 4)), len(b) - i)
        b[i:i + n] = bytes([fill]) * n
    elif op == 5:  # append junk
        b += rng.randbytes(rng.choice((1, 3, 16)))
    elif op == 6 and b:  # duplicate a span (a repeated field, a doubled frame)
        i = rng.randrange(len(b))
        j = rng.randint(i, min(len(b), i + 64))
        b[j:j] = b[i:j]
    else:  # set one byte to a random value
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def _sort_keys(d: dict[Any, Any]) -> dict[Any, Any]:
    """Keys in canonical (sorted) order; mixed key types sort by type name first."""
    return dict(sorted(d.items(), key=lambda kv: (type(kv[0]).__name__, kv[0])))


def _truncate(data: bytes) -> bytes:
    return data[:HEX_BYTES]


def check_error(e: RemoteProtocolError) -> None:
    """A refusal carries a Reject reason, and its message (which quotes what the peer sent and goes
    into logs) is one bounded line of printable text."""
    assert isinstance(e.reason, Reject), f"refusal reason is not a Reject: {e.reason!r}"
    text = str(e)
    assert text.isprintable() and len(text) <= 1000, f"refusal message not one short printable line: {text[:200]!r}"


# --- 1. codec -----------------------------------------------------------------------------------


@dataclass
class CodecCase:
    data: bytes
    schema: str | None
    max_frame_bytes: int
    peer: str | None
    buffer: str                      # how the bytes are handed over: bytes, bytearray, memoryview, unaligned
    expect: np.ndarray | None        # the seed's payload when `data` is an untouched seed


@dataclass
class _Seed:
    header: dict[str, Any]           # everything but digest/nbytes/sig
    payload: np.ndarray
    wire: bytes


class CodecTarget(Target):
    """`codec.decode` -> Frame | RemoteProtocolError."""

    name = "codec"

    def __init__(self) -> None:
        gen = np.random.default_rng(0)
        self.seeds: list[_Seed] = []
        specs = [("f32", 0), ("f32", 1), ("f32", 3), ("f32", 64), ("f16", 5), ("bf16", 4)]
        for i, (dtype, n) in enumerate(specs):
            x = gen.standard_normal(n).astype(np.float32)
            if dtype == "f32":
                payload = x
            elif dtype == "f16":
                payload = x.astype(np.float16)
            else:  # bf16: the top half of each float32's bits
                payload = (x.view(np.uint32) >> 16).astype(np.uint16)
            if n >= 3:  # the largest finite, the smallest subnormal and -0: they must pass the NaN/Inf check
                payload[:3] = {"f32": (np.finfo(np.float32).max, np.float32(1e-45), -0.0),
                               "f16": (np.finfo(np.float16).max, np.float16(6e-8), -0.0),
                               "bf16": (0x7F7F, 0x0001, 0x8000)}[dtype]
            signer = ALICE if i % 2 == 0 else BOB
            header = {"kind": ("model", "m", "k" * 64)[i % 3], "round": (0, 1, 2**63 - 1)[i % 3],
                      "step": (0, 5, 2**32)[i % 3], "schema": SCHEMA if i % 3 else "s"}
            wire = b"".join(codec.encode(signer, payload=payload, **header))
            self.seeds.append(_Seed({**header, "from": signer.peer_id, "dtype": dtype, "v": 1}, payload, wire))

    # -- generation ------------------------------------------------------------------------------
    def case(self, rng: random.Random) -> CodecCase:
        seed = rng.choice(self.seeds)
        how = rng.randrange(10)
        mutations = rng.choice((1, 1, 1, 2, 3))
        if how == 0:
            data, expect, mutations = seed.wire, seed.payload, 0
        elif how <= 5:  # forged: mostly left whole, so the checks behind the signature are reached
            data, expect = self._forge(rng, seed), None
            mutations = mutations if rng.random() < 0.25 else 0
        elif how == 6:
            data, expect = rng.randbytes(rng.choice((0, 3, 4, 7, 8, 9, 40))), None
            if rng.random() < 0.5:  # a prefix that agrees with the junk's length
                data = struct.pack(">II", len(data) + 4, rng.choice((0, 1, len(data)))) + data
        else:
            data, expect = seed.wire, None
        for _ in range(mutations):
            data = self._mutate(rng, data)
        # Mostly the receiver's real settings: a refusal for size, schema or sender stops the deep checks.
        max_frame = MAX_FRAME if rng.random() < 0.85 else rng.choice((len(data), len(data) - 1, 8, 0))
        schema = rng.choice((None, None, None, seed.header["schema"], seed.header["schema"], "other"))
        peer = rng.choice((None, None, None, seed.header["from"], seed.header["from"], ALICE.peer_id, BOB.peer_id, "x"))
        if how == 0 and (schema not in (None, seed.header["schema"]) or peer not in (None, seed.header["from"])
                         or max_frame < len(data)):
            expect = None  # a refusal is the right answer there
        return CodecCase(data, schema, max_frame, peer, rng.choice(("bytes", "bytearray", "memoryview", "unaligned")),
                         expect)

    def _forge(self, rng: random.Random, seed: _Seed) -> bytes:
        """A frame built from (mutated) header fields and payload, usually re-signed by the claimed
        sender's key, so the checks after the signature are reached."""
        h: dict[Any, Any] = dict(seed.header)
        body = bytearray(seed.payload.view(np.uint8).tobytes())
        payload_op = rng.randrange(6)
        if payload_op == 1 and body:  # a NaN/Inf element, correctly digested and signed
            item = seed.payload.itemsize
            i = rng.randrange(len(body) // item) * item
            bits = {"f32": (0x7FC00000, 0x7F800000, 0xFF800000, 0x7F800001), "f16": (0x7C00, 0xFC00, 0x7E00),
                    "bf16": (0x7F80, 0xFF80, 0x7FC0)}[seed.header["dtype"]]
            body[i:i + item] = rng.choice(bits).to_bytes(item, "little")
        elif payload_op == 2:  # a payload that is not a whole number of elements
            body += rng.randbytes(1) if rng.random() < 0.5 else b""
            del body[len(body) - rng.choice((0, 1)):]
        h["digest"] = blake3.blake3(bytes(body)).digest()
        h["nbytes"] = len(body)
        if payload_op == 3 and body:  # payload changed after digesting
            body[rng.randrange(len(body))] ^= 0xFF
        elif payload_op == 4:
            h["nbytes"] = rng.choice((len(body) + 1, len(body) - 1, 2**32 - 1, 2**32, -1))
        for _ in range(rng.choice((0, 0, 0, 1, 1, 2, 3))):  # none: the payload checks get their share
            self._mutate_header(rng, h)
        if rng.random() < 0.8 or "sig" not in h:
            signer = SIGNERS.get(h.get("from")) if isinstance(h.get("from"), str) else None
            signer = signer or rng.choice((ALICE, BOB))
            unsigned = {k: v for k, v in h.items() if k != "sig"}
            h["sig"] = signer.sign(msgpack.packb(_sort_keys(unsigned), use_bin_type=True))
        if rng.random() < 0.15:
            h["sig"] = rng.choice((b"", bytes(64), rng.randbytes(63), "sig", None))
        head = self._pack_header(rng, h)
        return struct.pack(">II", 4 + len(head) + len(body), len(head)) + head + bytes(body)

    @staticmethod
    def _mutate_header(rng: random.Random, h: dict[Any, Any]) -> None:
        keys = [k for k in h]
        op = rng.randrange(9)
        if op == 0 and keys:  # any value for a field
            h[rng.choice(keys)] = rand_value(rng)
        elif op == 1 and keys:  # a boundary value of the same type
            k = rng.choice(keys)
            v = h[k]
            if isinstance(v, bool) or not isinstance(v, (int, str, bytes)):
                h[k] = rng.choice(INTS)
            elif isinstance(v, int):
                h[k] = rng.choice((-1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), min(v + 1, 2**64 - 1), True, float(v)))
            elif isinstance(v, str):
                h[k] = rng.choice(("", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "x" * 900, v.encode(), v + "\0"))
            else:
                h[k] = rng.choice((b"", v[:-1], v + b"\0", v.hex()))
        elif op == 2 and keys:  # a missing field
            del h[rng.choice(keys)]
        elif op == 3:  # an extra field, of str, bytes or int key
            h[rand_key(rng)] = rand_value(rng, 2)
        elif op == 4 and keys:  # a field under a bytes key of the same name
            k = rng.choice(keys)
            if isinstance(k, str):
                h[k.encode()] = h.pop(k)
        elif op == 5:
            h["v"] = rng.choice((0, 2, -1, True, 1.0, "1", None, 2**64 - 1))
        elif op == 6:  # senders that are not Ed25519 identity peer IDs, or are someone else
            h["from"] = rng.choice((BOB.peer_id, ALICE.peer_id, "", "1", "12D3KooW", ALICE.peer_id[:-1],
                                    ALICE.peer_id + "1", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
                                    "0OIl" * 13, "1" * 64, "1" * 65, ALICE.peer_id.encode()))
        elif op == 7:
            h["dtype"] = rng.choice(("f32", "f16", "bf16", "f64", "F32", "", "<f4", 1))
        else:
            h["kind"] = rng.choice(("model", "", "x" * 65, "😀" * 64, "😀" * 65))
            h["schema"] = rng.choice((SCHEMA, "", "s" * 129, "s" * 128))

    @staticmethod
    def _pack_header(rng: random.Random, h: dict[Any, Any]) -> bytes:
        """Canonical msgpack most of the time, else one of the encodings a strict decoder must refuse."""
        variant = rng.randrange(12)
        if variant == 0:  # keys out of order
            return msgpack.packb(dict(reversed(list(_sort_keys(h).items()))), use_bin_type=True)
        if variant == 1:  # old raw type: bytes become str-typed raw
            return msgpack.packb(_sort_keys(h), use_bin_type=False)
        if variant == 2:  # float32 floats (a float32 overflows on some: then plain)
            try:
                return msgpack.packb(_sort_keys(h), use_bin_type=True, use_single_float=True)
            except OverflowError:
                pass
        head = msgpack.packb(_sort_keys(h), use_bin_type=True)
        if variant == 3:  # a non-minimal int: v = 1 as uint8
            return head.replace(b"\xa1v\x01", b"\xa1v\xcc\x01")
        if variant == 4 and head[:1] == b"\x8a":  # map16 where a fixmap fits
            return b"\xde\x00\x0a" + head[1:]
        if variant == 5:  # trailing bytes after the map
            return head + rng.choice((b"\xc0", b"\x00", b"\x90"))
        if variant == 6:  # the fields as an array
            return msgpack.packb(list(_sort_keys(h).values()), use_bin_type=True)
        return head

    @staticmethod
    def _mutate(rng: random.Random, data: bytes) -> bytes:
        if rng.random() < 0.25 and len(data) >= 8:  # the length fields
            total, hlen = struct.unpack_from(">II", data)
            values = (0, 1, 3, 4, 5, total - 1, total + 1, hlen - 1, hlen + 1, codec.MAX_HEADER_BYTES,
                      codec.MAX_HEADER_BYTES + 1, 2**31, 2**32 - 1, MAX_FRAME, rng.randrange(2**32))
            v = rng.choice(values) % 2**32
            which = rng.randrange(2)
            return data[:4 * which] + struct.pack(">I", v) + data[4 * which + 4:]
        return mutate_bytes(rng, data)

    # -- check -----------------------------------------------------------------------------------
    def check(self, case: CodecCase) -> None:
        raw = case.data
        outcome = self._decode(case, self._buffer(raw, case.buffer), raw)
        if len(raw) >= codec.LENGTH_PREFIX_BYTES:
            try:
                n = codec.read_frame_length(raw[:4], case.max_frame_bytes, peer=case.peer)
            except RemoteProtocolError:
                n = None
            if outcome == "ok":
                assert n == len(raw) - 4, f"read_frame_length disagrees with decode: {n} for a frame of {len(raw)} bytes"
        # The receiver's aligned path (frame_buffer, then decode in place) must agree with decode.
        if len(raw) >= codec.FRAME_PREFIX_BYTES and case.max_frame_bytes <= 4 * MAX_FRAME:
            try:
                view = codec.frame_buffer(raw[:8], max_frame_bytes=case.max_frame_bytes, peer=case.peer)
            except RemoteProtocolError:
                assert outcome != "ok", "frame_buffer refused the prefix of a frame decode accepts"
                return
            if view.nbytes == len(raw):
                view[8:] = raw[8:]
                again = self._decode(case, view, raw)
                assert again == outcome, f"decode in a frame_buffer: {again}, on bytes: {outcome}"

    def _decode(self, case: CodecCase, buf: Any, raw: bytes) -> str:
        try:
            frame = codec.decode(buf, schema=case.schema, max_frame_bytes=case.max_frame_bytes, peer=case.peer)
        except RemoteProtocolError as e:
            check_error(e)
            assert case.expect is None, f"a valid seed frame was refused: {e}"
            return e.reason.value
        assert len(raw) <= case.max_frame_bytes, "accepted a frame over max_frame_bytes"
        assert case.peer is None or frame.sender == case.peer, "accepted a frame from another sender"
        assert case.schema is None or frame.schema == case.schema, "accepted a frame of another schema"
        signer = SIGNERS.get(frame.sender)
        assert signer is not None, f"accepted a frame signed by a key nobody holds: {frame.sender}"
        values = frame.payload
        if frame.dtype == "bf16":
            values = (frame.payload.astype(np.uint32) << 16).view(np.float32)
        assert bool(np.isfinite(values).all()), "accepted a NaN/Inf payload"
        again = b"".join(codec.encode(signer, kind=frame.kind, round=frame.round, step=frame.step,
                                      schema=frame.schema, payload=frame.payload))
        assert again == raw, "accepted a frame that is not the one wire form of its content"
        if case.expect is not None:
            assert frame.payload.tobytes() == case.expect.tobytes(), "a seed frame decoded to another payload"
        return "ok"

    @staticmethod
    def _buffer(raw: bytes, how: str) -> Any:
        if how == "bytearray":
            return bytearray(raw)
        if how == "memoryview":
            return memoryview(raw)
        if how == "unaligned":  # the payload lands at an odd address
            return memoryview(b"\0" + raw)[1:]
        return raw

    def dump(self, case: CodecCase) -> bytes:
        return _truncate(case.data)


# --- 2. control messages ------------------------------------------------------------------------


@dataclass
class ControlCase:
    prefix: bytes                    # the 4-byte length prefix as read from the stream
    body: bytes                      # the bytes after it (the reader takes exactly the prefix's length)


CONTROL_PARSERS: Final = ("hello", "ticket", "refusal")


class ControlTarget(Target):
    """`control.body_length` -> `control.unpack` -> `Hello.from_wire` (then `incompatibility`),
    `Ticket.from_wire`, `refusal_reason`, each -> value | RemoteProtocolError. `parsers` picks which
    message parsers run on an unpacked map; `seeds` which valid messages the mutations start from
    ("hello", "ticket", "other": link, unlink, bulk requests and refusals)."""

    name = "control"

    def __init__(self, parsers: tuple[str, ...] = CONTROL_PARSERS, seeds: tuple[str, ...] = ("hello", "ticket", "other")
                 ) -> None:
        from p2pfl.peers.libp2p import bulk, control

        self.control, self.bulk, self.parsers = control, bulk, parsers
        settings = {"dataset": "digits", "model": "mlp", "gossip_steps": 1, "aggregator": "mixing", "f": 0}
        self.ours = control.Hello(schema=SCHEMA, settings=settings, round=3, degree=4,
                                  addrs=("/ip4/127.0.0.1/tcp/4001",))
        pool: list[dict[str, Any]] = []
        if "hello" in seeds:
            pool += [self.ours.to_wire(),
                     control.Hello(schema=SCHEMA, settings={**settings, "lr": 0.5, "x": None, "ok": True},
                                   round=0, addrs=("/ip4/10.0.0.1/tcp/1", "/ip6/::1/tcp/2"),
                                   peers=(f"/ip4/10.0.0.2/tcp/3/p2p/{BOB.peer_id}",), degree=0,
                                   refused="config differs").to_wire()]
        if "ticket" in seeds:
            pool += [bulk.Ticket.issue(4001).to_wire(), bulk.Ticket(0).to_wire(), bulk.Ticket(65535, bytes(16),
                                                                                               bytes(32)).to_wire()]
        if "other" in seeds:
            pool += [{"t": "link"}, {"t": "unlink", "round": 2}, {"t": "bulk"}]
            if hasattr(control, "refusal"):
                pool.append(control.refusal("not on the allowlist"))
        self.seeds = pool

    def case(self, rng: random.Random) -> ControlCase:
        msg: Any = copy.deepcopy(rng.choice(self.seeds))
        for _ in range(rng.choice((0, 1, 1, 2, 3, 4))):
            msg = self._mutate_map(rng, msg)
        body = msgpack.packb(msg, use_bin_type=rng.random() < 0.9)
        if rng.random() < 0.15:
            for _ in range(rng.randint(1, 3)):
                body = mutate_bytes(rng, body)
        n = len(body)
        if rng.random() < 0.1:
            limit = self.control.MAX_CONTROL_BYTES
            n = rng.choice((0, 1, n - 1, n + 1, limit, limit + 1, 2**31, 2**32 - 1))
        return ControlCase(struct.pack(">I", n % 2**32), body)

    @staticmethod
    def _mutate_map(rng: random.Random, msg: Any) -> Any:
        if not isinstance(msg, dict):
            return msg
        keys = list(msg)
        op = rng.randrange(11)
        if op == 0 and keys:  # a field under a bytes key of the same name (msgpack keeps str and bytes apart)
            k = rng.choice(keys)
            if isinstance(k, str):
                msg[k.encode()] = msg.pop(k)
        elif op == 1:  # an extra key of str, bytes or int type
            msg[rand_key(rng)] = rand_value(rng, 1)
        elif op == 2 and keys:
            del msg[rng.choice(keys)]
        elif op in (3, 4) and keys:  # a wrong type (or a huge value) for a field
            msg[rng.choice(keys)] = rand_value(rng)
        elif op == 5:
            msg["v"] = rng.choice((0, 2, -1, True, False, 1.0, "1", None, 2**64 - 1, -(2**63), [1]))
        elif op == 6:
            msg["t"] = rng.choice(("hello", "bulk", "link", "", "HELLO", 1, None, b"hello"))
        elif op == 7 and isinstance(msg.get("settings"), dict):  # settings: keys of any type, nested values
            if rng.random() < 0.8:
                msg["settings"][rand_key(rng)] = rand_value(rng, 1)
            else:  # at and past the size bound
                msg["settings"] = {f"k{i}": i for i in range(rng.choice((63, 64, 65, 1000)))}
        elif op == 8:  # lists at and past their bounds (current and older limits), entries of the wrong type or size
            field = rng.choice(("addrs", "peers"))
            n = rng.choice((0, 1, 16, 17, 32, 33, 64, 65, 256, 257))
            item = rng.choice(("/ip4/1.2.3.4/tcp/1", "x" * 256, "x" * 257, "x" * 511, "x" * 512, 1, None, b"x", ["x"]))
            msg[field] = [item] * n
        elif op == 9:
            field = rng.choice(("round", "degree", "port"))
            msg[field] = rng.choice((0, 1, -1, 65535, 65536, 2**63 - 1, 2**64 - 1, -(2**63), True, 1.5, "1", None))
        else:
            field = rng.choice(("token", "key", "schema", "config", "refused"))
            msg[field] = rng.choice((b"", bytes(15), bytes(16), bytes(17), bytes(31), bytes(32), bytes(33), "x" * 16,
                                     "x" * 32, "", None, 0, big_str(rng), bytearray(16), "\n[fake] round 9 done\x1b[2J",
                                     "x" * 256, "x" * 257))
            if rng.random() < 0.2:  # a refusal with a forged reason
                msg["t"], msg["reason"] = "refused", msg[field]
        return msg

    def check(self, case: ControlCase) -> None:
        control, peer = self.control, BOB.peer_id
        (claimed,) = struct.unpack(">I", case.prefix)
        try:
            n = control.body_length(case.prefix, peer)
        except RemoteProtocolError as e:
            assert e.reason is Reject.OVERSIZE and claimed > control.MAX_CONTROL_BYTES, f"body_length refused a fitting length: {e}"
            check_error(e)
            return
        assert n == claimed and 0 <= n <= control.MAX_CONTROL_BYTES, f"body_length misread the prefix: {claimed} gave {n}"
        body = (case.body + bytes(max(0, n - len(case.body))))[:n]  # exactly what the reader hands over
        try:
            msg = control.unpack(body, peer)
        except RemoteProtocolError as e:
            check_error(e)
            return
        assert type(msg) is dict and type(msg.get("t")) is str, f"unpack returned a non-map or untyped map: {type(msg).__name__}"
        parsers: dict[str, tuple[Callable[..., Any], Callable[[Any], None]]] = {
            "hello": (control.Hello.from_wire, self._check_hello),
            "ticket": (self.bulk.Ticket.from_wire, self._check_ticket),
        }
        if hasattr(control, "refusal_reason"):
            parsers["refusal"] = (control.refusal_reason, self._check_refusal)
        for name in self.parsers:
            if name not in parsers:
                continue
            parse, sane = parsers[name]
            try:
                value = parse(msg, peer)
            except RemoteProtocolError as e:
                check_error(e)
            else:
                sane(value)

    def _check_hello(self, h: Any) -> None:
        control = self.control
        assert isinstance(h, control.Hello) and isinstance(h.version, int), "from_wire returned a non-Hello"
        if h.version == control.PROTOCOL_VERSION:
            assert isinstance(h.schema, str) and isinstance(h.config, str), "hello with a non-str schema/config"
            assert isinstance(h.settings, dict) and all(
                type(k) is str and (v is None or isinstance(v, (str, int, float, bool))) for k, v in h.settings.items()
            ), "hello: settings not a map of str to scalars"
            assert type(h.round) is int and h.round >= 0 and type(h.degree) is int, "hello with a bad round/degree"
            for seq, limit in ((h.addrs, control.MAX_ADDRS), (h.peers, control.MAX_PEERS)):
                assert isinstance(seq, tuple) and len(seq) <= limit and all(type(a) is str for a in seq), "hello with bad addrs/peers"
            assert h.refused is None or isinstance(h.refused, str), "hello with a non-str refused"
        problem = control.incompatibility(self.ours, h)  # what the transport runs on every parsed hello
        # ... and logs and sends back in a refusal: what the peer sent must arrive escaped and bounded
        assert problem is None or (isinstance(problem, str) and problem.isprintable() and len(problem) <= 2000), \
            f"incompatibility: {problem[:200]!r}"

    @staticmethod
    def _check_refusal(reason: Any) -> None:
        assert reason is None or (type(reason) is str and reason.isprintable() and len(reason) <= 2000), \
            f"refusal_reason: {reason[:200]!r}"

    def _check_ticket(self, t: Any) -> None:
        if t is None:
            return
        assert isinstance(t, self.bulk.Ticket), "Ticket.from_wire returned a non-Ticket"
        assert type(t.port) is int and 1 <= t.port <= 65535, f"ticket with a bad port: {t.port!r}"
        assert type(t.token) is bytes and len(t.token) == self.bulk.TOKEN_BYTES, "ticket with a bad token"
        assert type(t.key) is bytes and len(t.key) == self.bulk.KEY_BYTES, "ticket with a bad key"

    def dump(self, case: ControlCase) -> bytes:
        return _truncate(case.prefix + case.body)


# --- 3. checkpoint ------------------------------------------------------------------------------


@dataclass
class CheckpointCase:
    data: bytes | None               # the bytes of checkpoint.pt (None: no such file)
    how: str                         # file: data is the file; dir: checkpoint.pt is a folder; missing: no file
    valid: bool = False              # an untouched snapshot, written by checkpoint.write: it must load back
    max_round: int | None = 30       # load's bound on the round (the node passes its `rounds`)


def _scratch_root() -> str | None:
    """A RAM-backed folder when there is one: every case writes a file."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class CheckpointTarget(Target):
    """`checkpoint.load` -> Checkpoint | ConfigError; then, for an accepted checkpoint,
    `Checkpoint.apply(trainer)` -> None | ConfigError, a refusal leaving the trainer unchanged.

    Structural mutations are re-sealed (`checkpoint.seal`, when the module has one) so that they
    reach the checks behind the integrity seal; byte mutations are sealed or left as they are.
    `apply=False` checks `load` alone."""

    name = "checkpoint"
    KEYS: Final = ("version", "round", "peer_id", "schema", "model", "optimizer", "generator", "order", "cursor",
                   "extra")

    def __init__(self, apply: bool = True) -> None:
        import torch

        from p2pfl.peers import checkpoint

        self.torch, self.checkpoint, self.apply = torch, checkpoint, apply
        self.seal: Callable[[bytes], bytes] | None = getattr(checkpoint, "seal", None)
        self.bounded = "max_round" in inspect.signature(checkpoint.load).parameters
        trainer = self._trainer(seed=1)
        trainer.train_round(0)
        self.snapshots = [checkpoint.snapshot(trainer, round=1, peer_id=ALICE.peer_id, schema=SCHEMA),
                          checkpoint.snapshot(trainer, round=0, peer_id=BOB.peer_id, schema="s", extra={"rep": [1.0]})]
        self.states = [torch.load(io.BytesIO(b), weights_only=True) for b in self.snapshots]
        self.plain = [self._save(s) for s in self.states]  # torch.save bytes without a seal
        self.target = self._trainer(seed=2)              # what an accepted checkpoint is applied to
        self.dir = Path(tempfile.mkdtemp(prefix="p2pfl-fuzz-", dir=_scratch_root()))
        self.folder = self.dir / "ck"

    def _trainer(self, seed: int) -> Any:
        torch = self.torch
        from p2pfl.learn.models import make_model
        from p2pfl.learn.train import LocalTrainer, TrainConfig

        model = make_model("mlp", (4,), 2, hidden=(3,), seed=seed)
        x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 2
        return LocalTrainer(model, x, y, TrainConfig(momentum=0.9, batch_size=4), torch.Generator().manual_seed(seed))

    def _save(self, obj: Any) -> bytes:
        buf = io.BytesIO()
        self.torch.save(obj, buf)
        return buf.getvalue()

    def _sealed(self, data: bytes) -> bytes:
        if self.seal is None:
            return data
        try:
            return self.seal(data)
        except Exception:
            return data

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def case(self, rng: random.Random) -> CheckpointCase:
        i = rng.randrange(len(self.snapshots))
        how = rng.randrange(20)
        max_round = rng.choice((30, 30, 1, None))
        if how == 0:
            return CheckpointCase(self.snapshots[i], "file", valid=True, max_round=max_round)
        if how == 1:
            return CheckpointCase(None, rng.choice(("dir", "missing")), max_round=max_round)
        if how <= 10:  # a well-formed file of a mutated state
            data = self._sealed(self._structural(rng, self.states[i]))
        elif how <= 15:  # a damaged zip behind a valid seal: torch.load's own parsing
            data = self.plain[i]
            for _ in range(rng.choice((1, 1, 2, 4))):
                data = mutate_bytes(rng, data)
            data = self._sealed(data)
        else:  # damage after sealing: the seal's parsing
            data = self.snapshots[i]
            for _ in range(rng.choice((1, 1, 2))):
                data = mutate_bytes(rng, data)
        return CheckpointCase(data, "file", max_round=max_round)

    def _structural(self, rng: random.Random, state: dict[str, Any]) -> bytes:
        """torch.save bytes of a mutated state dict."""
        torch = self.torch
        s: Any = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}
        for _ in range(rng.choice((1, 1, 2, 3))):
            op = rng.randrange(11)
            if op == 0:
                s.pop(rng.choice(self.KEYS), None)
            elif op in (1, 2):
                s[rng.choice(self.KEYS)] = self._value(rng)
            elif op == 3:  # a non-finite or altered model tensor
                name = rng.choice(sorted(s["model"], key=repr)) if isinstance(s.get("model"), dict) and s["model"] else None
                if name is not None and self._dense(s["model"][name]):
                    t = s["model"][name].contiguous().clone()
                    if t.numel() and t.is_floating_point():
                        t.view(-1)[rng.randrange(t.numel())] = rng.choice((math.nan, math.inf, -math.inf, 1e38))
                    variants = [t, t.reshape(-1), self._value(rng)]
                    variants += [] if t.is_complex() else [t.double(), t.long()]
                    variants += [t[:0]] if t.dim() >= 1 else []
                    variants += [t.t()] if t.dim() == 2 else []
                    s["model"][name] = rng.choice(variants)
            elif op == 4 and isinstance(s.get("model"), dict):
                s["model"][rng.choice(("w", 0, "", "0.weight", b"0.bias"))] = self._value(rng)
            elif op == 5:
                s["round"] = rng.choice((-1, 2**63 - 1, 2**63, 2**64, 2**70, 10**30, 1.5, math.nan, math.inf, True, "1",
                                         torch.tensor(3), torch.tensor([1, 2]), None))
            elif op == 6:
                s["cursor"] = rng.choice((-1, 2**63, 10**30, 1.5, math.nan, "0", torch.tensor(1), None, 10**6, 8, 9))
            elif op == 7:
                s["version"] = rng.choice((0, 1, 2, 3, True, 1.0, 2.0, "1", None, torch.tensor(2)))
            elif op == 8:  # optimizer state with non-finite momentum, wrong shapes or types
                opt = s.get("optimizer")
                if isinstance(opt, dict) and isinstance(opt.get("state"), dict) and opt["state"]:
                    slot = opt["state"][rng.choice(sorted(opt["state"], key=repr))]
                    if isinstance(slot, dict) and slot:
                        k = rng.choice(sorted(slot, key=repr))
                        nan = (torch.full_like(slot[k], math.nan) if self._dense(slot[k]) and slot[k].is_floating_point()
                               else math.nan)
                        slot[k] = rng.choice((nan, torch.zeros(7), "x", None, [nan]))
                elif isinstance(opt, dict) and isinstance(opt.get("param_groups"), list) and opt["param_groups"]:
                    opt["param_groups"][0][rng.choice(("lr", "momentum", "params", "x"))] = self._value(rng)
                else:
                    s["optimizer"] = self._value(rng)
            elif op == 9:
                s["extra"] = rng.choice(({"rep": [math.nan]}, {0: 1}, {b"k": 1}, {"deep": self._deep(40)}, [], None))
            else:
                states = [torch.zeros(3, dtype=torch.uint8), torch.zeros(5056, dtype=torch.int64), None, "g",
                          torch.zeros(2, 2, dtype=torch.uint8)]
                if self._dense(s.get("generator")):  # the right size, impossible contents
                    states += [torch.full_like(s["generator"], 255), s["generator"].flip(0)]
                s["generator"] = rng.choice(states)
                s["order"] = rng.choice((torch.tensor([0.5, 1.5]), torch.zeros(2, 2, dtype=torch.long),
                                         torch.tensor([-1, 7]), torch.tensor([2**62]), s.get("order"), [0, 1],
                                         torch.arange(8).flip(0), torch.zeros(8, dtype=torch.long),
                                         torch.arange(8, dtype=torch.int32)))
        if rng.random() < 0.05:
            s = rng.choice(([1, 2], torch.zeros(2), 5, None, "checkpoint", (s,), self._deep(400)))
        return self._save(s)

    def _dense(self, t: Any) -> bool:
        """A tensor the mutators can edit in place (a sparse one, from an earlier mutation, cannot)."""
        return isinstance(t, self.torch.Tensor) and t.layout == self.torch.strided

    @staticmethod
    def _deep(n: int) -> Any:
        """Nested lists, deeper than a checker that recurses without a bound may go."""
        x: Any = []
        for _ in range(n):
            x = [x]
        return x

    def _value(self, rng: random.Random) -> Any:
        torch = self.torch
        return rng.choice((None, "x", "", 1, -1, 0, 2**70, 1.5, math.nan, math.inf, True, [], {}, [1, "a"],
                           {"a": 1}, {0: 1}, b"bytes", torch.tensor(math.nan), torch.tensor([1, 2]),
                           torch.zeros(3, dtype=torch.uint8), torch.full((2,), math.inf), torch.zeros(0),
                           torch.zeros(2, dtype=torch.complex64), torch.zeros(2).to_sparse()))

    def check(self, case: CheckpointCase) -> None:
        ck = self.checkpoint
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir()
        if case.how == "dir":
            (self.folder / ck.FILENAME).mkdir()
        elif case.how == "file":
            assert case.data is not None
            if case.valid:
                ck.write(self.folder, case.data)
            else:  # any bytes may sit in the file (damage, an older version, hand edits): bypass write's checks
                (self.folder / ck.FILENAME).write_bytes(case.data)
        try:
            with warnings.catch_warnings():  # torch warns about every odd pickle protocol a mutant claims
                warnings.simplefilter("ignore", UserWarning)
                if self.bounded:
                    got = ck.load(self.folder, map_location="cpu", max_round=case.max_round)
                else:
                    got = ck.load(self.folder, map_location="cpu")
        except ConfigError:
            assert not case.valid, "a valid checkpoint was refused"
            return
        self._check_loaded(got)
        if self.bounded and case.max_round is not None:
            assert got.round <= case.max_round, f"accepted a round past max_round: {got.round} > {case.max_round}"
        if case.valid:
            state = self.states[self.snapshots.index(case.data)]
            assert got.round == state["round"] and got.peer_id == state["peer_id"], "round/peer_id changed"
            assert all(self.torch.equal(got.model[k], v) for k, v in state["model"].items()), "model changed"
        if not self.apply:
            return
        before = self._trainer_state()
        try:
            got.apply(self.target)
        except ConfigError:
            assert not case.valid, "a valid checkpoint does not apply to a trainer of its model"
            assert self._trainer_state() == before, "a refused checkpoint changed the trainer"

    def _trainer_state(self) -> bytes:
        t = self.target
        return self._save([t.model.state_dict(), t.optimizer.state_dict(), t.generator.get_state(), t._order,
                           t._cursor])

    def _check_loaded(self, c: Any) -> None:
        """What a caller may rely on once load returned."""
        torch = self.torch
        assert isinstance(c, self.checkpoint.Checkpoint), "load returned a non-Checkpoint"
        assert type(c.round) is int and c.round >= 0, f"accepted a bad round: {c.round!r}"
        assert type(c.cursor) is int and c.cursor >= 0, f"accepted a bad cursor: {c.cursor!r}"
        assert type(c.peer_id) is str and type(c.schema) is str, "accepted non-str peer_id/schema"
        assert isinstance(c.model, dict) and all(
            type(k) is str and isinstance(v, torch.Tensor) for k, v in c.model.items()), "accepted a model of non-tensors"
        assert all(v.layout == torch.strided for v in c.model.values()), "accepted a sparse model tensor"
        assert all(bool(torch.isfinite(v).all()) for v in c.model.values() if v.is_floating_point()), \
            "accepted a NaN/Inf model"
        assert isinstance(c.optimizer, dict), "accepted a non-dict optimizer state"
        assert isinstance(c.generator, torch.Tensor) and c.generator.dtype == torch.uint8, "accepted a bad generator"
        assert isinstance(c.order, torch.Tensor), "accepted a non-tensor order"
        assert isinstance(c.extra, dict), "accepted non-dict extra"

    def dump(self, case: CheckpointCase) -> bytes:
        return _truncate(case.how.encode() + b":" + (case.data or b""))


# --- 4. config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A TOML literal written as is (datetimes, deep nesting, a 5000-digit integer)."""

    text: str


@dataclass
class ConfigCase:
    kind: str                        # scenario | peer
    values: dict[Any, Any] | None    # the dict form (what the CLI hands over)
    text: bytes | None               # the file form
    rendered: bool = False           # text is `values` rendered without mutation: both forms must agree


_SPEC_STRS: Final = (
    "ring", "torus", "exponential", "full", "regular:0", "regular:-1", "regular:3", "regular:4", "regular:x",
    "regular:", "regular:99999999999999999999", "erdos:0", "erdos:0.5", "erdos:nan", "erdos:inf", "erdos:1e-300",
    "erdos:1", "dirichlet:0.5", "dirichlet:0", "dirichlet:nan", "dirichlet:inf", "dirichlet:1e-300",
    "dirichlet:1e309", "classes:0", "classes:2", "classes:x", "iid", "iid:", "digits", "mnist1d", "synthetic",
    "npz:", "npz:/nonexistent.npz", "mlp", "cnn", "mixing", "mean", "median", "trimmed_mean", "krum", "multi_krum",
    "bulyan", "centered_clip", "self_centered_clip", "geometric_median", "none", "sign_flip", "gaussian", "alie",
    "label_flip", "ipm", "dissensus", "free_rider", "silent", "mimic", "dfedavg", "dfedavgm", "dfedsam", "inproc",
    "procs", "auto", "cpu", "cuda", "0/1", "1/0", "3/2", "-1/4", " 0 / 4 ", "0/4/5", "0/99999999999999999999999",
    "/", "", " ", "\0", "é", "x" * 300, "/ip4/0.0.0.0/tcp/0", "127.0.0.1", "adaptive", "mean", "noise",
)
_AGG_VALUES: Final = {  # per rule parameter: valid values, boundaries and wrong types
    "tau": (1.0, 0, -1.0, "adaptive", "x", math.nan, math.inf, True),
    "m": (1, 0, 2, 99, 1.5, None),
    "iterations": (0, 1, 3, 2**63, -1, "3"),
    "nu": (0.1, -1.0, 0, math.nan, "x"),
    "bucket_size": (1, 2, 0, 2**63, 1.0, True),
    "generator": (1, "g", None),
    "weights": ([0.5, 0.5], ["a"], [[1.0], [1.0, 2.0]], [math.nan, 1.0, 0.0], "x", {}, [True, False, False], [],
                [None], [[1.0]], [1e308, 1e308], [10**400], [0.0] * 17 + [1.0]),
    "center": ([1.0], "x", [[1.0]]),
    "nope": (1,),
}
_RULE_KEYS: Final = {"self_centered_clip": ("tau", "weights"), "centered_clip": ("tau", "iterations", "center"),
                     "multi_krum": ("m", "bucket_size"), "geometric_median": ("iterations", "nu"),
                     "trimmed_mean": ("bucket_size", "generator"), "mixing": ("weights",)}
_ATTACK_VALUES: Final = {
    "sigma": (10, -1, 0, math.inf, math.nan, "x", True),
    "scale": (2.0, 0, -1.0, 10**400),
    "eps": (0.1, 0, -1, math.nan),
    "z": (1.5, math.nan, "x", None, -3.0),
    "mode": ("mean", "noise", 1, ""),
    "peer": (0, 1, "12D3KooWa", -1, True, 1.5, 99, None, ""),
    "nope": (1,),
}
_ATTACK_PARAMS: Final = tuple({k: v} for k, vs in _ATTACK_VALUES.items() for v in vs)
_FAULTS: Final = ({"peer": 1, "at_round": 2, "restart_after_s": 1}, {"peer": 1, "at_round": 2},
                  {"peer": 2, "ms": 200}, {"peer": -1, "ms": 1}, {"peer": 1, "at_round": -1},
                  {"peer": 1, "at_round": 2, "restart_after_s": math.nan}, {"peer": 1.5, "ms": 1},
                  {"peer": 1, "ms": math.inf}, {"peer": True, "ms": 1}, {"peer": 1, "ms": "x"}, {}, {"x": 1})


def _palette(rng: random.Random, hint: Any, rule_params: list[str]) -> Any:
    """A value for a field annotated `hint`: usually of that type (boundaries included), else anything
    (a table: attack params, or rule params among `rule_params`)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and rng.random() < 0.5:
        hint = rng.choice(args)
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    r = rng.random()
    if r < 0.25:  # any type
        return rng.choice((None, True, False, 0, -1, 1.5, math.nan, "x", "", [], [1], ["a"], [[1]], {}, {"a": 1},
                           {"a": {"b": [1]}}, Raw("1979-05-27"), Raw("07:32:00"), Raw("1979-05-27T07:32:00Z"),
                           10**400, [None], [1, "a"]))
    if origin is type(None):
        return None
    if origin is bool:
        return rng.choice((True, False, 0, 1, "true"))
    if origin is int:
        return rng.choice(INTS + (5, 8, 10, 30, 10_000, 10_001, 10**400)) if r < 0.9 else rng.randint(-100, 100)
    if origin is float:
        return rng.choice(FLOATS + (0, 1, 30, 0.2, 0.05, 0.9, 10**400)) if r < 0.9 else rng.uniform(-2, 2)
    if origin is str:
        return rng.choice(_SPEC_STRS)
    if origin is tuple:
        item = args[0] if args else int
        if item is str:
            return rng.choice((["/ip4/127.0.0.1/tcp/1"], [], "x", [1], [""], ["a", "b"], ["x" * 300]))
        return rng.choice(([64], [], [0], [-1], [1, 2], 5, "x", [True], [1.5], [[1]], [2**63], [0, 1], [1, 1], [15],
                           [16], [99]))
    if origin is dict:
        if rng.random() < 0.5:
            return rng.choice(_ATTACK_PARAMS)
        return {k: rng.choice(_AGG_VALUES[k]) for k in rng.sample(rule_params, rng.choice((0, 1, 2)))}
    return rand_value(rng, 2, key_types=(str,))


class ConfigTarget(Target):
    """Scenario and peer settings loading -> Scenario | PeerSettings | ConfigError. `kinds` picks
    scenario and/or peer; `forms` the dict path (CLI overrides) and/or the file path (TOML text);
    `weights=False` keeps `weights` out of a scenario's aggregator_params (see tests/test_fuzz.py:
    a known bug there would otherwise hide every other finding of the scenario fuzz)."""

    name = "config"

    def __init__(self, kinds: tuple[str, ...] = ("scenario", "peer"), forms: tuple[str, ...] = ("dict", "text"),
                 weights: bool = True) -> None:
        from p2pfl import config
        from p2pfl.peers import settings
        from p2pfl.sim import scenario

        self.config, self.settings, self.scenario = config, settings, scenario
        self.kinds, self.forms = kinds, forms
        self.rule_params = sorted(k for k in _AGG_VALUES if weights or k != "weights")
        examples = Path(__file__).resolve().parents[1] / "examples"
        default = importlib.resources.files("p2pfl.sim").joinpath("default.toml").read_text()
        self.bases: dict[str, list[dict[str, Any]]] = {
            "scenario": [config.parse_toml(default, "default"), {}],
            "peer": [{}, {"shard": "1/4", "degree": 2}],
        }
        for path in sorted(examples.glob("*.toml")):
            values = config.parse_toml(path.read_text(), str(path))
            self.bases["peer" if path.name == "peer.toml" else "scenario"].append(values)
        self.hints = {"scenario": typing.get_type_hints(scenario.Scenario),
                      "peer": typing.get_type_hints(settings.PeerSettings)}
        self.dir = Path(tempfile.mkdtemp(prefix="p2pfl-fuzz-", dir=_scratch_root()))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def case(self, rng: random.Random) -> ConfigCase:
        kind = rng.choice(self.kinds)
        values: dict[Any, Any] = copy.deepcopy(rng.choice(self.bases[kind]))
        hints = self.hints[kind]
        for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
            op = rng.randrange(16)
            if op <= 5:
                key = rng.choice(sorted(hints))
                values[key] = _palette(rng, hints[key], self.rule_params)
            elif op == 6 and values:
                del values[rng.choice(sorted(values, key=repr))]
            elif op == 7:  # an unknown key: a near miss, or (dict form) not a str at all
                values[rng.choice(("peer", "Peers", "lr ", "", "ünï", "a.b", 1, b"lr", None, ("lr",)))] = 1
            elif op == 8 and kind == "scenario":
                values[rng.choice(("kill", "delay"))] = rng.choice((rng.choice(_FAULTS), [rng.choice(_FAULTS)] * 2,
                                                                    [], "x", [1]))
                values["engine"] = rng.choice(("procs", "procs", "inproc"))
            elif op <= 12 and kind == "scenario":  # a robust rule with its params, on an overlay it can run on
                values["aggregator"] = rng.choice(("self_centered_clip", "centered_clip", "multi_krum",
                                                   "geometric_median", "trimmed_mean", "krum", "bulyan", "median",
                                                   "mean", "mixing"))
                own = [k for k in _RULE_KEYS.get(values["aggregator"], ()) if rng.random() < 0.8 and k in self.rule_params]
                keys = own + rng.sample(self.rule_params, rng.choice((0, 0, 1)))
                values["aggregator_params"] = {k: rng.choice(_AGG_VALUES[k]) for k in keys}
                values["topology"] = rng.choice(("regular:8", "full", "full", "ring", "erdos:0.5"))
                values["f"] = rng.choice((0, 0, 1, 2))
            else:  # an attack with its params (and, in a scenario, attackers that go with it)
                values["attack"] = rng.choice(("gaussian", "mimic", "alie", "free_rider", "sign_flip", "ipm", "none"))
                keys = rng.sample(sorted(_ATTACK_VALUES), rng.choice((0, 1, 1, 2)))
                values["attack_params"] = {k: rng.choice(_ATTACK_VALUES[k]) for k in keys}
                if kind == "scenario":
                    values["attackers"] = (rng.choice((0.1, 0.1, [1], [0, 1], [99], 0.99, math.nan, -0.1, [1, 1]))
                                           if values["attack"] != "none" else 0.0)
        form = rng.choice(self.forms)
        if form == "dict":
            return ConfigCase(kind, values, None)
        text_values = {k: v for k, v in values.items() if isinstance(k, str)}
        text = render_toml(text_values).encode()
        mutated = rng.random() < 0.5
        if mutated:
            text = self._mutate_text(rng, text)
        rendered = not mutated and text_values == values and not _has(values, _not_toml)
        return ConfigCase(kind, values if rendered else None, text, rendered)

    @staticmethod
    def _mutate_text(rng: random.Random, text: bytes) -> bytes:
        op = rng.randrange(8)
        if op == 0:
            return b"x = " + b"[" * rng.choice((10, 1000, 100_000))
        if op == 1:
            return text + b"\nseed = " + b"9" * rng.choice((20, 4300, 4301, 10_000)) + b"\n"
        if op == 2:
            return rng.choice((b"\xff\xfe", b"\xef\xbb\xbf", b"lr = \"\xe9\"\n", b"\x00")) + text
        if op == 3:
            return text + rng.choice((b"\nx = {a = " * 50, b"\n[[kill]]\npeer = 1\n", b"\n[a]\n[a]\n",
                                      b"\nlr = 1\n", b"\nlr = 1e999\n", b"\nseed = -0x1\n", b"\nseed = 0x7fffffffffffffffff\n",
                                      b"\nrounds = inf\n", b"\nname = '''\n", b'\nname = "\\ud800"\n'))
        if op == 4:
            lines = text.split(b"\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])  # a duplicate key
            return b"\n".join(lines)
        return mutate_bytes(rng, text)

    def check(self, case: ConfigCase) -> None:
        result = self._load(case, case.text is None)
        if case.rendered:  # the file and the dict say the same thing: same verdict, same settings
            other = self._load(case, True)
            assert repr(result) == repr(other), f"file and dict forms disagree: {result!r} != {other!r}"

    def _load(self, case: ConfigCase, from_dict: bool) -> Any:
        cls = self.scenario.Scenario if case.kind == "scenario" else self.settings.PeerSettings
        try:
            if from_dict:
                assert case.values is not None
                got = (self.scenario.build(dict(case.values)) if case.kind == "scenario"
                       else self.settings.load(None, dict(case.values)))
            else:
                assert case.text is not None
                path = self.dir / "config.toml"
                path.write_bytes(case.text)
                got = self.scenario.load(path) if case.kind == "scenario" else self.settings.load(path, {})
        except ConfigError:
            return "ConfigError"  # messages name the source (file or flags), so only the verdict is compared
        assert isinstance(got, cls), f"load returned something else: {type(got).__name__}"
        return got

    def dump(self, case: ConfigCase) -> bytes:
        body = case.text if case.text is not None else repr(case.values).encode()
        return _truncate(case.kind.encode() + b":" + body)


def _not_toml(v: Any) -> bool:
    """A value the TOML renderer cannot write as itself (None, raw literals, bytes, other objects)."""
    return not isinstance(v, (bool, int, float, str, list, tuple, dict)) or (
        isinstance(v, dict) and any(not isinstance(k, str) for k in v))


def _has(value: Any, pred: Callable[[Any], bool]) -> bool:
    if pred(value):
        return True
    if isinstance(value, dict):
        return any(_has(v, pred) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has(v, pred) for v in value)
    return False


def toml_str(s: str) -> str:
    """A TOML basic string: every control character escaped (TOML refuses them raw, DEL included)."""
    out = []
    for c in s:
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_str(str(k))} = {toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return toml_str(repr(v))


def render_toml(values: dict[str, Any]) -> str:
    """`values` as a TOML document (None, which TOML cannot say, is left out)."""
    return "".join(f"{toml_str(k)} = {toml_value(v)}\n" for k, v in values.items() if v is not None)


# --- registry -----------------------------------------------------------------------------------

TARGETS: Final[dict[str, Callable[[], Target]]] = {
    "codec": CodecTarget,
    "control": ControlTarget,
    "checkpoint": CheckpointTarget,
    "config": ConfigTarget,
}


def make_target(name: str) -> Target:
    return TARGETS[name]()

