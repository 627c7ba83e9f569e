"""Byzantine attacks: the crafting math, as pure functions over tensors, and the attack registry.

Theory of operation. An attacker runs the same protocol as an honest peer but sends, at each gossip step
(t, q), a crafted vector to each neighbour. What it crafts from is one of:
- its own vector (`sign_flip`), or nothing (`gaussian`, `free_rider` noise);
- the honest vectors its target would aggregate: `honest` = [x_target, x_j for the target's honest
  neighbours j] (`alie`, `ipm`, `dissensus`; the decentralized form of He, Karimireddy, Jaggi 2022, whose
  Byzantine workers read their target's and its good neighbours' models: the omniscient attacker);
- one honest peer's vector (`mimic`).
`label_flip` crafts nothing: it trains honestly on labels y -> C-1-y (`flip_labels`) and sends that model.
`silent` never sends. `rank_reversal` is for FRL, whose peers send rankings, not vectors: the reverse of
the vote of the honest rankings (p2pfl.robust.ranks.reversed_vote, p2pfl.algorithms.frl.RankAttacker). The peer that does the waiting and the sending lives in `p2pfl.peers.attacker`.

`ATTACKS` maps each name to its parameters and their defaults; `check_attack(name, params)` validates a
config (unknown attack or parameter, bad value: `ConfigError`) and returns the completed parameters.

Pure: torch only, no I/O, no clock, no global RNG (noise takes an explicit torch.Generator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from p2pfl.errors import ConfigError

# name -> {param: default}. None means "computed" (alie's z from n and f; mimic's peer: the first honest one).
ATTACKS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "sign_flip": MappingProxyType({"scale": 1.0}),
    "gaussian": MappingProxyType({"sigma": 1.0}),
    "label_flip": MappingProxyType({}),
    "alie": MappingProxyType({"z": None}),
    "ipm": MappingProxyType({"eps": 0.1}),
    "dissensus": MappingProxyType({"eps": 1.5}),
    "free_rider": MappingProxyType({"mode": "mean", "scale": 1.0}),
    "silent": MappingProxyType({}),
    "mimic": MappingProxyType({"peer": None}),
    "rank_reversal": MappingProxyType({}),   # FRL's attack (p2pfl.algorithms.frl.RankAttacker)
})
FREE_RIDER_MODES = ("mean", "noise")


def _number(what: str, value: Any, *, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise ConfigError(f"{what} must be {kind}, got {value!r}")
    return float(value)


def check_attack(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate attack `name` and its params; return them completed with the defaults."""
    if name not in ATTACKS:
        raise ConfigError(f"attack: unknown value {name!r}; allowed: {', '.join(sorted(ATTACKS))}")
    given = dict(params or {})
    unknown = sorted(set(given) - set(ATTACKS[name]))
    if unknown:
        allowed = ", ".join(sorted(ATTACKS[name])) or "none"
        raise ConfigError(f"attack_params: {name} has no parameter {unknown[0]!r}; allowed: {allowed}")
    p = {**ATTACKS[name], **given}
    for key in ("scale", "sigma", "eps"):
        if key in p:
            p[key] = _number(f"attack_params.{key} ({name})", p[key], positive=True)
    if p.get("z") is not None:
        p["z"] = _number("attack_params.z (alie)", p["z"], positive=False)
    if "mode" in p and p["mode"] not in FREE_RIDER_MODES:
        raise ConfigError(f"attack_params.mode (free_rider): unknown value {p['mode']!r}; "
                          f"allowed: {', '.join(FREE_RIDER_MODES)}")
    peer = p.get("peer")
    if peer is not None and (isinstance(peer, bool) or not isinstance(peer, (int, str))
                             or (isinstance(peer, int) and peer < 0)):
        raise ConfigError(f"attack_params.peer (mimic) must be a peer index >= 0 or a peer ID, got {peer!r}")
    return p


# ------------------------------------------------------------------------------------------ crafting


