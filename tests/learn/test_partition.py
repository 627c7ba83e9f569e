"""Data partitioning among simulated peers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError
from p2pfl.learn.partition import PartitionSpec, parse_partition, partition

ALLOWED = "allowed: iid, dirichlet:ALPHA, classes:K"


def _labels(n: int = 2000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _check_cover(parts: list[np.ndarray], n_samples: int, min_size: int = 1) -> None:
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    assert all(p.size >= min_size for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n_samples))


def _mean_tv(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> float:
    """Mean total-variation distance between each peer's label distribution and the global one."""
    glob = np.bincount(labels, minlength=n_classes) / labels.size
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=n_classes) / p.size - glob).sum() for p in parts]
    return float(np.mean(tv))


@settings(max_examples=80, deadline=None)
@given(
    spec=st.sampled_from(["iid", "dirichlet:0.1", "dirichlet:0.5", "dirichlet:100", "classes:1",
                          "classes:2", "classes:3"]),
    n_peers=st.integers(1, 40),
    n_samples=st.integers(200, 1500),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_sample_assigned_once(spec: str, n_peers: int, n_samples: int, seed: int) -> None:
    labels = _labels(n_samples, 10, seed % 1000)
    if spec.startswith("classes:") and n_peers * int(spec[-1]) < 10:
        with pytest.raises(ConfigError, match="n_peers \\* K >= 10"):
            partition(labels, n_peers, spec, np.random.default_rng(seed))
        return
    parts = partition(labels, n_peers, spec, np.random.default_rng(seed))
    assert len(parts) == n_peers
    dirichlet_floor = max(1, min(10, n_samples // (2 * n_peers)))
    _check_cover(parts, n_samples, min_size=dirichlet_floor if spec.startswith("dirichlet") else 1)
    if spec.startswith("classes:"):
        assert max(np.unique(labels[p]).size for p in parts) <= int(spec[-1])


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "classes:2"])
def test_same_seed_same_partition(spec: str) -> None:
    labels = _labels()
    a = partition(labels, 12, spec, np.random.default_rng(7))
    b = partition(labels, 12, spec, np.random.default_rng(7))
    c = partition(labels, 12, spec, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_even_and_labels_balanced() -> None:
    labels = _labels(2003)
    parts = partition(labels, 10, "iid", np.random.default_rng(0))
    assert {p.size for p in parts} == {200, 201}
    assert _mean_tv(labels, parts, 10) < 0.12


def test_dirichlet_skew() -> None:
    labels = _labels(5000)
    skewed = [_mean_tv(labels, partition(labels, 20, "dirichlet:0.1", np.random.default_rng(s)), 10)
              for s in range(3)]
    near_iid = [_mean_tv(labels, partition(labels, 20, "dirichlet:100", np.random.default_rng(s)), 10)
                for s in range(3)]
    # alpha=0.1: a peer's labels are dominated by one or two classes (TV to uniform ~ 0.6-0.8);
    # alpha=100: within sampling noise of the global distribution.
    assert min(skewed) > 0.5
    assert max(near_iid) < 0.12


def test_dirichlet_top_up_keeps_min_size_and_skew() -> None:
    # 100 peers on 1000 samples with alpha=0.05: no draw gives everyone 5 samples, so the best
    # draw is topped up; the result still covers every sample once and stays skewed.
    labels = _labels(1000)
    parts = partition(labels, 100, "dirichlet:0.05", np.random.default_rng(0))
    _check_cover(parts, 1000, min_size=5)
    assert _mean_tv(labels, parts, 10) > 0.5


def test_explicit_min_size() -> None:
    labels = _labels(1000)
    parts = partition(labels, 10, "dirichlet:0.1", np.random.default_rng(0), min_size=50)
    _check_cover(parts, 1000, min_size=50)
    with pytest.raises(ConfigError, match="min_size=101"):
        partition(labels, 10, "iid", np.random.default_rng(0), min_size=101)
    with pytest.raises(ConfigError, match="min_size"):
        partition(labels, 10, "iid", np.random.default_rng(0), min_size=0)


def test_classes_assignment() -> None:
    labels = _labels(3000)
    parts = partition(labels, 15, "classes:2", np.random.default_rng(0))
    _check_cover(parts, 3000)
    held = [set(np.unique(labels[p]).tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    # 15 peers x 2 classes = 30 slots over 10 classes: each class held by exactly 3 peers.
    counts = np.bincount([c for h in held for c in h], minlength=10)
    assert counts.tolist() == [3] * 10


def test_classes_with_non_contiguous_labels() -> None:
    labels = np.repeat(np.array([3, 7, 42], dtype=np.int32), 50)
    parts = partition(labels, 3, "classes:1", np.random.default_rng(0))
    _check_cover(parts, 150)
    assert sorted(int(np.unique(labels[p])[0]) for p in parts) == [3, 7, 42]


def test_classes_errors() -> None:
    labels = _labels(1000)
    with pytest.raises(ConfigError, match="K <= 10") as e:
        partition(labels, 20, "classes:11", np.random.default_rng(0))
    assert ALLOWED in str(e.value)
    with pytest.raises(ConfigError, match="n_peers \\* K >= 10"):
        partition(labels, 4, "classes:2", np.random.default_rng(0))
    tiny = np.array([0] * 100 + [1] * 3)  # class 1 has 3 samples but 4 holders
    with pytest.raises(ConfigError, match="min_size"):
        partition(tiny, 8, "classes:1", np.random.default_rng(0))


def test_single_peer_gets_everything() -> None:
    labels = _labels(100)
    for spec in ("iid", "dirichlet:0.1", "classes:10"):
        (only,) = partition(labels, 1, spec, np.random.default_rng(0))
        np.testing.assert_array_equal(only, np.arange(100))


@pytest.mark.parametrize(
    ("labels", "n_peers", "needle"),
    [
        (np.zeros((4, 2), dtype=np.int64), 2, "1-D integer"),
        (np.zeros(10, dtype=np.float32), 2, "1-D integer"),
        (np.zeros(0, dtype=np.int64), 2, "1-D integer"),
        (np.zeros(10, dtype=np.int64), 0, "n_peers"),
        (np.zeros(10, dtype=np.int64), 11, "the dataset has 10"),
    ],
)
def test_bad_inputs(labels: np.ndarray, n_peers: int, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        partition(labels, n_peers, "iid", np.random.default_rng(0))


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("iid", PartitionSpec("iid")),
        ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5)),
        (" dirichlet:100 ", PartitionSpec("dirichlet", alpha=100.0)),
        ("classes:2", PartitionSpec("classes", k=2)),
    ],
)
def test_parse(spec: str, parsed: PartitionSpec) -> None:
    assert parse_partition(spec) == parsed
    assert parse_partition(str(parsed)) == parsed


@pytest.mark.parametrize(
    "spec",
    ["foo", "", "iid:2", "dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:nan", "dirichlet:inf",
     "dirichlet:x", "classes", "classes:0", "classes:1.5", "classes:two", "IID"],
)
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_partition(spec)
    assert str(e.value).startswith("partition: ")
    assert ALLOWED in str(e.value)


def test_unknown_message_exact() -> None:
    with pytest.raises(ConfigError) as e:
        parse_partition("foo")
    assert str(e.value) == f"partition: unknown value 'foo'; {ALLOWED}"
