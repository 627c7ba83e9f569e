"""The robust rules by name: each one `rule(own: Tensor[d], received: Tensor[m, d], *, f, **params) -> Tensor[d]`,
documented with its source and requirement. They share their implementations, validation and
bucketing with `aggregate` (aggregators.py), which also reports each input's weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from torch import Tensor

from p2pfl.robust.aggregators import Rule, _apply


def mean(own: Tensor, received: Tensor, *, f: int) -> Tensor:
    """Uniform average of the n inputs. Tolerates no Byzantine input (f is accepted, for baselines)."""
    return _apply("mean", own, received, f, {}, False)[0]


def mixing(own: Tensor, received: Tensor, *, f: int, weights: Tensor | Sequence[float]) -> Tensor:
    """sum_i weights[i] x_i, e.g. a Metropolis-Hastings row of W (weights[0] for own). The weights must be
    >= 0 and sum to 1; when neighbours are missing, the caller renormalizes over those present.
    Tolerates no Byzantine input."""
    return _apply("mixing", own, received, f, {"weights": weights}, False)[0]


def median(own: Tensor, received: Tensor, *, f: int) -> Tensor:
    """Coordinate-wise median (even n: the mean of the two middle values). Needs n >= 2f + 1."""
    return _apply("median", own, received, f, {}, False)[0]


def trimmed_mean(own: Tensor, received: Tensor, *, f: int) -> Tensor:
    """Per coordinate, drop the f largest and f smallest values and average the n - 2f left. Needs n >= 2f + 1."""
    return _apply("trimmed_mean", own, received, f, {}, False)[0]


def krum(own: Tensor, received: Tensor, *, f: int) -> Tensor:
    """Krum (Blanchard et al. 2017): the input with the lowest sum of squared distances to its n - f - 2
    nearest other inputs (ties: the lower sum over all inputs, then the lower index). Tolerates f
    Byzantine inputs when n >= 2f + 3."""
    return _apply("krum", own, received, f, {}, False)[0]


def multi_krum(own: Tensor, received: Tensor, *, f: int, m: int | None = None) -> Tensor:
    """Multi-Krum: the average of the m inputs with the lowest Krum scores (default m = n - f; ties as in
    `krum`). Needs n >= 2f + 3."""
    return _apply("multi_krum", own, received, f, {"m": m}, False)[0]


def bulyan(own: Tensor, received: Tensor, *, f: int) -> Tensor:
    """Bulyan (El Mhamdi et al. 2018): select theta = n - 2f inputs by repeated Krum on the remaining set
    (r - f - 2 neighbours when r remain; its structural ties are broken as in `krum`), then per coordinate
    average the theta - 2f selected values closest to their median. Needs n >= 4f + 3."""
    return _apply("bulyan", own, received, f, {}, False)[0]


def centered_clip(own: Tensor, received: Tensor, *, f: int, tau: float, iterations: int = 1,
                  center: Tensor | None = None) -> Tensor:
    """Centered clipping (Karimireddy, He, Jaggi 2021): v <- v + (1/n) sum_i clip(x_i - v, tau), `iterations`
    times from v = `center` (the peer's previous aggregate) or, if None, the own vector. Needs n >= 2f + 1
    (an honest majority; the paper's guarantee needs a smaller Byzantine fraction)."""
    return _apply("centered_clip", own, received, f, {"tau": tau, "iterations": iterations, "center": center},
                  False)[0]


def self_centered_clip(own: Tensor, received: Tensor, *, f: int, tau: float | str,
                       weights: Tensor | Sequence[float] | None = None) -> Tensor:
    """ClippedGossip (He, Karimireddy, Jaggi 2022): x_own + sum_j W_j clip(x_j - x_own, tau), W = `weights`
    (a row of the mixing matrix, own first; default uniform 1/n). tau = "adaptive" uses the second-largest
    neighbour distance (the reference code's choice). Its guarantee depends on the Byzantine mixing weight
    and tau, not on n vs f, so f is only accepted."""
    return _apply("self_centered_clip", own, received, f, {"tau": tau, "weights": weights}, False)[0]


def geometric_median(own: Tensor, received: Tensor, *, f: int, iterations: int = 8, nu: float = 0.1) -> Tensor:
    """Approximate geometric median by smoothed Weiszfeld (RFA, Pillutla et al.): `iterations` steps of
    z <- sum_i b_i x_i / sum_i b_i, b_i = 1 / max(||z - x_i||, nu), from z = the mean. Needs n >= 2f + 1."""
    return _apply("geometric_median", own, received, f, {"iterations": iterations, "nu": nu}, False)[0]


RULES: Mapping[str, Rule] = MappingProxyType({
    "mean": mean,
    "mixing": mixing,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
    "bulyan": bulyan,
    "centered_clip": centered_clip,
    "self_centered_clip": self_centered_clip,
    "geometric_median": geometric_median,
})
