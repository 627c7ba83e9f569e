"""Value checks of a payload, exact and cheap: no NaN/Inf (`all_finite`), no |x| above a bound (`within`).

Both ride on one BLAS pass where they can: ``dot(a, a)`` is NaN/Inf if any element is (squares are
>= 0, so nothing cancels), and ``dot(a, a) <= (bound / 2)**2`` proves every |a_i| <= bound with room
for float32 rounding. Only a payload that fails the cheap test pays for the exact element-wise scan,
in chunks that stay in cache. f16 and bf16 (raw bits as uint16) are scanned exactly.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np

_CHUNK: Final = 1 << 16  # elements per step of the exact scans (stays in L2)
# (mask, threshold): a value is NaN/Inf iff (bits & mask) >= threshold (exponent all ones).
_NONFINITE_BITS: Final = {
    "f32": (np.uint32, 0x7FFFFFFF, 0x7F800000),
    "f16": (np.uint16, 0x7FFF, 0x7C00),
    "bf16": (np.uint16, 0x7FFF, 0x7F80),
}


_INTEGER = ("u16", "u32")


def all_finite(payload: np.ndarray, dtype: str) -> bool:
    """Exactly: no element is NaN or +-Inf."""
    if payload.size == 0 or dtype in _INTEGER:
        return True
    if dtype != "f32":
        return _bits_finite(payload, dtype)
    if payload.flags.aligned:
        return _dot_finite(payload) or _bits_finite(payload, dtype)
    # Unaligned (the receiver did not use `frame_buffer`): BLAS would take a slow path, so stream
    # the data through a small aligned scratch that stays in cache.
    scratch = np.empty(min(_CHUNK, payload.size), dtype=np.float32)
    for start in range(0, payload.size, _CHUNK):
        chunk = payload[start : start + _CHUNK]
        out = scratch[: chunk.size]
        out[...] = chunk
        if not (_dot_finite(out) or _bits_finite(out, dtype)):
            return False
    return True


def _dot_finite(a: np.ndarray) -> bool:
    """True proves every element finite: a NaN/Inf element makes dot(a, a) NaN/Inf (squares are
    >= 0, so no inf - inf cancellation). False may also mean overflow of huge finite values."""
    with np.errstate(all="ignore"):  # overflow / NaN here is an answer, not a warning
        return bool(np.isfinite(np.dot(a, a)))


def _bits_finite(payload: np.ndarray, dtype: str) -> bool:
    """Exact: an element is NaN/Inf iff its exponent bits are all ones."""
    bits_dtype, mask, threshold = _NONFINITE_BITS[dtype]
    bits = payload.view(bits_dtype)
    scratch = np.empty(min(_CHUNK, bits.size), dtype=bits_dtype)
    for start in range(0, bits.size, _CHUNK):
        chunk = bits[start : start + _CHUNK]
        out = scratch[: chunk.size]
        np.bitwise_and(chunk, mask, out=out)
        if out.max() >= threshold:
            return False
    return True


def within(payload: np.ndarray, dtype: str, max_abs: float) -> bool:
    """Every element of a finite payload has |x| <= max_abs."""
    if payload.size == 0:
        return True
    if dtype in _INTEGER:   # unsigned: |x| is x
        return int(payload.max()) <= max_abs
    if dtype == "bf16":   # raw bits: widen to float32 by shifting into the high half
        wide = np.empty(min(_CHUNK, payload.size), dtype=np.uint32)
        for start in range(0, payload.size, _CHUNK):
            chunk = payload[start:start + _CHUNK]
            out = wide[:chunk.size]
            np.left_shift(chunk.astype(np.uint32), 16, out=out)
            if float(np.abs(out.view(np.float32)).max()) > max_abs:
                return False
        return True
    with np.errstate(all="ignore"):   # an overflowing dot is an answer (scan exactly), not a warning
        norm2 = float(np.dot(payload, payload)) if dtype == "f32" else math.inf
    if norm2 <= 0.25 * max_abs * max_abs:   # half the bound: float32 rounding in the dot cannot matter
        return True
    for start in range(0, payload.size, _CHUNK):
        if float(np.abs(payload[start:start + _CHUNK]).max()) > max_abs:
            return False
    return True


def bounded(payload: np.ndarray, dtype: str, max_abs: float | None) -> str | None:
    """None if every element is finite and (with a bound) |x| <= max_abs, else "non_finite" or
    "out_of_range". One BLAS pass decides an ordinary float32 payload both ways; the exact scans run
    only when that pass cannot."""
    if max_abs is None or payload.size == 0:
        return None if all_finite(payload, dtype) else "non_finite"
    if dtype == "f32" and payload.flags.aligned:
        with np.errstate(all="ignore"):
            if float(np.dot(payload, payload)) <= 0.25 * max_abs * max_abs:   # see `within`
                return None
    if not all_finite(payload, dtype):
        return "non_finite"
    return None if within(payload, dtype, max_abs) else "out_of_range"
