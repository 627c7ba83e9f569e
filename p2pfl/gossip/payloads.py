"""Payload specs: what a frame of each kind must carry, checked where frames enter a peer.

Theory of operation: a peer declares, per payload kind, the wire dtype and the exact element count
it accepts (a model of d shared parameters: kind "model", f32, d values), and a bound on the
magnitude of every element. The transport checks each decoded frame against these specs before the
frame reaches the round loop (`check`), so an aggregator only ever sees vectors of the right shape
and range, and it derives its frame-size limit from the largest spec (`max_frame_bytes`), so a frame
too big for any declared payload is refused from its 4-byte length prefix, before its body is read.

Why a magnitude bound: finite values near the float32 maximum (3e38) pass the NaN/Inf check, but a
weighted sum of a few of them overflows, and a model that holds them trains to NaN. No trained model
has weights near 1e6, so refusing larger values costs an honest peer nothing. The check rides on the
finiteness test's own cheap pass: ``dot(a, a) <= (max_abs / 2)**2`` proves every |a_i| <= max_abs (with room for
float32 rounding in the dot), and only a frame that fails it pays for the exact element-wise scan.

Sans-IO: plain values in, a `RemoteProtocolError` with a counted `Reject` reason out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from p2pfl.errors import ConfigError, Reject, RemoteProtocolError
from p2pfl.gossip import codec
from p2pfl.gossip.values import bounded

DEFAULT_MAX_ABS: Final = 1e6
_ITEMSIZE: Final = {"f32": 4, "f16": 2, "bf16": 2, "u16": 2, "u32": 4}


@dataclass(frozen=True)
class PayloadSpec:
    """One payload kind: wire dtype, exact element count, largest |value| (None: no bound), and an
    optional validator of the decoded array, which returns None or a short reason it is refused (a
    ranking that is not a permutation, ...); it runs only on payloads of the right dtype and size."""

    dtype: str
    count: int
    max_abs: float | None = DEFAULT_MAX_ABS
    validate: Callable[[np.ndarray], str | None] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in codec.ALL_DTYPES:
            raise ConfigError(f"payload dtype: expected one of {codec.ALL_DTYPES}, got {self.dtype!r}")
        if type(self.count) is not int or self.count < 0:
            raise ConfigError(f"payload count: expected an int >= 0, got {self.count!r}")
        if self.max_abs is not None and not (math.isfinite(self.max_abs) and self.max_abs > 0):
            raise ConfigError(f"payload max_abs: expected a finite value > 0 or None, got {self.max_abs!r}")

    @property
    def nbytes(self) -> int:
        return self.count * _ITEMSIZE[self.dtype]


def max_frame_bytes(specs: Mapping[str, PayloadSpec]) -> int:
    """The largest frame (length prefix included) any declared payload can make: the transport's limit."""
    if not specs:
        raise ConfigError("a peer must accept at least one payload kind")
    # A real header is ~250 bytes, but its size varies with the peer ID and the ints' encodings: allow
    # the codec's header limit so that no valid frame is ever refused as oversize.
    return codec.FRAME_PREFIX_BYTES + codec.MAX_HEADER_BYTES + max(s.nbytes for s in specs.values())


def check(kind: str, dtype: str, payload: np.ndarray, specs: Mapping[str, PayloadSpec], peer: str | None) -> None:
    """Refuse a payload that does not match its kind's spec: NON_FINITE, UNKNOWN_KIND, WRONG_DTYPE,
    WRONG_SIZE, OUT_OF_RANGE or INVALID_PAYLOAD (in that order of precedence). `payload` is the
    decoded 1-D array of the frame; its finiteness and range take one pass over it (transports decode
    with the codec's own finiteness check off and rely on this one)."""
    spec = specs.get(kind)
    values = bounded(payload, dtype, spec.max_abs if spec is not None and spec.dtype == dtype else None)
    if values == "non_finite":
        raise RemoteProtocolError(Reject.NON_FINITE, "payload contains NaN or Inf", peer)
    if spec is None:
        raise RemoteProtocolError(Reject.UNKNOWN_KIND, f"kind {kind[:64]!r} is not one we accept", peer)
    if dtype != spec.dtype:
        raise RemoteProtocolError(Reject.WRONG_DTYPE, f"{kind}: dtype {dtype}, expected {spec.dtype}", peer)
    if payload.ndim != 1 or payload.size != spec.count:
        raise RemoteProtocolError(Reject.WRONG_SIZE, f"{kind}: {payload.size} values, expected {spec.count}", peer)
    if values == "out_of_range":
        raise RemoteProtocolError(Reject.OUT_OF_RANGE, f"{kind}: a value exceeds |x| <= {spec.max_abs:g}", peer)
    if spec.validate is not None:
        problem = spec.validate(payload)
        if problem is not None:
            raise RemoteProtocolError(Reject.INVALID_PAYLOAD, f"{kind}: {problem}", peer)
