"""The wire codec: one signed, self-describing frame per tensor (docs/architecture.md, "Wire format").

Theory of operation
-------------------
A frame is::

    u32 BE total   -- length of everything after these 4 bytes (= 4 + hlen + nbytes)
    u32 BE hlen    -- length of the msgpack header
    header         -- canonical msgpack map (keys sorted, minimal encodings):
                      {"digest": bin32, "dtype": "f32"|"f16"|"bf16"|"u16"|"u32", "from": peer ID, "kind": str,
                       "nbytes": int, "round": int, "schema": str, "sig": bin64, "step": int, "v": 1}
    payload        -- nbytes of little-endian tensor data

``digest`` is BLAKE3-256 of the payload; ``sig`` is the sender's Ed25519 signature over the
canonical msgpack encoding of the header map *without* "sig" (keys sorted). The receiver recovers
the public key from the "from" peer ID (Ed25519 IDs embed the key), so no key exchange is needed.

Invariants:
- The payload is never copied: `encode` returns ``[prefix + header, memoryview(payload)]`` for a
  vectored write; `decode` returns a `Frame` whose payload is ``numpy.frombuffer`` over the
  caller's buffer (keep the buffer alive and unchanged while the frame is in use).
- Decoding is strict and total: any malformed input raises `RemoteProtocolError` with a `Reject`
  reason, never another exception, never a partially-checked frame. The header must be in the
  canonical encoding byte for byte, so a frame has exactly one valid wire form (no malleability).
  Checks run cheapest-first, and the expensive payload checks (digest, NaN/Inf) only run once the
  signature has authenticated the header.
- bf16 has no numpy dtype: its payload is held as ``np.uint16`` raw bits; `Frame.tensor` views it
  as ``torch.bfloat16`` without copying. `encode` accepts a bf16 torch tensor or a uint16 array.

Replay / too-far-ahead checks are per-neighbour state and live in the round state machine, not
here. This module does no IO and imports neither trio nor libp2p; torch is imported only when the
caller hands it a tensor or asks for one.

Speed (10M float32 on a 2-core x86): digest with a multi-threaded BLAKE3 above 4 MiB; the NaN/Inf
check is ``dot(a, a)`` (one BLAS pass: any NaN/Inf makes it non-finite, so a finite result proves
every element finite) with an exact bitwise fallback when it overflows or the buffer is unaligned.
`frame_buffer` gives a receiver a buffer whose payload lands 64-byte aligned.
"""

from __future__ import annotations

import struct
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import blake3
import msgpack
import numpy as np
from cryptography.exceptions import InvalidSignature

from p2pfl.errors import LocalProtocolError, Reject, RemoteProtocolError
from p2pfl.gossip.identity import SIGNATURE_LEN, Identity, public_key_from_peer_id
from p2pfl.gossip.values import all_finite

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALL_DTYPES",
    "DTYPES",
    "FRAME_PREFIX_BYTES",
    "INT_DTYPES",
    "LENGTH_PREFIX_BYTES",
    "MAX_HEADER_BYTES",
    "VERSION",
    "Frame",
    "all_finite",
    "decode",
    "encode",
    "frame_buffer",
    "read_frame_length",
    "storage",
]

VERSION: Final = 1
LENGTH_PREFIX_BYTES: Final = 4  # the u32 total length
FRAME_PREFIX_BYTES: Final = 8  # u32 total length + u32 header length
MAX_HEADER_BYTES: Final = 1024  # a real header is ~250 bytes
MAX_KIND_CHARS: Final = 64
MAX_SCHEMA_CHARS: Final = 128
DIGEST_LEN: Final = 32
_MAX_INT: Final = 2**63 - 1
_MAX_TOTAL: Final = 2**32 - 1

# Wire dtype -> little-endian numpy storage dtype (bf16: raw bits as uint16). Floats carry models;
# the unsigned integers carry indices such as rankings (they are never NaN/Inf).
_NP_DTYPES: Final[dict[str, np.dtype[Any]]] = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2"),
                                               "u16": np.dtype("<u2"), "u32": np.dtype("<u4")}
