"""The chunked building blocks: comparator networks, Gram matrices, tie-shared kept weights, chunk edges."""

from __future__ import annotations

import itertools

import pytest
import torch

from p2pfl.robust import kernels


def _apply(net: kernels.Network, values: list[int]) -> list[int]:
    out = list(values)
    for i, j in net:
        if out[i] > out[j]:
            out[i], out[j] = out[j], out[i]
    return out


@pytest.mark.parametrize("n", range(1, 11))
def test_batcher_sorts_every_zero_one_input(n: int) -> None:
    # 0-1 principle: a comparator network that sorts every 0-1 input sorts every input.
    net = kernels.batcher(n)
    for bits in itertools.product((0, 1), repeat=n):
        assert _apply(net, list(bits)) == sorted(bits)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 31, 32, 33, 64, 65])
def test_selection_places_order_statistics(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    cuts = {(lo, n - 1 - lo) for lo in range((n + 1) // 2)} | {((n - 1) // 2, n // 2), (0, 0), (n - 1, n - 1)}
    for (lo, hi), exact in itertools.product(sorted(cuts), (False, True)):
        net = kernels.selection(n, lo, hi, exact)
        for _ in range(5):
            values = torch.randint(0, 4, (n,), generator=gen).tolist()  # many ties
            out, ref = _apply(net, values), sorted(values)
            assert sorted(out[lo : hi + 1]) == ref[lo : hi + 1]
            if exact:
                assert out[lo] == ref[lo] and out[hi] == ref[hi]


def test_selection_prefers_the_shorter_network() -> None:
    assert len(kernels.selection(64, 1, 62, False)) < len(kernels.batcher(64)) // 3  # bubble for small f
    assert len(kernels.selection(64, 31, 32, False)) < len(kernels.batcher(64))  # pruned Batcher for the median


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force many chunks with a ragged last one."""
    monkeypatch.setattr(kernels, "_MIN_COLS", 1)
    monkeypatch.setattr(kernels, "_GRAM_CHUNK", {"cpu": 8 * 3})
    monkeypatch.setattr(kernels, "_SORT_COLS", {"cpu": 4})


@pytest.mark.parametrize("chunked", [False, True])
def test_gram_is_centered_on_the_anchor(chunked: bool, request: pytest.FixtureRequest) -> None:
    if chunked:
        request.getfixturevalue("tiny_chunks")
    x = torch.randn(6, 29, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    own, received, anchor = x[0], x[1:], torch.linspace(-1, 1, 29, dtype=torch.float64)
    centered = x - own
    assert torch.allclose(kernels.gram(own, received), centered @ centered.T)
    assert torch.allclose(kernels.gram(own, received, anchor), (x - anchor) @ (x - anchor).T)
    assert torch.allclose(kernels.sq_norms(own, received, anchor), ((x - anchor) ** 2).sum(1))
    d2 = kernels.sq_distances(kernels.gram(own, received))
    assert torch.allclose(d2, torch.cdist(x, x) ** 2)


def test_centered_gram_keeps_float32_precision_far_from_the_origin() -> None:
    # Models late in training: a large common offset, a tiny spread. The raw Gram cancels to noise.
    gen = torch.Generator().manual_seed(1)
    spread = torch.randn(5, 10_000, generator=gen, dtype=torch.float64) * 1e-3
    x = (100.0 + spread).float()
    exact = torch.cdist(x.double(), x.double()) ** 2
    ours = kernels.sq_distances(kernels.gram(x[0], x[1:]))
    assert torch.allclose(ours, exact, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("chunked", [False, True])
def test_trimmed_sum_and_tie_shared_counts(chunked: bool, request: pytest.FixtureRequest) -> None:
    if chunked:
        request.getfixturevalue("tiny_chunks")
    gen = torch.Generator().manual_seed(2)
    for n in (1, 2, 5, 7, 10):
        x = torch.randint(-2, 3, (n, 37), generator=gen).float()  # heavy ties
        for lo in range((n + 1) // 2):
            hi = n - 1 - lo
            total, counts = kernels.trimmed_sum(x[0], x[1:], lo, hi, True)
            assert torch.equal(total, torch.sort(x, 0).values[lo : hi + 1].sum(0))
            assert counts is not None
            assert counts.sum().item() == pytest.approx((hi - lo + 1) * 37)
            # inputs holding equal values in a column get equal shares of it: compare with a brute force
            expected = torch.zeros(n, dtype=torch.float64)
            for col in x.T.tolist():
                ranked = sorted(col)
                for i, v in enumerate(col):
                    slots = sum(1 for p in range(lo, hi + 1) if ranked[p] == v)
                    expected[i] += slots / col.count(v)
            assert torch.allclose(counts, expected)


def test_closest_to_median_sum_matches_the_definition(tiny_chunks: None) -> None:
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 23, generator=gen)
    rows[2, :5] = rows[4, :5]  # some ties
    for beta in (1, 3, 5, 7):
        total, counts = kernels.closest_to_median_sum(rows[0], rows[1:], list(range(7)), beta, True)
        srt = torch.sort(rows, 0).values
        med = srt[3]
        nearest = torch.sort((rows - med).abs(), dim=0, stable=True).indices[:beta]  # [beta, d]
        expected = rows.gather(0, nearest).sum(0)
        assert torch.allclose(total, expected, atol=1e-6)
        assert counts is not None and counts.sum().item() == pytest.approx(beta * 23)
