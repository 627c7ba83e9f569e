"""Hypothesis properties of the rules: permutation invariance, hulls, outlier resistance, fixed points."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.robust import RULES, aggregate

DETERMINISTIC = sorted(RULES)  # bucketing is the only random stage, and it is not a rule


def params_for(name: str, n: int, perm: list[int] | None = None) -> dict[str, Any]:
    if name == "mixing":
        w = torch.arange(1, n + 1, dtype=torch.float64)
        w = w / w.sum()
        return {"weights": w if perm is None else torch.cat([w[:1], w[1:][perm]])}
    if name == "self_centered_clip":
        return {"tau": "adaptive"}
    if name == "centered_clip":
        return {"tau": 0.8, "iterations": 3}
    return {}


@st.composite
def gaussian_inputs(draw: st.DrawFn, min_n: int = 1) -> tuple[torch.Tensor, int]:
    """Continuous inputs (no ties, no equal Krum scores) from a seed, with f at the rules' limit."""
    n = draw(st.integers(max(min_n, 1), 14))
    d = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return x.float(), n


def largest_f(name: str, n: int) -> int:
    a, b = {"krum": (2, 3), "multi_krum": (2, 3), "bulyan": (4, 3)}.get(name, (2, 1))
    return max((n - b) // a, 0)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(DETERMINISTIC), data=gaussian_inputs(min_n=3), perm_seed=st.integers(0, 1000))
def test_permuting_received_changes_nothing(name: str, data: tuple[torch.Tensor, int], perm_seed: int) -> None:
    x, n = data
    f = largest_f(name, n)
    perm = torch.randperm(n - 1, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    a = aggregate(name, x[0], x[1:], f=f, **params_for(name, n))
    b = aggregate(name, x[0], x[1:][perm], f=f, **params_for(name, n, perm))
    tol = 1e-5 * float(x.abs().max()) + 1e-6
    assert torch.allclose(a.vector, b.vector, atol=tol, rtol=1e-5), name
    assert torch.allclose(a.weights[0], b.weights[0], atol=1e-5)
    assert torch.allclose(a.weights[1:][perm], b.weights[1:], atol=1e-5), name


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@st.composite
def tied_inputs(draw: st.DrawFn) -> torch.Tensor:
    """Arbitrary float32 inputs, drawn from a small pool so that ties are common."""
    n, d = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    pool = draw(st.lists(finite, min_size=1, max_size=4))
    return torch.tensor([[draw(st.sampled_from(pool)) for _ in range(d)] for _ in range(n)], dtype=torch.float32)


@settings(max_examples=60, deadline=None)
@given(x=tied_inputs(), name=st.sampled_from(["median", "trimmed_mean"]), data=st.data())
def test_coordinatewise_output_is_inside_the_hull(x: torch.Tensor, name: str, data: st.DataObject) -> None:
    n = x.shape[0]
    f = data.draw(st.integers(0, (n - 1) // 2))
    agg = aggregate(name, x[0], x[1:], f=f)
    lo, hi = x.min(0).values, x.max(0).values
    slack = 1e-6 * torch.maximum(lo.abs(), hi.abs())
    assert bool((agg.vector >= lo - slack).all()) and bool((agg.vector <= hi + slack).all())
    # tie-shared weights: a probability vector, equal for inputs that are equal rows
    assert abs(float(agg.weights.sum()) - 1.0) < 1e-5 and bool((agg.weights >= 0).all())
    for i in range(n):
        for j in range(i + 1, n):
            if torch.equal(x[i], x[j]):
                assert abs(float(agg.weights[i] - agg.weights[j])) < 1e-6


@settings(max_examples=40, deadline=None)
@given(x=tied_inputs(), data=st.data())
def test_coordinatewise_weights_permute_with_received(x: torch.Tensor, data: st.DataObject) -> None:
    n = x.shape[0]
    f = data.draw(st.integers(0, (n - 1) // 2))
    perm = data.draw(st.permutations(list(range(n - 1))))
    for name in ("median", "trimmed_mean"):
        a = aggregate(name, x[0], x[1:], f=f)
        b = aggregate(name, x[0], x[1:][perm], f=f)
        tol = 1e-6 * n * float(x.abs().max()) + 1e-6  # the kept values may be summed in another order
        assert torch.allclose(a.vector, b.vector, rtol=0, atol=tol)
        assert torch.allclose(a.weights[1:][perm], b.weights[1:], atol=1e-6)


@st.composite
def with_outliers(draw: st.DrawFn) -> tuple[torch.Tensor, int, list[int]]:
    """n honest-or-Byzantine rows: own (row 0) is honest; f identical far-away rows at random positions."""
    f = draw(st.integers(0, 3))
    n = draw(st.integers(2 * f + 3, 2 * f + 9))
    d = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    bad = draw(st.lists(st.integers(1, n - 1), min_size=f, max_size=f, unique=True))
    far = torch.randn(d, generator=gen) * 1e4 + draw(st.sampled_from([-1e5, 1e5]))
    x[bad] = far
    return x, f, bad


@settings(max_examples=50, deadline=None)
@given(data=with_outliers())
def test_krum_family_ignores_identical_far_outliers(data: tuple[torch.Tensor, int, list[int]]) -> None:
    x, f, bad = data
    n = x.shape[0]
    honest = x[[i for i in range(n) if i not in bad]]
    out = aggregate("krum", x[0], x[1:], f=f).vector
    assert sum(bool(torch.equal(out, row)) for row in honest) >= 1
    assert not any(torch.equal(out, x[i]) for i in bad)
    lo, hi = honest.min(0).values - 1e-5, honest.max(0).values + 1e-5
    mk = aggregate("multi_krum", x[0], x[1:], f=f)
    assert bool(((mk.vector >= lo) & (mk.vector <= hi)).all())
    assert float(mk.weights[bad].sum()) == 0.0
    if n >= 4 * f + 3:
        bu = aggregate("bulyan", x[0], x[1:], f=f)
        assert bool(((bu.vector >= lo) & (bu.vector <= hi)).all())
        assert float(bu.weights[bad].sum()) == 0.0


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(DETERMINISTIC), n=st.integers(1, 12), d=st.integers(1, 9),
       value=st.floats(-1e4, 1e4, allow_nan=False, width=32))
def test_equal_inputs_are_a_fixed_point(name: str, n: int, d: int, value: float) -> None:
    common = torch.linspace(-1, 1, d) * value + value
    x = common.expand(n, d).clone()
    f = largest_f(name, n)
    if n < {"krum": 3, "multi_krum": 3, "bulyan": 3}.get(name, 1):
        return
    agg = aggregate(name, x[0], x[1:], f=f, **params_for(name, n))
    assert torch.allclose(agg.vector, common, rtol=1e-5, atol=1e-5), name
    assert abs(float(agg.weights.sum()) - 1.0) < 1e-5
