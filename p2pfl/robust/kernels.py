"""Chunked building blocks of the robust rules: Gram matrices and per-coordinate order statistics.

Theory of operation. The n inputs are row 0 = the peer's own vector and rows 1.. = `received` ([m, d]).
Every rule in `aggregators.py` needs one of two passes over them, and both run over column chunks so the
working set stays in cache and no [n, d] copy of the inputs is ever made (the inputs are never stacked):

- `gram` / `sq_norms`: G_ij = <x_i - a, x_j - a> for an anchor a (default: the own vector), accumulated
  in float64 over chunks. Every pairwise distance, norm and Weiszfeld/clipping step follows from G in
  [n, n] space. Centering before the product matters: models late in training are close to each other and
  far from the origin, and the textbook d2 = g_ii + g_jj - 2 g_ij on raw float32 vectors then cancels to
  noise. Rows are padded to a multiple of 8 with zeros (MKL's sgemm is ~2.5x slower at n = 31 than at 32).
- `trimmed_sum` / `closest_to_median_sum`: order statistics per coordinate with a data-oblivious comparator
  network applied to whole rows (torch.minimum / torch.maximum), either Batcher's odd-even merge sort pruned
  to the positions that are read, or bubble passes when only a few extremes must be set aside. For n <= 64
  this is several times faster than torch.sort along dim 0 on CPU and needs no index tensor.
  Input weights are counted tie-aware: inputs that tie at a cut share the kept slots equally, so the
  weights do not depend on the order of `received`.

Invariants: tensors stay on the inputs' device and dtype (float64 only for [n]- and [n, n]-sized results);
nothing here knows rule names, f, or configuration. The only state is the lru_cache of network layouts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import Tensor

Network = tuple[tuple[int, int], ...]

# Elements per chunk buffer: 4 MiB of float32 fits the 2 MiB-per-core L2 of a typical server core for
# the Gram pass, 16 MiB keeps the comparator network's rows in L3. On a GPU, chunks only bound memory.
_GRAM_CHUNK = {"cpu": 1 << 20}
_SORT_CHUNK = {"cpu": 1 << 22}
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
        acc += (b[:n] * b[:n]).sum(dim=1, dtype=torch.float64)
    return acc


def sq_distances(g: Tensor) -> Tensor:
    """Pairwise squared distances from a Gram matrix: g_ii + g_jj - 2 g_ij, clamped at 0."""
    diag = g.diagonal()
    return (diag[:, None] + diag[None, :] - 2.0 * g).clamp_(min=0.0)


# -------------------------------------------------------------------------------- comparator networks


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
def selection(n: int, lo: int, hi: int, exact: bool) -> Network:
    """A network after which wires lo..hi hold the order statistics lo..hi as a multiset; with `exact`,
    wires lo - 1, lo, hi and hi + 1 (those that exist) hold exactly their order statistics. The shorter of
    bubble passes (cheap when few extremes are set aside) and Batcher pruned to the wires that are read."""
    if exact:
        top, bottom = n - hi, (lo + 1 if lo < hi else lo)
        keep = set(range(max(lo - 1, 0), min(hi + 1, n - 1) + 1))
    else:
        top, bottom = n - 1 - hi, lo
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
    """Exact kept-slot count per input when values tie at a cut: the tied inputs share the slots equally.

    x: [r, w]; slots lo..hi of each sorted column are kept; s_lo, s_hi: [w] the values in slots lo and hi.
    """
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


def _kept_weights(x: Tensor, lo: Tensor | int, hi: Tensor | int, s_lo: Tensor, s_hi: Tensor,
                  tied: Tensor) -> Tensor:
    """Per-input number of coordinates of the chunk x [r, w] where the input fills one of the kept slots
    lo..hi, fractionally where it ties with a value outside them (`tied`: [w] bool, the columns where a
    value equal to s_lo or s_hi sits outside the slots). Returns [r] float64."""
    kept = (x >= s_lo) & (x <= s_hi)
    counts = kept.sum(1, dtype=torch.float64)
    if bool(tied.any()):
        cols = tied.nonzero().squeeze(1)
        lo_t = lo[cols] if isinstance(lo, Tensor) else lo
        hi_t = hi[cols] if isinstance(hi, Tensor) else hi
        counts -= kept[:, cols].sum(1, dtype=torch.float64)
        counts += _tie_shared(x[:, cols], lo_t, hi_t, s_lo[cols], s_hi[cols])
    return counts


def trimmed_sum(own: Tensor, received: Tensor, lo: int, hi: int, want_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Per coordinate, the sum of the order statistics lo..hi (0-based) of the n inputs.

    Returns (sum [d] in the input dtype, kept-slot counts per input [n] float64 or None).
    """
    n, d = received.shape[0] + 1, own.shape[0]
    net = selection(n, lo, hi, want_weights)
    cols = _cols(_SORT_CHUNK, n, own.device)
    buf = own.new_empty(n + 1, min(cols, d))  # the last row is the network's spare
    orig = own.new_empty(n, min(cols, d)) if want_weights else None
    out = torch.empty_like(own)
    counts = torch.zeros(n, dtype=torch.float64, device=own.device) if want_weights else None
    for start, w in _chunks(d, cols):
        b = buf[:, :w]
        b[0].copy_(own[start : start + w])
        b[1:n].copy_(received[:, start : start + w])
        if orig is not None:
            orig[:, :w].copy_(b[:n])
        rows = list(b[:n].unbind(0))
        _run(rows, net, b[n])
        o = out[start : start + w]
        o.copy_(rows[lo])
        for row in rows[lo + 1 : hi + 1]:
            o.add_(row)
        if counts is not None and orig is not None:
            tied = torch.zeros_like(rows[lo], dtype=torch.bool)
            if lo > 0:
                tied |= rows[lo - 1] == rows[lo]
            if hi < n - 1:
                tied |= rows[hi + 1] == rows[hi]
            counts += _kept_weights(orig[:, :w], lo, hi, rows[lo], rows[hi], tied)
    return out, counts


