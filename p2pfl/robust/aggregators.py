"""Byzantine-robust aggregation rules: own vector + neighbours' vectors -> one vector.

Theory of operation. A rule maps own: Tensor[d] and received: Tensor[m, d] to a Tensor[d]. The n = m + 1
inputs are own (row 0) then the received rows; `f` is the number of Byzantine inputs the rule must tolerate,
and each rule's requirement is n >= a*f + b (krum 2f + 3, bulyan 4f + 3, ...; see `_SPECS`).
Every rule exists in two forms that share one implementation `_<rule>(own, received, f, params, want)`:
`krum(own, received, f=...)` returns the vector, `aggregate("krum", ...)` returns an `Aggregation` that
also carries the effective weight of every input in the output (for metrics and reputation).

Requirements are checked with the same message at configuration time, by `check_rule(name, degree, f,
**params)`, and on every call (too few rows, unknown or bad params: `ConfigError`). Bucketing (Karimireddy
et al. 2022) is a pre-aggregation stage available to every rule through `bucket_size` and an injected
torch.Generator; `bucketing(rule, s, generator)` returns it as a rule.

The heavy lifting is in kernels.py (chunked centered Gram matrix, comparator networks). This module holds
the implementations, validation and the registry; the rules by name, with their documentation, are rules.py. Pure: torch only, no I/O, no clock, no global RNG; results stay
on the inputs' device and dtype. Inputs are finite (NaN/Inf are rejected at decode, before any rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from p2pfl.errors import ConfigError, LocalProtocolError
from p2pfl.robust import kernels

Params = dict[str, Any]
Impl = Callable[[Tensor, Tensor, int, Params, bool], "tuple[Tensor, Tensor | None]"]


Rule = Callable[..., Tensor]
"""`rule(own: Tensor[d], received: Tensor[m, d], *, f: int, **params) -> Tensor[d]` (params differ per rule)."""


@dataclass(frozen=True, eq=False)
class Aggregation:
    """A rule's output and the effective weight of each input (index 0 = own) in it.

    weights[i] is the coefficient of input i when the output is written as a combination of the inputs,
    averaged over coordinates for the coordinate-wise rules: krum one-hot, multi_krum 1/m on the selection,
    mean 1/n, mixing the given weights, median / trimmed_mean / bulyan the fraction of coordinates where the
    input was kept (inputs tied at a cut share it), clipping rules the clipped coefficient. They sum to 1,
    except centered_clip with an explicit `center`, where the center carries 1 - sum(weights).
    """

    vector: Tensor  # [d]
    weights: Tensor  # [n], same dtype and device as vector


def clip(z: Tensor, tau: float) -> Tensor:
    """clip(z, tau) = z * min(1, tau / ||z||) (global L2 norm; z = 0 stays 0)."""
    norm = torch.linalg.vector_norm(z)
    return z * torch.where(norm > tau, tau / norm, 1.0)


# ----------------------------------------------------------------------------------------- helpers


def _combine(own: Tensor, received: Tensor, w: Tensor, extra: Tensor | None = None) -> Tensor:
    """sum_i w[i] x_i (+ (1 - sum w) * extra), one pass over `received` (a GEMV)."""
    coef = w.to(own.dtype)
    out = torch.mv(received.t(), coef[1:]) if received.shape[0] else torch.zeros_like(own)
    out.addcmul_(own, coef[0])
    if extra is not None:
        out.addcmul_(extra, (1.0 - w.sum()).to(own.dtype))
    return out


def _row(own: Tensor, received: Tensor, i: int) -> Tensor:
    return (own if i == 0 else received[i - 1]).clone()


def _full(n: int, value: float, like: Tensor) -> Tensor:
    return torch.full((n,), value, dtype=torch.float64, device=like.device)


# ------------------------------------------------------------------------------------------- rules


def _mean(own: Tensor, received: Tensor, f: int, p: Params, want: bool) -> tuple[Tensor, Tensor | None]:
    w = _full(received.shape[0] + 1, 1.0 / (received.shape[0] + 1), own)
    return _combine(own, received, w), w  # a GEMV: faster than received.sum(0) on CPU


def _mixing(own: Tensor, received: Tensor, f: int, p: Params, want: bool) -> tuple[Tensor, Tensor | None]:
    w = p["weights"].to(own.device)
    return _combine(own, received, w), w


def _trim(own: Tensor, received: Tensor, lo: int, hi: int, want: bool) -> tuple[Tensor, Tensor | None]:
    """Mean of the order statistics lo..hi per coordinate; weights = kept fraction per input."""
    total, counts = kernels.trimmed_sum(own, received, lo, hi, want)
    k = hi - lo + 1
    return total.div_(k), (counts / (k * own.shape[0]) if counts is not None else None)


def _median(own: Tensor, received: Tensor, f: int, p: Params, want: bool) -> tuple[Tensor, Tensor | None]:
    n = received.shape[0] + 1
    return _trim(own, received, (n - 1) // 2, n // 2, want)  # even n: mean of the two middle values


def _trimmed_mean(own: Tensor, received: Tensor, f: int, p: Params, want: bool) -> tuple[Tensor, Tensor | None]:
    n = received.shape[0] + 1
    return _trim(own, received, f, n - 1 - f, want)


def _krum_order(d2: Tensor, f: int, active: Tensor) -> Tensor:
    """Active inputs by increasing Krum score: the sum of squared distances to the r - f - 2 nearest other
    active inputs (r = how many are active). Ties, which are structural when r - f - 2 <= 1 (mutual nearest
    neighbours, or every score 0 in Bulyan's last rounds), go to the lower sum of squared distances to all
    active inputs, then to the lower index, so that the order does not depend on the order of `received`."""
    r = int(active.sum())
    masked = d2.masked_fill(~active[None, :], math.inf)
    masked.fill_diagonal_(math.inf)
    ranked = masked.sort(dim=1).values
    scores = ranked[:, : max(r - f - 2, 0)].sum(dim=1).masked_fill_(~active, math.inf)
    totals = ranked[:, : max(r - 1, 0)].sum(dim=1)
    by_total = torch.sort(totals, stable=True).indices
    order = by_total[torch.sort(scores[by_total], stable=True).indices]  # lexicographic (score, total, index)
    return order[:r]


def _distances(own: Tensor, received: Tensor) -> Tensor:
    g = kernels.gram(own, received)
    return kernels.sq_distances((g + g.t()) * 0.5)  # exactly symmetric, so tied scores tie exactly


def _krum(own: Tensor, received: Tensor, f: int, p: Params, want: bool) -> tuple[Tensor, Tensor | None]:
    n = received.shape[0] + 1
    best = int(_krum_order(_distances(own, received), f, torch.ones(n, dtype=torch.bool, device=own.device))[0])
    w = _full(n, 0.0, own)
    w[best] = 1.0
    return _row(own, received, best), w


def _multi_krum(own: Tensor, received: Tensor, f: int, p: Params, want: bool) -> tuple[Tensor, Tensor | None]:
    n = received.shape[0] + 1
    m = n - f if p["m"] is None else p["m"]
    chosen = _krum_order(_distances(own, received), f, torch.ones(n, dtype=torch.bool, device=own.device))[:m]
    w = _full(n, 0.0, own)
    w[chosen] = 1.0 / m
    return _combine(own, received, w), w


def _bulyan(own: Tensor, received: Tensor, f: int, p: Params, want: bool) -> tuple[Tensor, Tensor | None]:
    n = received.shape[0] + 1
    theta, beta = n - 2 * f, n - 4 * f
    d2 = _distances(own, received)  # one distance matrix for every round, masked to the remaining inputs
    active = torch.ones(n, dtype=torch.bool, device=own.device)
    chosen = []
    for _ in range(theta):
        best = int(_krum_order(d2, f, active)[0])
        active[best] = False
        chosen.append(best)
    total, counts = kernels.closest_to_median_sum(own, received, chosen, beta, want)
    w = _full(n, 0.0, own)
    if counts is not None:
        w[chosen] = counts / (beta * own.shape[0])
    return total.div_(beta), w


def _centered_clip(own: Tensor, received: Tensor, f: int, p: Params, want: bool) -> tuple[Tensor, Tensor | None]:
    n, tau, rounds = received.shape[0] + 1, float(p["tau"]), p["iterations"]
    center = p["center"]
    # v = c0 + sum_i a_i (x_i - c0) with c0 the center; distances come from the Gram matrix of x_i - c0.
    g = kernels.gram(own, received, center) if rounds > 1 else None
    diag = g.diagonal() if g is not None else kernels.sq_norms(own, received, center)
    a = _full(n, 0.0, own)
    for it in range(rounds):
        if g is None or it == 0:
            dist2 = diag
        else:
            ga = g @ a
            dist2 = diag - 2.0 * ga + a @ ga
        dist = dist2.clamp(min=0.0).sqrt()
        s = torch.where(dist > tau, tau / dist, 1.0)  # clip(x_i - v, tau) = s_i (x_i - v)
        a = a * (1.0 - s.sum() / n) + s / n
    if center is None:
        a[0] += 1.0 - a.sum()
        return _combine(own, received, a), a
    return _combine(own, received, a, extra=center), a


def _self_centered_clip(own: Tensor, received: Tensor, f: int, p: Params,
                        want: bool) -> tuple[Tensor, Tensor | None]:
    n = received.shape[0] + 1
    w = _full(n, 1.0 / n, own) if p["weights"] is None else p["weights"].to(own.device)
    dist = kernels.sq_norms(own, received).sqrt()  # ||x_j - x_own||, dist[0] = 0
    tau: Tensor | float = p["tau"]
    if tau == "adaptive":  # the second-largest neighbour distance: the farthest is always clipped
        tau = dist[1:].topk(min(2, n - 1)).values[-1] if n > 1 else 0.0
    s = torch.where(dist > tau, tau / dist, 1.0)
    c = w * s
    c[0] = 0.0
    c[0] = 1.0 - c.sum()  # x_own + sum_j W_j clip(x_j - x_own) = (1 - sum_j W_j s_j) x_own + sum_j W_j s_j x_j
    return _combine(own, received, c), c


def _geometric_median(own: Tensor, received: Tensor, f: int, p: Params,
                      want: bool) -> tuple[Tensor, Tensor | None]:
    n, nu = received.shape[0] + 1, float(p["nu"])
    g = kernels.gram(own, received)
    diag = g.diagonal()
    w = _full(n, 1.0 / n, own)  # z_0 = the mean, as in the RFA reference code; z = sum_i w_i x_i throughout
    for _ in range(p["iterations"]):
        gw = g @ w
        dist = (diag - 2.0 * gw + w @ gw).clamp(min=0.0).sqrt()  # ||z - x_i||
        beta = (1.0 / n) / dist.clamp(min=nu)
        w = beta / beta.sum()
    return _combine(own, received, w), w


# ----------------------------------------------------------------------------------- registry


_REQUIRED = object()


@dataclass(frozen=True)
class _Spec:
    impl: Impl
    needs: tuple[int, int]  # n >= a*f + b
    config: Mapping[str, Any] = field(default_factory=dict)  # config-time params -> default (or _REQUIRED)
    runtime: Mapping[str, bool] = field(default_factory=dict)  # per-call params -> required at call time
    bucketable: bool = True


_SPECS: Mapping[str, _Spec] = MappingProxyType({
    "mean": _Spec(_mean, (0, 1)),
    "mixing": _Spec(_mixing, (0, 1), runtime={"weights": True}, bucketable=False),
    "median": _Spec(_median, (2, 1)),
    "trimmed_mean": _Spec(_trimmed_mean, (2, 1)),
    "krum": _Spec(_krum, (2, 3)),
    "multi_krum": _Spec(_multi_krum, (2, 3), config={"m": None}),
    "bulyan": _Spec(_bulyan, (4, 3)),
    "centered_clip": _Spec(_centered_clip, (2, 1), config={"tau": _REQUIRED, "iterations": 1},
                           runtime={"center": False}),
    "self_centered_clip": _Spec(_self_centered_clip, (0, 1), config={"tau": _REQUIRED},
                                runtime={"weights": False}),
    "geometric_median": _Spec(_geometric_median, (2, 1), config={"iterations": 8, "nu": 0.1}),
})
_STAGE = ("bucket_size", "generator")  # pre-aggregation params, accepted by every rule


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ConfigError(f"unknown aggregation rule {name!r}; known: {', '.join(sorted(_SPECS))}")
    return _SPECS[name]


def _int(what: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{what} must be an int {bound}, got {value!r}")
    return value


def _positive(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def _weights(name: str, value: Any, n: int) -> Tensor:
    if isinstance(value, (str, bytes, Mapping)):
        raise ConfigError(f"{name}: weights must be a list of numbers, got {type(value).__name__}")
    try:
        w = torch.as_tensor(value).to(torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:   # ragged, non-numeric, None entries
        raise ConfigError(f"{name}: weights must be a list of numbers: {str(e)[:120]}") from None
    if w.shape != (n,):
        raise ConfigError(f"{name}: weights must have one entry per input (own first), n = {n}, got shape "
                          f"{tuple(w.shape)}; if some neighbours are missing, the caller renormalizes")
    total = float(w.sum())
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or abs(total - 1.0) > 1e-5:
        raise ConfigError(f"{name}: weights must be finite, >= 0 and sum to 1 (got sum {total:.7g})")
    return w


def _params(name: str, n: int, given: Mapping[str, Any], at_call: bool, d: int | None = None) -> Params:
    """Validate and complete a rule's params for n inputs (n = bucket count when bucketing)."""
    spec = _spec(name)
    unknown = set(given) - set(spec.config) - set(spec.runtime)
    if unknown:
        allowed = sorted([*spec.config, *spec.runtime, *_STAGE])
        raise ConfigError(f"{name}: unknown parameter(s) {sorted(unknown)}; allowed: {allowed}")
    p: Params = {**spec.config, **{k: None for k in spec.runtime}, **given}
    missing = [k for k, v in p.items() if v is _REQUIRED or (at_call and v is None and spec.runtime.get(k))]
    if missing:
        raise ConfigError(f"{name}: missing parameter(s) {missing}")
    if "m" in p and p["m"] is not None:
        _int(f"{name}: m", p["m"], 1, n)
    if "iterations" in p:
        _int(f"{name}: iterations", p["iterations"], 1)
    if "nu" in p:
        _positive(f"{name}: nu", p["nu"])
    if "tau" in p and not (name == "self_centered_clip" and p["tau"] == "adaptive"):
        p["tau"] = _positive(f"{name}: tau" + (" (or 'adaptive')" if name == "self_centered_clip" else ""), p["tau"])
    if p.get("weights") is not None:
        p["weights"] = _weights(name, p["weights"], n)
    center = p.get("center")
    if center is not None and (not isinstance(center, Tensor) or center.ndim != 1 or
                               (d is not None and center.shape[0] != d)):
        raise ConfigError(f"{name}: center must be a Tensor[d] (d = {d}) or None")
    return p


def _requirement(name: str, degree: int, f: int, bucket_size: int) -> None:
    a, b = _spec(name).needs
    n = degree + 1
    inputs = -(-n // bucket_size)
    if inputs < a * f + b:
        where = f"degree {degree} + self = {n}"
        if bucket_size > 1:
            where += f" inputs in {inputs} buckets of {bucket_size}"
        raise ConfigError(f"{name} needs n >= {a}f + {b} inputs: {where} < {a}*{f}+{b} = {a * f + b} (f={f})")


def _stage(name: str, given: Mapping[str, Any]) -> int:
    s = _int(f"{name}: bucket_size", given.get("bucket_size", 1), 1)
    if s > 1 and (not _spec(name).bucketable or given.get("weights") is not None):
        raise ConfigError(f"{name}: bucketing cannot be combined with per-input weights")
    return s


def check_rule(name: str, degree: int, f: int, **params: Any) -> None:
    """Raise ConfigError unless rule `name` can run on degree + 1 inputs tolerating f Byzantine ones.

    Checks the name, the param names and values, and the rule's requirement on n and f (after bucketing,
    if `bucket_size` is given). Per-call params (mixing weights, a clipping center, the generator) may be
    left out here; they are checked when given.
    """
    _spec(name)
    _int("degree", degree, 0)
    _int("f", f, 0)
    s = _stage(name, params)
    _requirement(name, degree, f, s)
    rule_params = {k: v for k, v in params.items() if k not in _STAGE}
    _params(name, -(-(degree + 1) // s), rule_params, at_call=False)


# ------------------------------------------------------------------------------------ entry points


def _buckets(own: Tensor, received: Tensor, s: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Shuffle the n inputs, average within buckets of s (the last may be smaller). The bucket holding own
    becomes row 0, so self-centered rules stay centered near it. Returns (own', received', A [nb, n])."""
    n = received.shape[0] + 1
    nb = -(-n // s)
    perm = torch.randperm(n, generator=gen, device=gen.device).to(own.device)
    bucket = torch.empty(n, dtype=torch.long, device=own.device)
    bucket[perm] = torch.arange(n, device=own.device) // s
    b0 = bucket[0].clone()
    bucket = torch.where(bucket == b0, 0, torch.where(bucket == 0, b0, bucket))
    sizes = torch.bincount(bucket, minlength=nb)
    avg = torch.zeros(nb, n, dtype=torch.float64, device=own.device)
    avg[bucket, torch.arange(n, device=own.device)] = 1.0 / sizes[bucket].double()
    a32 = avg.to(own.dtype)
    means = torch.mm(a32[:, 1:], received) if n > 1 else own.new_zeros(nb, own.shape[0])
    means.addr_(a32[:, 0], own)
    return means[0], means[1:], avg


def _apply(name: str, own: Tensor, received: Tensor, f: int, given: Mapping[str, Any],
           want: bool) -> tuple[Tensor, Tensor | None]:
    spec = _spec(name)
    if not isinstance(own, Tensor) or not isinstance(received, Tensor) or own.ndim != 1 or received.ndim != 2 \
            or received.shape[1] != own.shape[0] or not own.is_floating_point() or received.dtype != own.dtype \
            or received.device != own.device:
        raise LocalProtocolError(f"{name}: expected own: Tensor[d] and received: Tensor[m, d] of one float dtype "
                                 f"and device, got {_describe(own)} and {_describe(received)}")
    _int("f", f, 0)
    s = _stage(name, given)
    _requirement(name, received.shape[0], f, s)
    n = -(-(received.shape[0] + 1) // s)
    p = _params(name, n, {k: v for k, v in given.items() if k not in _STAGE}, at_call=True, d=own.shape[0])
    if p.get("center") is not None:
        p["center"] = p["center"].to(device=own.device, dtype=own.dtype)
    if s == 1:
        return spec.impl(own, received, f, p, want)
    gen = given.get("generator")
    if not isinstance(gen, torch.Generator):
        raise ConfigError(f"{name}: bucket_size = {s} needs generator=torch.Generator for the shuffle")
    b_own, b_received, avg = _buckets(own, received, s, gen)
    vector, w = spec.impl(b_own, b_received, f, p, want)
    return vector, (avg.t() @ w if w is not None else None)


def _describe(x: Any) -> str:
    return f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, Tensor) else type(x).__name__


def aggregate(name: str, own: Tensor, received: Tensor, *, f: int, **params: Any) -> Aggregation:
    """Run rule `name` and report the effective weight of each input (see `Aggregation`).

    params are the rule's own (see each rule) plus the pre-aggregation stage: bucket_size (default 1 = off)
    and generator (a torch.Generator, required when bucket_size > 1; one randperm(n) is drawn per call).
    Weights of bucketed inputs are their bucket's weight divided by the bucket size.
    """
    vector, w = _apply(name, own, received, f, params, True)
    assert w is not None
    return Aggregation(vector, w.to(own.dtype))


def bucketing(rule: str | Rule, s: int, generator: torch.Generator) -> Rule:
    """The rule preceded by bucketing: shuffle the n inputs with `generator`, average buckets of s, aggregate
    the ceil(n/s) bucket means with the same f (each Byzantine input spoils at most one bucket)."""
    from p2pfl.robust.rules import RULES  # (rules.py builds on this module)

    name = rule if isinstance(rule, str) else next((k for k, v in RULES.items() if v is rule), repr(rule))
    _spec(name)
    _int("bucket_size", s, 1)

    def bucketed(own: Tensor, received: Tensor, *, f: int, **params: Any) -> Tensor:
        return _apply(name, own, received, f, {**params, "bucket_size": s, "generator": generator}, False)[0]

    bucketed.__name__ = f"bucketed_{name}"
    return bucketed