def sign_flip(own: Tensor, *, scale: float = 1.0) -> Tensor:
    """-scale * own: the attacker's own (honestly trained) vector, negated (epfml BitFlipping for scale 1)."""
    return own * -scale


def gaussian(like: Tensor, *, sigma: float, generator: torch.Generator) -> Tensor:
    """A draw from N(0, sigma^2 I) of `like`'s shape, dtype and device."""
    noise = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device)
    return (noise * sigma).to(like.device)


def uniform_noise(like: Tensor, *, scale: float, generator: torch.Generator) -> Tensor:
    """A draw from U[-scale, scale]^d (the RFFL free-rider's "gradient" for scale 1)."""
    u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=generator.device)
    return ((u * 2 - 1) * scale).to(like.device)


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """Untargeted label flip y -> C - 1 - y (epfml's 9 - y for C = 10)."""
    if num_classes < 1 or (y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes)):
        raise ConfigError(f"label_flip: labels must lie in [0, {num_classes}), got range "
                          f"[{int(y.min()) if y.numel() else 0}, {int(y.max()) if y.numel() else 0}]")
    return (num_classes - 1) - y


def alie_z(n: int, f: int) -> float:
    """z_max of "A Little Is Enough" (Baruch et al. 2019): s = floor(n/2 + 1) - f supporters needed,
    z = Phi^{-1}((n - s) / n). `n` counts all inputs (honest + Byzantine), `f` the Byzantine ones.
    s is floored at 1 (a Byzantine majority needs no supporters); a degenerate ratio (n <= s) gives 0."""
    if n < 1 or f < 0:
        raise ConfigError(f"alie: needs n >= 1 and f >= 0, got n={n}, f={f}")
    s = max(1, math.floor(n / 2 + 1) - f)
    ratio = (n - s) / n
    return NormalDist().inv_cdf(ratio) if 0 < ratio < 1 else 0.0


def _mean_std(honest: Tensor) -> tuple[Tensor, Tensor]:
    if honest.ndim != 2 or honest.shape[0] < 1:
        raise ValueError(f"expected honest: Tensor[k >= 1, d], got shape {tuple(honest.shape)}")
    mu = honest.mean(0)
    # unbiased std (ddof = 1), as byzfl and the epfml code; one vector has no spread
    sigma = honest.std(0) if honest.shape[0] > 1 else torch.zeros_like(mu)
    return mu, sigma


def alie(honest: Tensor, *, z: float) -> Tensor:
    """mu - z * sigma, per coordinate over the honest vectors [k, d] (sigma: unbiased std)."""
    mu, sigma = _mean_std(honest)
    return mu - z * sigma


def ipm(honest: Tensor, *, eps: float) -> Tensor:
    """Inner product manipulation (Xie, Koyejo, Gupta 2019): -eps * mean(honest)."""
    mu, _ = _mean_std(honest)
    return mu * -eps


def dissensus(target: Tensor, good: Tensor, good_weights: Tensor, byzantine_weight: float, *,
              eps: float) -> Tensor:
    """Dissensus (He, Karimireddy, Jaggi 2022), what each Byzantine neighbour of `target` sends:

        x_t - eps * sum_j W_tj (x_j - x_t) / sum_b W_tb

    over the target's good neighbours j (`good` [k, d], `good_weights` [k]) and its Byzantine neighbours b
    (`byzantine_weight` = sum_b W_tb > 0). With eps = 1 the target's gossip step leaves it where it was
    (the pull towards its good neighbours is cancelled); eps > 1 pushes it away from them."""
    if byzantine_weight <= 0:
        raise ValueError(f"dissensus: the target's Byzantine mixing weight must be > 0, got {byzantine_weight}")
    if good.shape[0] == 0:
        return target.clone()
    pull = torch.mv((good - target).t(), good_weights.to(good.dtype))  # (d,)
    return target - (eps / byzantine_weight) * pull


def received_mean(received: Tensor) -> Tensor:
    """The free rider's vector in mode "mean": the plain mean of what it received, [m, d] -> [d]."""
    return received.mean(0)