DTYPES: Final = ("f32", "f16", "bf16")      # the float wire dtypes
INT_DTYPES: Final = ("u16", "u32")
ALL_DTYPES: Final = DTYPES + INT_DTYPES
# a numpy dtype -> its wire dtype when the caller does not say (uint16 alone is bf16 bits)
_WIRE_DTYPES: Final = {"<f4": "f32", "<f2": "f16", "<u2": "bf16", "<u4": "u32"}

_FIELDS: Final = ("digest", "dtype", "from", "kind", "nbytes", "round", "schema", "sig", "step", "v")
_UNSIGNED_FIELDS: Final = tuple(f for f in _FIELDS if f != "sig")
_FIELD_SET: Final = frozenset(_FIELDS)

_PREFIX: Final = struct.Struct(">II")
_U32: Final = struct.Struct(">I")
_BLAKE3_MT_BYTES: Final = 1 << 22  # below ~4 MiB the thread pool costs more than it saves
_ALIGN: Final = 64


@dataclass(frozen=True, eq=False)
class Frame:
    """A decoded (verified) frame. `payload` is a 1-D little-endian array viewing the receive
    buffer: float32 / float16, or uint16 raw bits for bf16. `sender` is the authenticated peer ID."""

    kind: str
    sender: str
    round: int
    step: int
    schema: str
    dtype: str
    payload: np.ndarray

    def __post_init__(self) -> None:
        expected = _NP_DTYPES.get(self.dtype)
        if expected is None:
            raise LocalProtocolError(f"Frame.dtype must be one of {ALL_DTYPES}, got {self.dtype!r}")
        p = self.payload
        if not isinstance(p, np.ndarray) or p.ndim != 1 or p.dtype != expected:
            raise LocalProtocolError(f"Frame.payload must be a 1-D {expected} array for {self.dtype}")

    def tensor(self) -> torch.Tensor:
        """The payload as a 1-D torch tensor of the wire dtype, sharing memory (no copy). If the
        receive buffer is read-only (``bytes``), the tensor must not be written to. Integer payloads
        come as an int64 copy (torch does little with unsigned 16/32-bit tensors)."""
        import torch

        if self.dtype in INT_DTYPES:
            return torch.from_numpy(self.payload.astype(np.int64))

        arr = self.payload.view(np.int16) if self.dtype == "bf16" else self.payload
        if arr.flags.writeable:
            t = torch.from_numpy(arr)
        else:
            with warnings.catch_warnings():  # torch warns about read-only buffers; we documented it
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.dtype == "bf16" else t


# --- encode -----------------------------------------------------------------------------------


def encode(
    identity: Identity,
    *,
    kind: str,
    round: int,
    step: int,
    schema: str,
    payload: np.ndarray | torch.Tensor,
    dtype: str | None = None,
) -> list[bytes | memoryview]:
    """Sign and frame `payload`. Returns ``[prefix + header, payload bytes]`` for a vectored
    write; the second buffer is a view of the payload's own memory (no copy), so do not modify
    the tensor until the write completes. `payload` must be a 1-D contiguous CPU float32/float16/
    bfloat16 tensor or float32/float16/uint16(=bf16 bits) little-endian array; `schema` is the
    caller's hash of parameter names/shapes/dtypes. `dtype` names the wire dtype (needed for u16,
    whose storage is bf16's); None infers it. Raises `LocalProtocolError` on misuse."""
    arr, dtype = _wire_array(payload, dtype)
    problem = _field_problem(kind, round, step, schema)
    if problem:
        raise LocalProtocolError(f"cannot encode frame: {problem}")
    body = arr.view(np.uint8).data  # a memoryview of the payload's own memory
    header: dict[str, Any] = {
        "digest": _digest(body),
        "dtype": dtype,
        "from": identity.peer_id,
        "kind": kind,
        "nbytes": body.nbytes,
        "round": round,
        "schema": schema,
        "step": step,
        "v": VERSION,
    }
    header["sig"] = identity.sign(_pack(header, _UNSIGNED_FIELDS))
    head = _pack(header, _FIELDS)
    total = 4 + len(head) + body.nbytes
    if total > _MAX_TOTAL:
        raise LocalProtocolError(f"frame of {total} bytes does not fit the u32 length prefix")
    return [_PREFIX.pack(total, len(head)) + head, body]


