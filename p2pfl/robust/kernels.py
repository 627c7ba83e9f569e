"""Chunked building blocks of the robust rules: Gram matrices and per-coordinate order statistics.

Theory of operation. The n inputs are row 0 = the peer's own vector and rows 1.. = `received` ([m, d]).
Every rule in `aggregators.py` needs one of two passes over them, and both run over column chunks, so no
[n, d] copy of the inputs is ever made (they are never stacked) and the memory used stays bounded:

- `gram` / `sq_norms`: G_ij = <x_i - a, x_j - a> for an anchor a (default: the own vector), accumulated
  in float64 over chunks. Every pairwise distance, norm and Weiszfeld/clipping step follows from G in
  [n, n] space. Centering before the product matters: models late in training are close to each other and
  far from the origin, and the textbook d2 = g_ii + g_jj - 2 g_ij on raw float32 vectors then cancels to
  noise. Rows are padded to a multiple of 8 with zeros (MKL's sgemm is ~2.5x slower at n = 31 than at 32).
- `trimmed_sum` / `closest_to_median_sum`: order statistics per coordinate with a data-oblivious comparator
  network applied to whole rows (torch.minimum / torch.maximum), either Batcher's odd-even merge sort pruned
  to the positions that are read, or bubble passes when only a few extremes must be set aside. For n <= 64
  this is several times faster than torch.sort along dim 0 on CPU and needs no index tensor.
  Input weights, when asked for, compare every input with the kept range [s_lo, s_hi] the network found
  per coordinate, in the same chunk loop; inputs that tie at a cut share the kept slots equally, so the
  weights do not depend on the order of `received`.

Invariants: tensors stay on the inputs' device and dtype (float64 only for [n]- and [n, n]-sized results);
nothing here knows rule names, f, or configuration. The only state is the cache of network layouts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import Tensor

Network = tuple[tuple[int, int], ...]

# Chunk sizes, in elements per chunk buffer unless named COLS. On a GPU, chunks only bound memory.
# CPU: every op above ATen's parallel grain (32768 elements) opens an OpenMP region, and on a machine
# whose cores are busy each region can wait a scheduler quantum for its second thread. So the Gram pass
# takes few, big chunks (16 MiB; sgemm is as fast per chunk as on the whole matrix), while the comparator
# network and the weight counting, hundreds of elementwise ops per chunk, use rows of 16384 columns that
# stay under the grain and run on the calling thread: ~1.4x slower than 2 threads on an idle machine,
# but 30x faster than parallel ops on a busy one (measured on a 2-core VM at load 5).
_GRAM_CHUNK = {"cpu": 1 << 22}
_SORT_COLS = {"cpu": 1 << 14}
_DEVICE_CHUNK = 1 << 26
_MIN_COLS = 1024  # below this, per-call overhead dominates (tests lower it to exercise chunk edges)


def _cols(elements: dict[str, int], rows: int, device: torch.device) -> int:
    return max(_MIN_COLS, elements.get(device.type, _DEVICE_CHUNK) // max(rows, 1))


def _chunks(d: int, cols: int) -> Iterator[tuple[int, int]]:
    for start in range(0, d, cols):
        yield start, min(cols, d - start)


# ---------------------------------------------------------------------------------------------- Gram


def _centered_chunks(own: Tensor, received: Tensor, anchor: Tensor | None) -> Iterator[Tensor]:
    """Yield [p, w] chunks of (x_i - anchor), p = n padded to a multiple of 8 with zero rows."""
    n, d = received.shape[0] + 1, own.shape[0]
    p = -(-n // 8) * 8
    cols = _cols(_GRAM_CHUNK, p, own.device)
    buf = own.new_zeros(p, min(cols, d))  # row 0 stays 0 when the anchor is the own vector
    for start, w in _chunks(d, cols):
        b = buf[:, :w]
        ref = own[start : start + w] if anchor is None else anchor[start : start + w]
        torch.sub(received[:, start : start + w], ref, out=b[1:n])
        if anchor is not None:
            torch.sub(own[start : start + w], ref, out=b[0])
        yield b


def gram(own: Tensor, received: Tensor, anchor: Tensor | None = None) -> Tensor:
    """[n, n] float64 Gram matrix of the inputs centered on `anchor` (default: own, so row 0 is zero)."""
    n = received.shape[0] + 1
    acc = torch.zeros(n, n, dtype=torch.float64, device=own.device)
    for b in _centered_chunks(own, received, anchor):
        acc += torch.mm(b, b.t())[:n, :n]
    return acc


def sq_norms(own: Tensor, received: Tensor, anchor: Tensor | None = None) -> Tensor:
    """[n] float64 squared norms ||x_i - anchor||^2 (the Gram diagonal, in O(n d))."""
    n = received.shape[0] + 1
    acc = torch.zeros(n, dtype=torch.float64, device=own.device)
    for b in _centered_chunks(own, received, anchor):
        acc += torch.linalg.vector_norm(b[:n], dim=1).double().square()  # fused: no [n, w] temporary
    return acc


def sq_distances(g: Tensor) -> Tensor:
    """Pairwise squared distances from a Gram matrix: g_ii + g_jj - 2 g_ij, clamped at 0."""
    diag = g.diagonal()
    return (diag[:, None] + diag[None, :] - 2.0 * g).clamp_(min=0.0)


# -------------------------------------------------------------------------------- comparator networks


@functools.cache
def batcher(n: int) -> Network:
    """Batcher's odd-even merge sort on n wires (built for the next power of two; comparators touching a
    wire >= n are dropped, which is exact because those wires would hold +inf)."""
    size = 1 << max(0, (n - 1).bit_length())
    comps: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        comps.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(comps)


def _prune(comps: Network, keep: set[int]) -> Network:
    """Drop comparators that cannot influence the wires in `keep`."""
    need, out = set(keep), []
    for i, j in reversed(comps):
        if i in need or j in need:
            need.update((i, j))
            out.append((i, j))
    return tuple(reversed(out))


def _bubble(n: int, top: int, bottom: int) -> Network:
    """Bubble the `top` largest to wires n-1, n-2, ... and then the `bottom` smallest of the rest to wires
    0, 1, ..., each in sorted order."""
    comps = [(i, i + 1) for k in range(top) for i in range(n - 1 - k)]
    hi = n - top  # wires [0, hi) still unplaced
    comps += [(i, i + 1) for k in range(bottom) for i in range(hi - 2, k - 1, -1)]
    return tuple(comps)


@functools.cache
def selection(n: int, lo: int, hi: int, exact: bool) -> Network:
    """A network after which wires lo..hi hold the order statistics lo..hi as a multiset; with `exact`,
    wires lo and hi hold exactly the lo-th and hi-th. The shorter of bubble passes (cheap when few extremes
    are set aside) and Batcher pruned to the wires that are read."""
    top, bottom = (n - hi, lo + 1 if lo < hi else 0) if exact else (n - 1 - hi, lo)
    keep = set(range(lo, hi + 1))
    bubble = _bubble(n, top, bottom)
    sorter = _prune(batcher(n), keep)
    return bubble if len(bubble) < len(sorter) else sorter


def _run(rows: list[Tensor], comps: Network, spare: Tensor) -> None:
    """Apply the comparators to the row views in place (`rows` is re-pointed; `spare` is scratch)."""
    for i, j in comps:
        a, b = rows[i], rows[j]
        torch.minimum(a, b, out=spare)
        torch.maximum(a, b, out=b)
        rows[i], spare = spare, a


# ------------------------------------------------------------------------------------- order statistics


def _tie_shared(x: Tensor, lo: Tensor | int, hi: Tensor | int, s_lo: Tensor, s_hi: Tensor) -> Tensor:
    """Kept-slot count per input, summed over the columns of x [r, w], where values tie at a cut: the
    inputs equal to s_lo (or s_hi), the values in slots lo (hi), share the kept slots holding that value."""
    r = x.shape[0]
    eq_lo, eq_hi = x == s_lo, x == s_hi
    c_lo, c_hi = eq_lo.sum(0), eq_hi.sum(0)
    below, above = (x < s_lo).sum(0), (x > s_hi).sum(0)
    # the slots holding s_lo are [below, below + c_lo - 1]; those holding s_hi [r - above - c_hi, r - above - 1]
    k_lo = torch.clamp(below + c_lo - 1, max=hi) - lo + 1
    k_hi = hi - torch.clamp(r - above - c_hi, min=lo) + 1
    w = ((x > s_lo) & (x < s_hi)).to(torch.float64)
    w += eq_lo * (k_lo.double() / c_lo)
    w += (eq_hi & (s_lo != s_hi)) * (k_hi.double() / c_hi)
    return w.sum(1)


class _KeptCounter:
    """Counts, per input, the coordinates where it fills one of the kept slots lo..hi, tied inputs sharing
    equally. Fed chunk by chunk from inside the network loop with row-sized ops, which, like the network's,
    run on the calling thread (see the chunk sizes above)."""

    def __init__(self, sources: list[Tensor], cols: int) -> None:
        ref = sources[0]
        self.sources = sources
        self.acc = torch.zeros(len(sources), cols, dtype=torch.int32, device=ref.device)  # per input, per column
        self.extra = torch.zeros(len(sources), dtype=torch.float64, device=ref.device)  # tie corrections
        self.kept = torch.empty(cols, dtype=torch.bool, device=ref.device)
        self.below_hi = torch.empty(cols, dtype=torch.bool, device=ref.device)
        self.per_col = torch.empty(cols, dtype=torch.int32, device=ref.device)

    def add(self, start: int, w: int, lo: Tensor | int, hi: Tensor | int, s_lo: Tensor, s_hi: Tensor) -> None:
        kept, below_hi, per_col = self.kept[:w], self.below_hi[:w], self.per_col[:w]
        per_col.zero_()
        for r, src in enumerate(self.sources):
            x = src[start : start + w]
            torch.ge(x, s_lo, out=kept)
            torch.le(x, s_hi, out=below_hi)
            kept.logical_and_(below_hi)  # x in [s_lo, s_hi]
            self.acc[r, :w] += kept
            per_col += kept
        tied = per_col != (hi - lo + 1)  # more inputs in [s_lo, s_hi] than kept slots: a tie at a cut (rare)
        if bool(tied.any()):
            cols = tied.nonzero().squeeze(1)
            x = torch.stack([src[start : start + w][cols] for src in self.sources])
            lo_t = lo[cols] if isinstance(lo, Tensor) else lo
            hi_t = hi[cols] if isinstance(hi, Tensor) else hi
            in_range = ((x >= s_lo[cols]) & (x <= s_hi[cols])).sum(1, dtype=torch.float64)
            self.extra += _tie_shared(x, lo_t, hi_t, s_lo[cols], s_hi[cols]) - in_range

    def counts(self) -> Tensor:
        return self.acc.sum(1, dtype=torch.float64) + self.extra


def _sort_cols(sources: list[Tensor]) -> int:
    return min(_SORT_COLS.get(sources[0].device.type, _DEVICE_CHUNK // len(sources)), sources[0].shape[0])


def _sorted_chunks(sources: list[Tensor], net: Network) -> Iterator[tuple[int, int, list[Tensor]]]:
    """Yield (start, width, rows) per column chunk, rows = the chunk of every source after the network."""
    r, d, ref = len(sources), sources[0].shape[0], sources[0]
    cols = max(_sort_cols(sources), 1)
    buf = ref.new_empty(r + 1, min(cols, d))  # the last row is the network's spare
    for start, w in _chunks(d, cols):
        b = buf[:, :w]
        for k, src in enumerate(sources):
            b[k].copy_(src[start : start + w])
        rows = list(b[:r].unbind(0))
        _run(rows, net, b[r])
        yield start, w, rows


def trimmed_sum(own: Tensor, received: Tensor, lo: int, hi: int, want_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Per coordinate, the sum of the order statistics lo..hi (0-based) of the n inputs.

    Returns (sum [d] in the input dtype, kept-slot counts per input [n] float64 or None).
    """
    sources = [own, *received.unbind(0)]
    out = torch.empty_like(own)
    counter = _KeptCounter(sources, _sort_cols(sources)) if want_weights else None
    for start, w, rows in _sorted_chunks(sources, selection(len(sources), lo, hi, want_weights)):
        o = out[start : start + w]
        o.copy_(rows[lo])
        for row in rows[lo + 1 : hi + 1]:
            o.add_(row)
        if counter is not None:
            counter.add(start, w, lo, hi, rows[lo], rows[hi])
    return out, (counter.counts() if counter is not None else None)


