"""Overlay topologies and their gossip (mixing) matrices.

Theory of operation
-------------------
A topology is an undirected graph over the peers 0..n-1, held as a symmetric boolean adjacency
matrix `adj` of shape [n, n] with a False diagonal. `build_topology(spec, n, rng)` makes one from a
spec string (`ring`, `torus`, `regular:K`, `erdos:P`, `exponential`, `full`); every graph it returns
is connected, because gossip over a disconnected overlay never reaches consensus. `parse_topology`
checks the spec string alone, so a CLI can refuse `--topology foo` before it knows n.

`metropolis_hastings(adj)` turns a graph into the mixing matrix W that one gossip step applies
(x <- W x): symmetric, doubly stochastic, nonnegative, and nonzero exactly on the diagonal and the
edges. `spectral_gap(W)` = 1 - max(|lambda_2|, |lambda_n|) says how fast repeated mixing contracts
towards the average (larger is faster; 1 for the complete graph).

Invariants: pure numpy; randomness only from the injected `numpy.random.Generator`, so the same
(spec, n, seed) gives the same graph. This module knows nothing about peers, clocks or sockets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pfl.errors import ConfigError

__all__ = [
    "TOPOLOGIES",
    "TopologySpec",
    "build_topology",
    "is_connected",
    "metropolis_hastings",
    "neighbors",
    "parse_topology",
    "spectral_gap",
    "torus_shape",
]

TOPOLOGIES = ("ring", "torus", "regular:K", "erdos:P", "exponential", "full")
_ALLOWED = ", ".join(TOPOLOGIES)

# Random graphs are redrawn until they are connected; past this many draws the request is
# hopeless in practice (e.g. erdos:P far below the ln(n)/n connectivity threshold).
_MAX_DRAWS = 200


@dataclass(frozen=True)
class TopologySpec:
    """A validated topology spec: `kind` is a name from TOPOLOGIES without its parameter."""

    kind: str
    k: int | None = None  # degree, for kind == "regular"
    p: float | None = None  # edge probability, for kind == "erdos"

    def __str__(self) -> str:
        if self.kind == "regular":
            return f"regular:{self.k}"
        if self.kind == "erdos":
            return f"erdos:{self.p:g}"
        return self.kind


def _bad(detail: str) -> ConfigError:
    return ConfigError(f"topology: {detail}; allowed: {_ALLOWED}")


def parse_topology(spec: str) -> TopologySpec:
    """Validate a topology spec string without building anything (n is not needed)."""
    if not isinstance(spec, str):
        raise _bad(f"expected a string, got {type(spec).__name__}")
    name, sep, arg = spec.strip().partition(":")
    if name in ("ring", "torus", "exponential", "full") and not sep:
        return TopologySpec(name)
    if name == "regular" and sep:
        try:
            k = int(arg)
        except ValueError:
            raise _bad(f"'{spec}' needs an integer degree K >= 1 (e.g. regular:4)") from None
        if k < 1:
            raise _bad(f"'{spec}' needs an integer degree K >= 1 (e.g. regular:4)")
        return TopologySpec("regular", k=k)
    if name == "erdos" and sep:
        try:
            p = float(arg)
        except ValueError:
            raise _bad(f"'{spec}' needs an edge probability P in (0, 1] (e.g. erdos:0.2)") from None
        if not 0.0 < p <= 1.0:  # also rejects nan
            raise _bad(f"'{spec}' needs an edge probability P in (0, 1] (e.g. erdos:0.2)")
        return TopologySpec("erdos", p=p)
    raise _bad(f"unknown value '{spec}'")


def build_topology(spec: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """A connected undirected graph on n peers: symmetric bool [n, n], False diagonal.

    - `ring`: i -- i+1 (mod n); degree 2 for n >= 3 (n = 2 is a single edge, n = 1 no edge).
    - `torus`: a rows x cols wrap-around grid, see `torus_shape`; degree 4 when rows, cols >= 3,
      3 when one side is 2. A prime n has no such grid: rows = 1 and the torus IS the ring.
    - `regular:K`: a random connected K-regular graph, asymptotically uniform (needs K < n, n*K even,
      and K >= 2 unless n = 2).
    - `erdos:P`: G(n, P), redrawn until connected (ConfigError after 200 draws).
    - `exponential`: i -- i +- 2^k (mod n) for every 2^k < n; degree about 2 log2(n).
    - `full`: the complete graph.
    """
    ts = parse_topology(spec)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"topology: n (number of peers) must be an integer >= 1, got {n!r}")
    n = int(n)
    if ts.kind == "ring":
        adj = _circulant(n, [1])
    elif ts.kind == "torus":
        adj = _torus(n)
    elif ts.kind == "exponential":
        adj = _circulant(n, [1 << k for k in range(n.bit_length()) if 1 << k < n])
    elif ts.kind == "full":
        adj = ~np.eye(n, dtype=bool)
    elif ts.kind == "regular":
        assert ts.k is not None
        adj = _regular(n, ts.k, rng)
    else:
        assert ts.p is not None
        adj = _erdos(n, ts.p, rng)
    assert is_connected(adj)
    return adj


def torus_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the torus on n peers: rows = the largest divisor of n that is <= sqrt(n)."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


def _circulant(n: int, offsets: list[int]) -> np.ndarray:
    """i -- (i + o) mod n for each offset o (and, by symmetry, i -- i - o)."""
    adj = np.zeros((n, n), dtype=bool)
    i = np.arange(n)
    for o in offsets:
        j = (i + o) % n
        adj[i, j] = True
        adj[j, i] = True
    np.fill_diagonal(adj, False)
    return adj


def _torus(n: int) -> np.ndarray:
    rows, cols = torus_shape(n)
    node = np.arange(n).reshape(rows, cols)  # (rows, cols): peer id at each grid cell
    adj = np.zeros((n, n), dtype=bool)
    for shifted in (np.roll(node, 1, axis=0), np.roll(node, 1, axis=1)):
        adj[node.ravel(), shifted.ravel()] = True
        adj[shifted.ravel(), node.ravel()] = True
    np.fill_diagonal(adj, False)  # rows == 1 or cols == 1 would wrap a node onto itself
    return adj


def _regular(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    spec = f"regular:{k}"
    if k >= n:
        raise _bad(f"'{spec}' needs K < n, got n={n}")
    if (n * k) % 2:
        raise _bad(f"'{spec}' needs n*K even (each edge has two ends), got n={n}")
    if k == 1 and n > 2:
        raise _bad(f"'{spec}' is a perfect matching, disconnected for n={n}; use K >= 2")
    if k == n - 1:
        return ~np.eye(n, dtype=bool)
    if k == 2:
        # A connected 2-regular graph is one cycle: a ring over a random order of the peers.
        # (Drawing 2-regular graphs and rejecting the disconnected ones fails too often.)
        order = rng.permutation(n)
        adj = np.zeros((n, n), dtype=bool)
        adj[order, np.roll(order, 1)] = True
        adj[np.roll(order, 1), order] = True
        return adj
    for _ in range(_MAX_DRAWS):
        if 2 * k > n - 1:
            # Dense: the complement of a sparse (n-1-K)-regular graph. Minimum degree K >= n/2
            # makes it connected (Dirac), so there is nothing to reject.
            adj = ~_pairing(n, n - 1 - k, rng)
            np.fill_diagonal(adj, False)
        else:
            adj = _pairing(n, k, rng)
        if is_connected(adj):
            return adj
    raise _bad(f"'{spec}' found no connected graph on n={n} peers in {_MAX_DRAWS} draws")


def _pairing(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A random simple k-regular graph (maybe disconnected), by Steger-Wormald stub pairing.

    Shuffle the k copies of every vertex ("stubs") and pair them up two by two; keep the pairs that
    are new edges between distinct vertices and reshuffle the stubs of the rejected pairs. When no
    legal pair is left among the remaining stubs, start over. Needs k <= (n-1)/2 to finish quickly.
    """
    for _ in range(_MAX_DRAWS):
        adj = np.zeros((n, n), dtype=bool)
        stubs = np.repeat(np.arange(n), k)
        while stubs.size:
            pairs = rng.permutation(stubs).reshape(-1, 2)  # (m, 2)
            left: list[int] = []
            for a, b in pairs.tolist():
                if a != b and not adj[a, b]:
                    adj[a, b] = adj[b, a] = True
                else:
                    left += (a, b)
            stubs = np.array(left, dtype=np.int64)
            if stubs.size and not _can_pair(stubs, adj):
                break
        else:
            return adj
    raise _bad(f"'regular:{k}' could not pair the stubs of n={n} peers in {_MAX_DRAWS} tries")