def storage(dtype: str) -> np.dtype[Any]:
    """The little-endian numpy dtype a wire dtype's payload is held in."""
    return _NP_DTYPES[dtype]


def _wire_array(payload: object, wire: str | None = None) -> tuple[np.ndarray, str]:
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if torch is not None and isinstance(payload, torch.Tensor):
        if payload.device.type != "cpu":
            raise LocalProtocolError(f"payload tensor is on {payload.device}; move it to CPU first")
        t = payload.detach()
        if t.dtype == torch.bfloat16:
            payload = t.view(torch.int16).numpy().view(np.uint16)
        elif t.dtype in (torch.float32, torch.float16):
            payload = t.numpy()
        else:
            raise LocalProtocolError(f"payload dtype {t.dtype} is not float32/float16/bfloat16")
    if not isinstance(payload, np.ndarray):
        raise LocalProtocolError(f"payload must be a numpy array or torch tensor, not {type(payload)}")
    dtype = _WIRE_DTYPES.get(payload.dtype.str) if wire is None else wire
    if dtype is None or dtype not in _NP_DTYPES or payload.dtype.str != _NP_DTYPES[dtype].str:
        raise LocalProtocolError(
            f"payload dtype {payload.dtype.str} is not the storage of wire dtype {wire!r}" if wire else
            f"payload dtype {payload.dtype.str} is not little-endian float32, float16, uint16 (bf16 bits) "
            "or uint32")
    if payload.ndim != 1 or not payload.flags.c_contiguous:
        raise LocalProtocolError("payload must be a 1-D contiguous array (flatten it first)")
    return payload, dtype


def _field_problem(kind: object, round: object, step: object, schema: object) -> str | None:
    """Shared by encode (LocalProtocolError) and decode (BAD_HEADER): what a header may carry."""
    if type(kind) is not str or not 0 < len(kind) <= MAX_KIND_CHARS:
        return f"kind must be a non-empty str of at most {MAX_KIND_CHARS} characters"
    if type(schema) is not str or not 0 < len(schema) <= MAX_SCHEMA_CHARS:
        return f"schema must be a non-empty str of at most {MAX_SCHEMA_CHARS} characters"
    for name, value in (("round", round), ("step", step)):
        if type(value) is not int or not 0 <= value <= _MAX_INT:
            return f"{name} must be an int in [0, 2**63)"
    return None


# --- stream helpers ---------------------------------------------------------------------------


def read_frame_length(
    prefix: bytes | bytearray | memoryview, max_frame_bytes: int, *, peer: str | None = None
) -> int:
    """Parse the 4-byte length prefix; return how many bytes follow it. Lets a stream reader
    refuse an oversize frame (`Reject.OVERSIZE`; the limit counts the prefix too) before reading
    it into memory."""
    if len(prefix) != LENGTH_PREFIX_BYTES:
        raise LocalProtocolError(f"length prefix is {LENGTH_PREFIX_BYTES} bytes, got {len(prefix)}")
    (total,) = _U32.unpack(prefix)
    if LENGTH_PREFIX_BYTES + total > max_frame_bytes:
        raise _oversize(LENGTH_PREFIX_BYTES + total, max_frame_bytes, peer)
    if total < 4:
        raise RemoteProtocolError(Reject.BAD_LENGTH, f"length {total} cannot hold a header length", peer)
    return total