def closest_to_median_sum(sources: list[Tensor], beta: int, want_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Per coordinate, the sum of the `beta` values closest to the median of the given rows (Bulyan's
    second phase). The beta nearest values to a point form a window of the sorted column; its start is the
    number of slides s -> s + 1 that swap in a strictly nearer value (a prefix, since distances are monotone
    on each side), so equidistant values on both sides resolve to the lower window.

    Returns (sum [d], kept counts per source row [r] float64 or None).
    """
    r, d, ref = len(sources), sources[0].shape[0], sources[0]
    net = batcher(r)
    cols = _cols(_SORT_CHUNK, r, ref.device)
    buf = ref.new_empty(r + 1, min(cols, d))  # the last row is the network's spare
    orig = ref.new_empty(r, min(cols, d)) if want_weights else None
    out = torch.empty_like(ref)
    counts = torch.zeros(r, dtype=torch.float64, device=ref.device) if want_weights else None
    for start, w in _chunks(d, cols):
        b = buf[:, :w]
        for k, src in enumerate(sources):
            b[k].copy_(src[start : start + w])
        if orig is not None:
            orig[:, :w].copy_(b[:r])
        rows = list(b[:r].unbind(0))
        _run(rows, net, b[r])
        med = rows[r // 2] if r % 2 else (rows[r // 2 - 1] + rows[r // 2]) * 0.5
        # slide the window right while the next value on the right is strictly nearer than its leftmost one
        start_slot = torch.zeros(w, dtype=torch.long, device=ref.device)
        for s in range(r - beta):
            start_slot += rows[s + beta] - med < med - rows[s]
        o = out[start : start + w]
        o.zero_()
        s_lo, s_hi = torch.zeros_like(rows[0]), torch.zeros_like(rows[0])
        for p, row in enumerate(rows):
            inside = (start_slot <= p) & (start_slot + beta > p)
            o.add_(torch.where(inside, row, 0.0))
            if orig is not None:
                s_lo = torch.where(start_slot == p, row, s_lo)
                s_hi = torch.where(start_slot + beta - 1 == p, row, s_hi)
        if counts is not None and orig is not None:
            kept = (orig[:, :w] >= s_lo) & (orig[:, :w] <= s_hi)
            counts += _kept_weights(orig[:, :w], start_slot, start_slot + beta - 1, s_lo, s_hi, kept.sum(0) != beta)
    return out, counts
