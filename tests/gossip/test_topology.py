"""Topologies and Metropolis-Hastings mixing matrices."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError
from p2pfl.gossip.topology import (
    TopologySpec,
    build_topology,
    is_connected,
    metropolis_hastings,
    neighbors,
    parse_topology,
    spectral_gap,
    torus_shape,
)

ALLOWED = "allowed: ring, torus, regular:K, erdos:P, exponential, full"
SPECS = ["ring", "torus", "regular:3", "regular:4", "erdos:0.3", "exponential", "full"]


def _valid_for(spec: str, n: int) -> bool:
    if spec.startswith("regular:"):
        k = int(spec.split(":")[1])
        return k < n and n * k % 2 == 0
    return True


def _expected_degree(spec: str, n: int) -> int | None:
    if spec == "ring":
        return min(2, n - 1)
    if spec == "torus":
        rows, cols = torus_shape(n)
        return 4 if rows >= 3 and cols >= 3 else None
    if spec.startswith("regular:"):
        return int(spec.split(":")[1])
    if spec == "full":
        return n - 1
    return None


def _check_graph(adj: np.ndarray, n: int) -> None:
    assert adj.shape == (n, n) and adj.dtype == np.bool_
    assert np.array_equal(adj, adj.T)
    assert not adj.diagonal().any()
    assert is_connected(adj)


def _check_mixing(adj: np.ndarray) -> np.ndarray:
    w = metropolis_hastings(adj)
    n = adj.shape[0]
    assert w.dtype == np.float64 and w.shape == (n, n)
    np.testing.assert_allclose(w, w.T, atol=0)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    # Nonzero exactly on the diagonal and the edges: W has the graph's sparsity.
    assert np.array_equal(w > 0, adj | np.eye(n, dtype=bool))
    return w


@pytest.mark.parametrize(
    ("spec", "n"),
    [(s, n) for s in SPECS for n in (4, 5, 8, 9, 12, 16, 25, 32, 64) if _valid_for(s, n)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_graph_and_mixing_invariants(spec: str, n: int, seed: int) -> None:
    adj = build_topology(spec, n, np.random.default_rng(seed))
    _check_graph(adj, n)
    deg = _expected_degree(spec, n)
    if deg is not None:
        assert (adj.sum(axis=1) == deg).all()
    w = _check_mixing(adj)
    gap = spectral_gap(w)
    assert 0.0 < gap <= 1.0 + 1e-12


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(SPECS + ["regular:2", "regular:5", "erdos:0.6"]),
    n=st.integers(1, 48),
    seed=st.integers(0, 2**32 - 1),
)
def test_invariants_hypothesis(spec: str, n: int, seed: int) -> None:
    k = int(spec.split(":")[1]) if spec.startswith("regular:") else None
    if k is not None and (k >= n or n * k % 2):
        with pytest.raises(ConfigError, match="regular"):
            build_topology(spec, n, np.random.default_rng(seed))
        return
    adj = build_topology(spec, n, np.random.default_rng(seed))
    _check_graph(adj, n)
    if k is not None:
        assert (adj.sum(axis=1) == k).all()
    gap = spectral_gap(_check_mixing(adj))
    assert 0.0 < gap <= 1.0 + 1e-12


def test_degrees_of_deterministic_graphs() -> None:
    rng = np.random.default_rng(0)
    assert (build_topology("ring", 3, rng).sum(axis=1) == 2).all()
    assert build_topology("ring", 2, rng).tolist() == [[False, True], [True, False]]
    assert build_topology("ring", 1, rng).tolist() == [[False]]
    # exponential on a power of two: offsets 1, 2, 4, 8 and their negatives, 16 == -16.
    assert (build_topology("exponential", 32, rng).sum(axis=1) == 9).all()
    assert neighbors(build_topology("exponential", 8, rng))[0] == [1, 2, 4, 6, 7]
    assert neighbors(build_topology("ring", 5, rng)) == [[1, 4], [0, 2], [1, 3], [2, 4], [0, 3]]


@pytest.mark.parametrize(
    ("n", "shape", "degree"),
    [(16, (4, 4), 4), (12, (3, 4), 4), (36, (6, 6), 4), (8, (2, 4), 3), (4, (2, 2), 2), (13, (1, 13), 2)],
)
def test_torus_shape_and_degree(n: int, shape: tuple[int, int], degree: int) -> None:
    assert torus_shape(n) == shape
    adj = build_topology("torus", n, np.random.default_rng(0))
    assert (adj.sum(axis=1) == degree).all()


def test_prime_torus_is_the_ring() -> None:
    rng = np.random.default_rng(0)
    assert np.array_equal(build_topology("torus", 31, rng), build_topology("ring", 31, rng))


def test_torus_grid_neighbours() -> None:
    # 3 x 4 grid, peer id = row * 4 + col; peer 0 = (0, 0).
    nb = neighbors(build_topology("torus", 12, np.random.default_rng(0)))
    assert nb[0] == [1, 3, 4, 8]
    assert nb[5] == [1, 4, 6, 9]


@pytest.mark.parametrize("spec", ["regular:4", "regular:2", "regular:7", "erdos:0.2"])
def test_same_seed_same_graph(spec: str) -> None:
    a = build_topology(spec, 24, np.random.default_rng(123))
    b = build_topology(spec, 24, np.random.default_rng(123))
    c = build_topology(spec, 24, np.random.default_rng(124))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dense_regular_uses_complement() -> None:
    for n, k in [(10, 7), (12, 9), (9, 6), (6, 4)]:
        adj = build_topology(f"regular:{k}", n, np.random.default_rng(0))
        _check_graph(adj, n)
        assert (adj.sum(axis=1) == k).all()


def test_spectral_gap_ordering(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    for n in (16, 32):
        gaps = {}
        for spec in SPECS:
            adj = build_topology(spec, n, np.random.default_rng(0))
            gaps[spec] = spectral_gap(metropolis_hastings(adj))
        logging.getLogger(__name__).info("n=%d spectral gaps: %s", n, gaps)
        assert gaps["ring"] < gaps["torus"] < gaps["exponential"] < gaps["full"]
        assert gaps["full"] == pytest.approx(1.0)
    # Random regular graphs vary with the seed (n=16 regular:3 ranges 0.03..0.17): compare means.
    mean = {
        spec: np.mean([spectral_gap(metropolis_hastings(build_topology(spec, 32, np.random.default_rng(s))))
                       for s in range(5)])
        for spec in ("ring", "regular:3", "regular:4", "regular:8")
    }
    assert mean["ring"] < mean["regular:3"] < mean["regular:4"] < mean["regular:8"] < 1.0
    # Ring with MH weights: W = (I + A) / 3, lambda_2 = (1 + 2 cos(2 pi / n)) / 3.
    ring = spectral_gap(metropolis_hastings(build_topology("ring", 32, np.random.default_rng(0))))
    assert ring == pytest.approx(1 - (1 + 2 * np.cos(2 * np.pi / 32)) / 3)


def test_mixing_reaches_consensus() -> None:
    adj = build_topology("exponential", 16, np.random.default_rng(0))
    w = metropolis_hastings(adj)
    x = np.random.default_rng(1).normal(size=(16, 3))
    y = np.linalg.matrix_power(w, 60) @ x
    np.testing.assert_allclose(y, np.broadcast_to(x.mean(axis=0), y.shape), atol=1e-9)


def test_is_connected() -> None:
    adj = np.zeros((4, 4), dtype=bool)
    adj[0, 1] = adj[1, 0] = adj[2, 3] = adj[3, 2] = True
    assert not is_connected(adj)
    adj[1, 2] = adj[2, 1] = True
    assert is_connected(adj)
    assert is_connected(np.zeros((1, 1), dtype=bool))


def test_single_peer() -> None:
    adj = build_topology("full", 1, np.random.default_rng(0))
    w = metropolis_hastings(adj)
    assert w.tolist() == [[1.0]]
    assert spectral_gap(w) == 1.0


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("ring", TopologySpec("ring")),
        (" torus ", TopologySpec("torus")),
        ("regular:4", TopologySpec("regular", k=4)),
        ("erdos:0.25", TopologySpec("erdos", p=0.25)),
        ("erdos:1", TopologySpec("erdos", p=1.0)),
        ("exponential", TopologySpec("exponential")),
        ("full", TopologySpec("full")),
    ],
)
def test_parse(spec: str, parsed: TopologySpec) -> None:
    assert parse_topology(spec) == parsed
    assert parse_topology(str(parsed)) == parsed


@pytest.mark.parametrize(
    "spec",
    ["foo", "", "ring:3", "regular", "regular:", "regular:x", "regular:0", "regular:2.5", "erdos",
     "erdos:0", "erdos:1.5", "erdos:-0.1", "erdos:nan", "erdos:abc", "Full"],
)
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_topology(spec)
    assert ALLOWED in str(e.value)
    assert "topology" in str(e.value)


def test_unknown_message_exact() -> None:
    with pytest.raises(ConfigError) as e:
        parse_topology("foo")
    assert str(e.value) == f"topology: unknown value 'foo'; {ALLOWED}"


@pytest.mark.parametrize(
    ("spec", "n", "needle"),
    [
        ("regular:4", 4, "K < n"),
        ("regular:3", 5, "n\\*K even"),
        ("regular:1", 6, "perfect matching"),
        ("erdos:0.01", 40, "ln\\(n\\)/n"),
        ("ring", 0, "n \\(number of peers\\)"),
    ],
)
def test_build_rejects(spec: str, n: int, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_topology(spec, n, np.random.default_rng(0))


def test_bad_adjacency_rejected() -> None:
    bad = np.ones((3, 3), dtype=bool)  # self loops
    with pytest.raises(ConfigError, match="adjacency"):
        metropolis_hastings(bad)
    asym = np.zeros((3, 3), dtype=bool)
    asym[0, 1] = True
    with pytest.raises(ConfigError, match="adjacency"):
        neighbors(asym)