def frame_buffer(
    prefix: bytes | bytearray | memoryview,
    *,
    max_frame_bytes: int,
    peer: str | None = None,
    alloc: Callable[[int], np.ndarray] | None = None,
) -> memoryview:
    """Given a frame's first 8 bytes, allocate its receive buffer: a writable memoryview of the
    whole frame with those 8 bytes filled in, placed so the payload starts 64-byte aligned (the
    fast path of `decode`). Fill ``view[8:]`` from the stream, then ``decode(view, ...)``.
    `alloc(n)` returns a uint8 array of n bytes (a pool's; default np.empty); ``view.obj`` is it."""
    if len(prefix) != FRAME_PREFIX_BYTES:
        raise LocalProtocolError(f"frame prefix is {FRAME_PREFIX_BYTES} bytes, got {len(prefix)}")
    total = read_frame_length(bytes(prefix[:4]), max_frame_bytes, peer=peer)
    (hlen,) = _U32.unpack(bytes(prefix[4:]))
    if hlen > total - 4 or hlen > MAX_HEADER_BYTES:
        raise RemoteProtocolError(Reject.BAD_LENGTH, f"header length {hlen} does not fit frame", peer)
    size = LENGTH_PREFIX_BYTES + total
    # np.empty, not bytearray: zero-filling 40 MB first would cost more than reading it
    raw = alloc(size + _ALIGN) if alloc is not None else np.empty(size + _ALIGN, dtype=np.uint8)
    shift = -(raw.ctypes.data + FRAME_PREFIX_BYTES + hlen) % _ALIGN
    view = raw.data[shift : shift + size]
    view[:FRAME_PREFIX_BYTES] = prefix
    return view


# --- decode -----------------------------------------------------------------------------------


def decode(
    data: bytes | bytearray | memoryview,
    *,
    schema: str | None,
    max_frame_bytes: int,
    peer: str | None = None,
    check_finite: bool = True,
) -> Frame:
    """Verify and decode one complete frame (length prefix included) without copying its payload.

    `schema`: the expected schema hash, or None to accept any. `max_frame_bytes`: the largest
    frame accepted, prefix included. `peer`: the authenticated transport peer the bytes came
    from; when given, a frame whose "from" differs is rejected (`Reject.FORGED_SENDER`) and every
    error carries it. `check_finite=False` skips the NaN/Inf scan, for a caller that checks the
    payload itself (`payloads.check` does, together with its range, in one pass). Raises
    `RemoteProtocolError` with the reason for any defect.
    """
    buf = _byte_view(data)
    head, body = _split(buf, max_frame_bytes, peer)
    h = _parse_header(head, peer)
    sender: str = h["from"]
    if peer is not None and sender != peer:
        raise RemoteProtocolError(Reject.FORGED_SENDER, f"frame claims to be from {sender}", peer)
    try:
        public_key_from_peer_id(sender).verify(h["sig"], _pack(h, _UNSIGNED_FIELDS))
    except InvalidSignature:
        raise RemoteProtocolError(Reject.BAD_SIGNATURE, f"not signed by {sender}", peer) from None
    who = peer or sender  # authenticated from here on
    if schema is not None and h["schema"] != schema:
        raise RemoteProtocolError(Reject.WRONG_SCHEMA, f"schema {h['schema']!r} != {schema!r}", who)
    dtype: str = h["dtype"]
    itemsize = _NP_DTYPES[dtype].itemsize
    if h["nbytes"] != body.nbytes or body.nbytes % itemsize:
        raise RemoteProtocolError(
            Reject.WRONG_SIZE, f"nbytes {h['nbytes']}, payload {body.nbytes} bytes of {dtype}", who
        )
    if _digest(body) != h["digest"]:
        raise RemoteProtocolError(Reject.BAD_DIGEST, "payload does not match its digest", who)
    payload = np.frombuffer(body, dtype=_NP_DTYPES[dtype])
    if check_finite and not all_finite(payload, dtype):
        raise RemoteProtocolError(Reject.NON_FINITE, "payload contains NaN or Inf", who)
    return Frame(h["kind"], sender, h["round"], h["step"], h["schema"], dtype, payload)


def _oversize(size: int, limit: int, peer: str | None) -> RemoteProtocolError:
    return RemoteProtocolError(Reject.OVERSIZE, f"frame of {size} bytes > limit {limit}", peer)


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    try:
        mv = memoryview(data)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
    except TypeError as e:
        raise LocalProtocolError(f"decode needs a contiguous byte buffer: {e}") from None
    if not mv.c_contiguous:
        raise LocalProtocolError("decode needs a contiguous byte buffer")
    return mv