def _can_pair(stubs: np.ndarray, adj: np.ndarray) -> bool:
    """Whether two of the remaining stubs could still form a legal edge."""
    v = np.unique(stubs)
    sub = adj[np.ix_(v, v)]
    np.fill_diagonal(sub, True)
    return not sub.all()


def _erdos(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    for _ in range(_MAX_DRAWS):
        upper = np.triu(rng.random((n, n)) < p, k=1)
        adj = upper | upper.T
        if is_connected(adj):
            return adj
    hint = math.log(n) / n
    raise _bad(
        f"'erdos:{p:g}' gave no connected graph on n={n} peers in {_MAX_DRAWS} draws; "
        f"connectivity needs P well above ln(n)/n = {hint:.3g}"
    )


def _check_adj(adj: np.ndarray) -> np.ndarray:
    a = np.asarray(adj)
    if (
        a.ndim != 2
        or a.shape[0] != a.shape[1]
        or a.dtype != np.bool_
        or a.diagonal().any()
        or not np.array_equal(a, a.T)
    ):
        raise ConfigError(
            "adjacency: expected a symmetric bool [n, n] matrix with a False diagonal, "
            f"got dtype={a.dtype} shape={a.shape}"
        )
    return a


def neighbors(adj: np.ndarray) -> list[list[int]]:
    """Sorted neighbour list of every peer."""
    a = _check_adj(adj)
    return [np.flatnonzero(row).tolist() for row in a]


def is_connected(adj: np.ndarray) -> bool:
    """Whether every peer reaches every other (breadth-first search from peer 0)."""
    a = _check_adj(adj)
    n = a.shape[0]
    if n <= 1:
        return True
    seen = np.zeros(n, dtype=bool)
    frontier = np.zeros(n, dtype=bool)
    seen[0] = frontier[0] = True
    while frontier.any():
        frontier = a[frontier].any(axis=0) & ~seen
        seen |= frontier
    return bool(seen.all())


def metropolis_hastings(adj: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings mixing matrix W (float64 [n, n]).

    w_ij = 1 / (1 + max(d_i, d_j)) on each edge, w_ii = 1 - sum_j w_ij, 0 elsewhere. W is symmetric
    and doubly stochastic; w_ii >= 1 / (1 + d_i) > 0, so W is aperiodic and, on a connected graph,
    its spectral gap is positive. Each peer needs only its own and its neighbours' degrees.
    """
    a = _check_adj(adj)
    deg = a.sum(axis=1)  # (n,)
    w = np.where(a, mh_weight(deg[:, None], deg[None, :]), 0.0)  # (n, n)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def mh_weight(d_i: Any, d_j: Any) -> Any:
    """The Metropolis-Hastings weight of an edge between peers of degrees d_i and d_j (scalars or
    arrays): 1 / (1 + max(d_i, d_j)). A real peer learns d_j from its neighbour's hello."""
    return 1.0 / (1.0 + np.maximum(d_i, d_j))


def spectral_gap(w: np.ndarray) -> float:
    """1 - max(|lambda_2|, |lambda_n|) of a symmetric stochastic W (1.0 for a single peer)."""
    lam = np.linalg.eigvalsh(np.asarray(w, dtype=np.float64))  # ascending; lam[-1] == 1
    if lam.size <= 1:
        return 1.0
    return float(1.0 - max(abs(lam[-2]), abs(lam[0])))
