"""Split a labelled training set among simulated peers.

Theory of operation
-------------------
`partition(labels, n_peers, spec, rng)` returns one sorted int64 index array per peer. Every sample
goes to exactly one peer and every peer gets at least `min_size` samples. Specs:

- `iid`: shuffle, then cut into n_peers near-equal pieces (sizes differ by at most one).
- `dirichlet:ALPHA`: label skew. For each class (in random order) draw peer proportions from
  Dirichlet(ALPHA, ..., ALPHA) and cut that class's shuffled indices accordingly. Small ALPHA (0.1)
  gives each peer a few dominant classes, large ALPHA (100) is close to IID. As in NIID-Bench
  (Li et al., 2022), a peer that already holds N / n_peers samples gets no share of the later
  classes, which keeps sizes bounded and lets the loop below succeed. The whole draw is repeated
  (at most 100 times) until every peer has min_size samples; if no draw does, the best one is
  topped up by moving random samples from the largest peers to the short ones (this keeps the skew:
  a sample taken from a large peer most likely carries its dominant label).
- `classes:K`: pathological label skew. Peer i holds the classes perm[(i*K + j) mod C], j < K, for a
  random permutation perm of the C classes present: K distinct classes per peer, and every class is
  held by floor or ceil(n_peers * K / C) peers. Each class's shuffled indices are cut evenly among
  its holders. Needs K <= C and n_peers * K >= C (otherwise some class would be dropped).

`min_size` defaults, for Dirichlet, to min(10, N // (2 n_peers)), at least 1: ten samples where the
data allows, never more than half of an even share. `iid` and `classes:K` cannot move samples, so
their default is 1 (no empty peer) and they raise ConfigError when a peer would fall short. Pure numpy; randomness only from the injected Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pfl.errors import ConfigError

__all__ = ["PARTITIONS", "PartitionSpec", "parse_partition", "partition"]

PARTITIONS = ("iid", "dirichlet:ALPHA", "classes:K")
_ALLOWED = ", ".join(PARTITIONS)
_MAX_TRIES = 100  # Dirichlet redraws before topping up the best one


@dataclass(frozen=True)
class PartitionSpec:
    """A validated partition spec: `kind` is "iid", "dirichlet" (with alpha) or "classes" (with k)."""

    kind: str
    alpha: float | None = None
    k: int | None = None

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "classes":
            return f"classes:{self.k}"
        return self.kind


def _bad(detail: str) -> ConfigError:
    return ConfigError(f"partition: {detail}; allowed: {_ALLOWED}")


def parse_partition(spec: str) -> PartitionSpec:
    """Validate a partition spec string alone (K <= number of classes is checked by `partition`)."""
    if not isinstance(spec, str):
        raise _bad(f"expected a string, got {type(spec).__name__}")
    name, sep, arg = spec.strip().partition(":")
    if name == "iid" and not sep:
        return PartitionSpec("iid")
    if name == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if not 0.0 < alpha < float("inf"):  # also rejects nan
            raise _bad(f"'{spec}' needs a finite ALPHA > 0 (e.g. dirichlet:0.5)")
        return PartitionSpec("dirichlet", alpha=alpha)
    if name == "classes" and sep:
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k < 1:
            raise _bad(f"'{spec}' needs an integer K >= 1 classes per peer (e.g. classes:2)")
        return PartitionSpec("classes", k=k)
    raise _bad(f"unknown value '{spec}'")


def partition(
    labels: np.ndarray,
    n_peers: int,
    spec: str,
    rng: np.random.Generator,
    *,
    min_size: int | None = None,
) -> list[np.ndarray]:
    """One sorted int64 index array per peer into `labels`; see the module docstring."""
    ps = parse_partition(spec)
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"partition: labels must be a non-empty 1-D integer array, got dtype={y.dtype} shape={y.shape}"
        )
    if isinstance(n_peers, bool) or not isinstance(n_peers, (int, np.integer)) or n_peers < 1:
        raise ConfigError(f"partition: n_peers must be an integer >= 1, got {n_peers!r}")
    n, total = int(n_peers), y.size
    if min_size is None:
        # Dirichlet can rebalance towards ten samples a peer; iid and classes:K cannot, so they
        # only refuse an empty peer unless the caller asks for more
        min_size = max(1, min(10, total // (2 * n))) if ps.kind == "dirichlet" else 1
    if min_size < 1 or n * min_size > total:
        raise ConfigError(
            f"partition: {n} peers x min_size={min_size} needs {n * min_size} samples, "
            f"the dataset has {total}; use fewer peers or a smaller min_size (>= 1)"
        )
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]  # indices of each class, ascending
    if ps.kind == "iid":
        parts = np.array_split(rng.permutation(total), n)
    elif ps.kind == "dirichlet":
        assert ps.alpha is not None
        parts = _dirichlet(by_class, n, ps.alpha, min_size, rng)
    else:
        assert ps.k is not None
        parts = _classes(by_class, n, ps.k, rng)
    parts = [np.sort(p).astype(np.int64) for p in parts]
    short = [i for i, p in enumerate(parts) if p.size < min_size]
    if short:
        raise ConfigError(
            f"partition: '{spec}' leaves peer {short[0]} with {parts[short[0]].size} samples "
            f"(< min_size={min_size}) on {total} samples and {n} peers; use fewer peers or a larger K"
        )
    return parts


def _dirichlet(
    by_class: list[np.ndarray], n: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    best: list[np.ndarray] | None = None
    for _ in range(_MAX_TRIES):
        parts = _dirichlet_draw(by_class, n, alpha, rng)
        if best is None or min(p.size for p in parts) > min(p.size for p in best):
            best = parts
        if min(p.size for p in best) >= min_size:
            return best
    assert best is not None
    return _top_up(best, min_size, rng)


def _dirichlet_draw(
    by_class: list[np.ndarray], n: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    total = sum(idx.size for idx in by_class)
    cap = total / n  # a peer at its even share takes no more (NIID-Bench balancing)
    pieces: list[list[np.ndarray]] = [[] for _ in range(n)]
    sizes = np.zeros(n, dtype=np.int64)
    for c in rng.permutation(len(by_class)):
        idx = rng.permutation(by_class[c])
        open_ = sizes < cap  # never all False: the samples handed out so far are < total
        p = np.where(open_, rng.dirichlet(np.full(n, alpha)), 0.0)  # (n,)
        if not np.isfinite(p).all() or p.sum() <= 0.0:  # tiny alpha: the mass fell on full peers
            p = np.zeros(n)
            p[rng.choice(np.flatnonzero(open_))] = 1.0
        cuts = (np.cumsum(p / p.sum()) * idx.size).astype(np.int64)[:-1]
        for j, piece in enumerate(np.split(idx, cuts)):
            pieces[j].append(piece)
            sizes[j] += piece.size
    return [np.concatenate(ps) for ps in pieces]


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest peer to the smallest until all have min_size."""
    held = [rng.permutation(p).tolist() for p in parts]
    while True:
        sizes = [len(h) for h in held]
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        if sizes[small] >= min_size:
            return [np.asarray(h, dtype=np.int64) for h in held]
        held[small].append(held[large].pop())  # held[large] is shuffled: a random sample


def _classes(by_class: list[np.ndarray], n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    n_classes = len(by_class)
    if k > n_classes:
        raise _bad(f"'classes:{k}' needs K <= {n_classes}, the number of classes in the labels")
    if n * k < n_classes:
        raise _bad(
            f"'classes:{k}' with {n} peers holds only {n * k} of the {n_classes} classes; "
            f"needs n_peers * K >= {n_classes}"
        )
    perm = rng.permutation(n_classes)
    holders: list[list[int]] = [[] for _ in range(n_classes)]
    for i in range(n):
        for j in range(k):
            holders[perm[(i * k + j) % n_classes]].append(i)
    pieces: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c, idx in enumerate(by_class):
        owners = rng.permutation(holders[c])  # who gets the larger cuts is random too
        for owner, piece in zip(owners, np.array_split(rng.permutation(idx), owners.size)):
            pieces[owner].append(piece)
    return [np.concatenate(ps) for ps in pieces]