def _split(buf: memoryview, max_frame_bytes: int, peer: str | None) -> tuple[memoryview, memoryview]:
    """Check the two length fields against the data; return (header bytes, payload bytes)."""
    if buf.nbytes < FRAME_PREFIX_BYTES:
        raise RemoteProtocolError(Reject.BAD_LENGTH, f"{buf.nbytes} bytes cannot hold the prefix", peer)
    total, hlen = _PREFIX.unpack_from(buf)
    if LENGTH_PREFIX_BYTES + total > max_frame_bytes:
        raise _oversize(LENGTH_PREFIX_BYTES + total, max_frame_bytes, peer)
    if total != buf.nbytes - LENGTH_PREFIX_BYTES:
        got = buf.nbytes - LENGTH_PREFIX_BYTES
        raise RemoteProtocolError(Reject.BAD_LENGTH, f"length field {total}, got {got} bytes", peer)
    if hlen > total - 4 or hlen > MAX_HEADER_BYTES:
        raise RemoteProtocolError(Reject.BAD_LENGTH, f"header length {hlen} does not fit frame", peer)
    end = FRAME_PREFIX_BYTES + hlen
    return buf[FRAME_PREFIX_BYTES:end], buf[end:]


def _parse_header(head: memoryview, peer: str | None) -> dict[str, Any]:
    try:
        h = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:  # hostile bytes: whatever the parser raises is "bad msgpack"
        raise RemoteProtocolError(Reject.BAD_MSGPACK, f"{type(e).__name__}: {e}", peer) from None
    if not isinstance(h, dict):
        raise RemoteProtocolError(Reject.BAD_HEADER, f"header is a {type(h).__name__}, not map", peer)
    version = h.get("v")
    if type(version) is not int:
        raise RemoteProtocolError(Reject.BAD_HEADER, "missing or non-int version 'v'", peer)
    if version != VERSION:
        raise RemoteProtocolError(Reject.UNKNOWN_VERSION, f"version {version} != {VERSION}", peer)
    if h.keys() != _FIELD_SET:
        missing, extra = sorted(_FIELD_SET - h.keys()), sorted(map(repr, h.keys() - _FIELD_SET))
        raise RemoteProtocolError(Reject.BAD_HEADER, f"missing fields {missing}, unknown {extra}", peer)
    problem = _field_problem(h["kind"], h["round"], h["step"], h["schema"])
    if problem is None:
        problem = _header_problem(h)
    if problem:
        raise RemoteProtocolError(Reject.BAD_HEADER, problem, peer)
    if _pack(h, _FIELDS) != head:  # one valid encoding per header: no malleable variants
        raise RemoteProtocolError(Reject.BAD_HEADER, "header is not canonical msgpack", peer)
    try:
        public_key_from_peer_id(h["from"])
    except RemoteProtocolError as e:
        raise RemoteProtocolError(Reject.BAD_HEADER, f"'from': {e.detail}", peer) from None
    return h


def _header_problem(h: dict[str, Any]) -> str | None:
    if type(h["from"]) is not str:
        return "'from' must be a str peer ID"
    if type(h["dtype"]) is not str or h["dtype"] not in _NP_DTYPES:
        return f"dtype must be one of {ALL_DTYPES}"
    if type(h["nbytes"]) is not int or not 0 <= h["nbytes"] <= _MAX_TOTAL:
        return "nbytes must be a non-negative u32 int"
    if type(h["digest"]) is not bytes or len(h["digest"]) != DIGEST_LEN:
        return f"digest must be {DIGEST_LEN} bytes"
    if type(h["sig"]) is not bytes or len(h["sig"]) != SIGNATURE_LEN:
        return f"sig must be {SIGNATURE_LEN} bytes"
    return None


# --- shared pieces ----------------------------------------------------------------------------


def _pack(header: dict[str, Any], keys: tuple[str, ...]) -> bytes:
    """Canonical msgpack: keys in sorted order (`keys` is pre-sorted), msgpack's minimal ints."""
    return msgpack.packb({k: header[k] for k in keys}, use_bin_type=True)  # type: ignore[no-any-return]


def _digest(body: memoryview) -> bytes:
    threads = blake3.blake3.AUTO if body.nbytes >= _BLAKE3_MT_BYTES else 1
    return blake3.blake3(body, max_threads=threads).digest()