def closest_to_median_sum(own: Tensor, received: Tensor, selected: list[int], beta: int,
                          want_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Per coordinate, the sum of the `beta` values closest to the median of the `selected` inputs (Bulyan's
    second phase). The beta nearest values to a point form a window of the sorted column; its start is the
    number of slides s -> s + 1 that swap in a strictly nearer value (a prefix, since distances are monotone
    on each side), so equidistant values on both sides resolve to the lower window.

    Returns (sum [d], kept counts per selected input [len(selected)] float64 or None).
    """
    sources = [own if i == 0 else received[i - 1] for i in selected]
    r, ref = len(sources), own
    slides = r - beta
    out = torch.empty_like(ref)
    counter = _KeptCounter(sources, _sort_cols(sources)) if want_weights else None
    for start, w, rows in _sorted_chunks(sources, batcher(r)):
        med = rows[r // 2] if r % 2 else (rows[r // 2 - 1] + rows[r // 2]) * 0.5
        first = torch.zeros(w, dtype=torch.long, device=ref.device)
        for s in range(slides):  # slide right while the value entering is strictly nearer than the one leaving
            first += rows[s + beta] - med < med - rows[s]
        o = out[start : start + w]
        o.zero_()
        for p, row in enumerate(rows):
            if slides <= p < beta:  # inside every candidate window
                o.add_(row)
            else:
                o.add_(torch.where((first <= p) & (first + beta > p), row, 0.0))
        if counter is not None:
            s_lo, s_hi = rows[0].clone(), rows[beta - 1].clone()
            for s in range(1, slides + 1):
                torch.where(first == s, rows[s], s_lo, out=s_lo)
                torch.where(first == s, rows[s + beta - 1], s_hi, out=s_hi)
            counter.add(start, w, first, first + beta - 1, s_lo, s_hi)
    return out, (counter.counts() if counter is not None else None)
