"""Small cases computed by hand from each rule's textbook definition, and the shared `aggregate` weights."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from p2pfl.errors import ConfigError, LocalProtocolError
from p2pfl.robust import (
    RULES,
    Aggregation,
    aggregate,
    bulyan,
    centered_clip,
    clip,
    geometric_median,
    krum,
    mean,
    median,
    mixing,
    multi_krum,
    self_centered_clip,
    trimmed_mean,
)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(a: torch.Tensor, b: list[float] | torch.Tensor, tol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=tol)


# own (0,0) and four received rows; (10,10) is the outlier. f = 1, n = 5 = 2f + 3.
KRUM_X = t([[0, 0], [2, 0], [0, 1], [1, 1], [10, 10]])


def krum_scores_by_hand(x: torch.Tensor, f: int) -> list[float]:
    n = x.shape[0]
    scores = []
    for i in range(n):
        d2 = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d2[: n - f - 2]))
    return scores


def test_krum_5x2_by_hand() -> None:
    # squared distances: (0,0): 4,1,2,200 -> 1+2 = 3; (2,0): 4,5,2,164 -> 6; (0,1): 1,5,1,181 -> 2;
    # (1,1): 2,2,1,162 -> 3; (10,10): huge. The winner is (0,1), input 2.
    assert krum_scores_by_hand(KRUM_X, 1)[:4] == [3, 6, 2, 3]
    assert torch.equal(krum(KRUM_X[0], KRUM_X[1:], f=1), KRUM_X[2])
    agg = aggregate("krum", KRUM_X[0], KRUM_X[1:], f=1)
    assert agg.weights.tolist() == [0, 0, 1, 0, 0]


def test_multi_krum_by_hand() -> None:
    # default m = n - f = 4: scores 2, 3, 3, 6 -> inputs 2, 0, 3, 1 -> mean of (0,1),(0,0),(1,1),(2,0)
    assert close(multi_krum(KRUM_X[0], KRUM_X[1:], f=1), [0.75, 0.5])
    # m = 2: input 2 (score 2), then the tie at 3 between inputs 0 and 3 goes to the lower sum of squared
    # distances to all others: 4+1+2+200 = 207 for (0,0), 2+2+1+162 = 167 for (1,1) -> input 3
    assert close(multi_krum(KRUM_X[0], KRUM_X[1:], f=1, m=2), [0.5, 1.0])
    agg = aggregate("multi_krum", KRUM_X[0], KRUM_X[1:], f=1)
    assert close(agg.weights, [0.25, 0.25, 0.25, 0.25, 0.0])


def test_median_even_n_is_the_mean_of_the_two_middle_values() -> None:
    own, received = t([[1, 10]])[0], t([[4, 0], [2, 5], [3, 7]])
    # column 0: 1 2 3 4 -> 2.5 (torch.median would say 2); column 1: 0 5 7 10 -> 6 (torch.median: 5)
    assert close(median(own, received, f=1), [2.5, 6.0])
    # inputs 2 and 3 hold both middle values in both columns
    assert close(aggregate("median", own, received, f=1).weights, [0, 0, 0.5, 0.5])


def test_median_odd_n() -> None:
    x = t([[5, -1], [1, 0], [3, 9]])
    assert close(median(x[0], x[1:], f=1), [3, 0])
    assert close(aggregate("median", x[0], x[1:], f=1).weights, [0, 0.5, 0.5])


def test_trimmed_mean_f1_by_hand() -> None:
    own, received = t([[1]])[0], t([[100], [2], [3], [-50]])
    # sorted -50 1 2 3 100: drop one on each side, mean(1, 2, 3) = 2
    assert close(trimmed_mean(own, received, f=1), [2.0])
    assert close(aggregate("trimmed_mean", own, received, f=1).weights, [1 / 3, 0, 1 / 3, 1 / 3, 0])


def test_trimmed_mean_ties_share_the_kept_slots() -> None:
    # 1 5 5 5 with f = 1 keeps two of the three 5s: each 5 gets 2/3 of a slot, each slot weighs 1/2
    own, received = t([[5]])[0], t([[5], [1], [5]])
    agg = aggregate("trimmed_mean", own, received, f=1)
    assert close(agg.vector, [5.0])
    assert close(agg.weights, [1 / 3, 1 / 3, 0, 1 / 3])


def test_bulyan_by_hand() -> None:
    # n = 7, f = 1: theta = 5 by repeated Krum, then the beta = 3 values nearest the median.
    own, received = t([[0]])[0], t([[1], [2], [3], [4], [50], [-60]])
    # round 1 (k = 4): scores 30 15 10 15 30 ... -> value 2 (input 2)
    # round 2 (k = 3) on 0 1 3 4 50 -60: 26 14 14 26 -> tie; sums of all squared distances 6136 < 6192:
    #   value 1 (input 1)
    # round 3 (k = 2) on 0 3 4 50 -60: 25 10 17 -> value 3 (input 3)
    # round 4 (k = 1) on 0 4 50 -60: 16 16 -> tie; 6116 < 6228: own (input 0)
    # round 5 (k = 0) on 4 50 -60: all 0 -> the smallest sum of squared distances: value 4 (input 4)
    # S = {2, 1, 3, 0, 4}, median 2, nearest three: 2, 1, 3 -> 2
    agg = aggregate("bulyan", own, received, f=1)
    assert close(agg.vector, [2.0])
    assert close(agg.weights, [0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0])
    assert close(bulyan(own, received, f=1), [2.0])


def test_bulyan_matches_a_naive_implementation_of_the_definition() -> None:
    # Column 1 is lopsided (0 1 10 10.1 10.2 ...): the values nearest the median are not a symmetric trim.
    own = t([[0, 0]])[0]
    received = t([[1, 1], [2, 10], [3, 10.1], [4, 10.2], [5, 10.3], [6, 10.4], [7, -3], [8, 10.5], [9, 9.9],
                  [10, 10.05]])
    x = torch.cat([own[None], received])
    f = 2  # n = 11 = 4f + 3
    selected = x[_bulyan_selection_by_hand(x, f)]  # theta = 7 rows
    expected = []
    for col in selected.T.tolist():
        med = sorted(col)[len(col) // 2]
        expected.append(sum(sorted(col, key=lambda v, m=med: abs(v - m))[: len(col) - 2 * f]) / (len(col) - 2 * f))
    assert close(bulyan(own, received, f=f), expected, 1e-5)


def _bulyan_selection_by_hand(x: torch.Tensor, f: int) -> list[int]:
    remaining, chosen = list(range(x.shape[0])), []
    for _ in range(x.shape[0] - 2 * f):
        r = len(remaining)
        best, best_key = -1, (math.inf, math.inf)
        for i in remaining:  # Krum score, ties to the sum over all remaining, then to the lower index
            d2 = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in remaining if j != i)
            key = (sum(d2[: max(r - f - 2, 0)]), sum(d2))
            if key < best_key:
                best, best_key = i, key
        chosen.append(best)
        remaining.remove(best)
    return chosen


def test_centered_clip_one_iteration_by_hand() -> None:
    own, received = t([[0, 0]])[0], t([[3, 4], [0, 1]])
    # v0 = own; x - v0: (0,0), (3,4) of norm 5 -> clipped to (0.6, 0.8), (0,1) of norm 1 kept (tau = 1)
    # v1 = (0.6 + 0, 0.8 + 1) / 3 = (0.2, 0.6)
    agg = aggregate("centered_clip", own, received, f=0, tau=1.0)
    assert close(agg.vector, [0.2, 0.6])
    # coefficients s_i / n = 1/3, 0.2/3, 1/3 and the center (= own) keeps 1 - 2.2/3
    assert close(agg.weights, [1 / 3 + 0.8 / 3, 0.2 / 3, 1 / 3])
    assert close(centered_clip(own, received, f=0, tau=1.0), [0.2, 0.6])


def test_centered_clip_with_a_center_and_several_iterations() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    center = torch.randn(4, generator=gen, dtype=torch.float64)
    v = center.clone()
    for _ in range(3):
        v = v + sum(clip(xi - v, 0.7) for xi in x) / 6
    out = centered_clip(x[0], x[1:], f=1, tau=0.7, iterations=3, center=center)
    assert close(out, v, 1e-9)
    agg = aggregate("centered_clip", x[0], x[1:], f=1, tau=0.7, iterations=3, center=center)
    rebuilt = agg.weights @ x + (1 - agg.weights.sum()) * center
    assert close(rebuilt, v, 1e-9)


def test_self_centered_clip_by_hand() -> None:
    own, received = t([[0, 0]])[0], t([[3, 4], [0, 2]])
    w = torch.tensor([0.5, 0.25, 0.25])
    # tau = 1: 0.25 * (0.6, 0.8) + 0.25 * (0, 1) = (0.15, 0.45)
    assert close(self_centered_clip(own, received, f=0, tau=1.0, weights=w), [0.15, 0.45])
    # adaptive: distances 5 and 2, tau = the second largest = 2: 0.25 * (1.2, 1.6) + 0.25 * (0, 2)
    agg = aggregate("self_centered_clip", own, received, f=0, tau="adaptive", weights=w)
    assert close(agg.vector, [0.3, 0.9])
    assert close(agg.weights, [1 - 0.25 * 0.4 - 0.25, 0.25 * 0.4, 0.25])


def test_self_centered_clip_defaults_to_uniform_weights_and_one_neighbour() -> None:
    own, received = t([[0.0]])[0], t([[3.0]])
    # one neighbour: adaptive tau is its own distance, so nothing is clipped: the plain mean
    assert close(self_centered_clip(own, received, f=0, tau="adaptive"), [1.5])
    assert close(self_centered_clip(own, received[:0], f=0, tau="adaptive"), [0.0])


def test_geometric_median_one_weiszfeld_step_by_hand() -> None:
    own, received = t([[0]])[0], t([[1], [10]])
    z0 = 11 / 3
    b = [1 / max(abs(z0 - v), 0.1) for v in (0, 1, 10)]
    z1 = (0 * b[0] + 1 * b[1] + 10 * b[2]) / sum(b)
    assert close(geometric_median(own, received, f=1, iterations=1), [z1], 1e-5)
    agg = aggregate("geometric_median", own, received, f=1, iterations=1)
    assert close(agg.weights, [bi / sum(b) for bi in b], 1e-5)


def test_geometric_median_converges_to_the_point_minimizing_the_distance_sum() -> None:
    # square corners plus a far outlier: the geometric median stays near the square's center
    own = t([[0, 0]])[0]
    received = t([[1, 0], [0, 1], [1, 1], [100, 100]])
    out = geometric_median(own, received, f=1, iterations=200, nu=1e-6)
    x = torch.cat([own[None], received])

    def cost(z: torch.Tensor) -> float:
        return float((x - z).norm(dim=1).sum())

    for step in ([1e-3, 0], [-1e-3, 0], [0, 1e-3], [0, -1e-3]):
        assert cost(out) <= cost(out + torch.tensor(step)) + 1e-5
    assert float(out.norm()) < 1.5


def test_mean_and_mixing() -> None:
    x = t([[1, 2], [3, 4], [5, 9]])
    assert close(mean(x[0], x[1:], f=0), [3, 5])
    w = torch.tensor([0.5, 0.25, 0.25])
    assert close(mixing(x[0], x[1:], f=0, weights=w), [2.5, 4.25])
    assert close(mixing(x[0], x[1:], f=0, weights=[0.5, 0.25, 0.25]), [2.5, 4.25])
    assert close(aggregate("mixing", x[0], x[1:], f=0, weights=w).weights, w)
    assert close(aggregate("mean", x[0], x[1:], f=0).weights, [1 / 3] * 3)


def test_mixing_weights_must_match_and_sum_to_one() -> None:
    x = t([[1, 2], [3, 4], [5, 9]])
    with pytest.raises(ConfigError, match="renormalizes"):
        mixing(x[0], x[1:], f=0, weights=torch.tensor([0.5, 0.5]))
    with pytest.raises(ConfigError, match="sum to 1"):
        mixing(x[0], x[1:], f=0, weights=torch.tensor([0.5, 0.25, 0.2]))
    with pytest.raises(ConfigError, match="missing"):
        aggregate("mixing", x[0], x[1:], f=0)


def test_clip() -> None:
    assert close(clip(torch.tensor([3.0, 4.0]), 1.0), [0.6, 0.8])
    assert close(clip(torch.tensor([0.3, 0.4]), 1.0), [0.3, 0.4])
    assert close(clip(torch.zeros(2), 1.0), [0.0, 0.0])


def test_rules_raise_config_error_on_too_few_rows() -> None:
    x = torch.randn(5, 3)
    with pytest.raises(ConfigError, match=r"krum needs n >= 2f \+ 3 inputs: degree 4 \+ self = 5 < 2\*2\+3 = 7"):
        krum(x[0], x[1:], f=2)
    with pytest.raises(ConfigError, match="bulyan needs n >= 4f"):
        aggregate("bulyan", x[0], x[1:], f=1)
    with pytest.raises(ConfigError, match="trimmed_mean needs n >= 2f"):
        trimmed_mean(x[0], x[1:], f=3)


def test_misuse_of_shapes_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        mean(torch.zeros(3), torch.zeros(2, 4), f=0)
    with pytest.raises(LocalProtocolError):
        mean(torch.zeros(3), torch.zeros(2, 3, dtype=torch.float64), f=0)
    with pytest.raises(LocalProtocolError):
        mean(torch.zeros(3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), f=0)


def test_aggregation_is_frozen_and_matches_the_rule_functions() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(11, 17, generator=gen)
    params = {"mixing": {"weights": torch.full((11,), 1 / 11)}, "centered_clip": {"tau": 1.0},
              "self_centered_clip": {"tau": "adaptive"}}
    for name, rule in RULES.items():
        agg = aggregate(name, x[0], x[1:], f=2, **params.get(name, {}))
        assert isinstance(agg, Aggregation)
        assert agg.vector.dtype == agg.weights.dtype == torch.float32
        assert agg.weights.shape == (11,) and bool((agg.weights >= 0).all())
        assert float(agg.weights.sum()) == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(rule(x[0], x[1:], f=2, **params.get(name, {})), agg.vector)
        with pytest.raises(dataclasses.FrozenInstanceError):
            agg.vector = x[0]  # type: ignore[misc]


def test_linear_rules_are_their_weighted_combination() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 13, generator=gen, dtype=torch.float64)
    for name, params in [("mean", {}), ("krum", {}), ("multi_krum", {"m": 4}), ("geometric_median", {}),
                         ("centered_clip", {"tau": 0.5, "iterations": 2}), ("self_centered_clip", {"tau": 1.0})]:
        agg = aggregate(name, x[0], x[1:], f=2, **params)
        assert torch.allclose(agg.weights @ x, agg.vector), name


def test_float64_inputs_stay_float64() -> None:
    x = torch.randn(7, 5, dtype=torch.float64)
    for name in ("median", "krum", "bulyan", "geometric_median"):
        assert aggregate(name, x[0], x[1:], f=1).vector.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = torch.randn(12, 3000, generator=torch.Generator().manual_seed(7))
    params = {"mixing": {"weights": torch.full((12,), 1 / 12)}, "centered_clip": {"tau": 1.0},
              "self_centered_clip": {"tau": "adaptive"}}
    xc = x.cuda()
    for name in RULES:
        cpu = aggregate(name, x[0], x[1:], f=2, **params.get(name, {}))
        gpu = aggregate(name, xc[0], xc[1:], f=2, **params.get(name, {}))
        assert gpu.vector.device.type == "cuda" and gpu.weights.device.type == "cuda"
        assert torch.allclose(gpu.vector.cpu(), cpu.vector, atol=1e-4), name
        assert torch.allclose(gpu.weights.cpu(), cpu.weights, atol=1e-4), name
