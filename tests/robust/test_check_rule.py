"""check_rule: config-time errors that name the rule, the degree and f; bucketing as a pre-aggregation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError
from p2pfl.robust import RULES, aggregate, bucketing, check_rule, krum, median

RUNTIME = {"mixing": lambda n: {"weights": torch.full((n,), 1.0 / n)}}
CONFIG = {"centered_clip": {"tau": 1.0}, "self_centered_clip": {"tau": "adaptive"}}


def test_message_names_degree_and_f() -> None:
    with pytest.raises(ConfigError) as err:
        check_rule("krum", 4, 2)
    assert str(err.value) == "krum needs n >= 2f + 3 inputs: degree 4 + self = 5 < 2*2+3 = 7 (f=2)"
    with pytest.raises(ConfigError, match=r"bulyan needs n >= 4f \+ 3 inputs: degree 9 \+ self = 10 < 4\*2\+3"):
        check_rule("bulyan", 9, 2)
    with pytest.raises(ConfigError, match=r"median needs n >= 2f \+ 1 inputs: degree 3 \+ self = 4 < .* \(f=2\)"):
        check_rule("median", 3, 2)


def test_requirements_at_the_boundary() -> None:
    for name, (a, b) in {"krum": (2, 3), "multi_krum": (2, 3), "bulyan": (4, 3), "trimmed_mean": (2, 1),
                         "median": (2, 1), "geometric_median": (2, 1)}.items():
        for f in range(4):
            check_rule(name, a * f + b - 1, f, **CONFIG.get(name, {}))  # n = a f + b: fine
            if a * f + b - 2 < 0:
                continue
            with pytest.raises(ConfigError, match=f"degree {a * f + b - 2} "):
                check_rule(name, a * f + b - 2, f)


def test_unknown_rule_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        check_rule("krun", 5, 1)
    assert all(name in str(err.value) for name in RULES)
    with pytest.raises(ConfigError, match="known: "):
        aggregate("nope", torch.zeros(2), torch.zeros(1, 2), f=0)


@pytest.mark.parametrize(("name", "params", "match"), [
    ("krum", {"tau": 1.0}, "unknown parameter"),
    ("median", {"m": 3}, "unknown parameter"),
    ("centered_clip", {}, r"missing parameter\(s\) \['tau'\]"),
    ("centered_clip", {"tau": -1.0}, "tau must be a positive"),
    ("centered_clip", {"tau": "adaptive"}, "tau must be a positive"),
    ("centered_clip", {"tau": 1.0, "iterations": 0}, "iterations must be an int >= 1"),
    ("self_centered_clip", {"tau": 0}, "tau .or 'adaptive'. must be"),
    ("multi_krum", {"m": 20}, r"m must be an int in \[1, 10\]"),
    ("multi_krum", {"m": True}, "m must be an int"),
    ("geometric_median", {"nu": 0.0}, "nu must be"),
    ("mixing", {"weights": [0.5, 0.5]}, "one entry per input"),
    ("mixing", {"bucket_size": 2}, "bucketing cannot be combined"),
    ("krum", {"bucket_size": 0}, "bucket_size must be an int >= 1"),
])
def test_bad_params(name: str, params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_rule(name, 9, 1, **params)


def test_bad_degree_or_f() -> None:
    for degree, f in [(-1, 0), (3, -1), (3, True), (3, 1.0)]:
        with pytest.raises(ConfigError):
            check_rule("mean", degree, f)  # type: ignore[arg-type]


def test_per_call_params_may_be_left_out_at_config_time() -> None:
    check_rule("mixing", 3, 0)
    check_rule("centered_clip", 3, 1, tau=2.0)
    check_rule("self_centered_clip", 3, 1, tau=1.0, weights=[0.25] * 4)
    check_rule("krum", 9, 1, bucket_size=2)  # 10 inputs -> 5 buckets >= 2f + 3


def test_bucketing_requirement_counts_buckets() -> None:
    with pytest.raises(ConfigError, match=r"degree 9 \+ self = 10 inputs in 4 buckets of 3 < 2\*1\+3 = 5 \(f=1\)"):
        check_rule("krum", 9, 1, bucket_size=3)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(RULES)), degree=st.integers(0, 12), f=st.integers(0, 4))
def test_check_rule_agrees_with_calling_the_rule(name: str, degree: int, f: int) -> None:
    params = {**CONFIG.get(name, {}), **RUNTIME.get(name, lambda n: {})(degree + 1)}
    x = torch.randn(degree + 1, 3, generator=torch.Generator().manual_seed(degree))
    try:
        check_rule(name, degree, f, **params)
    except ConfigError as err:
        with pytest.raises(ConfigError) as call_err:
            RULES[name](x[0], x[1:], f=f, **params)
        assert str(call_err.value) == str(err)
    else:
        RULES[name](x[0], x[1:], f=f, **params)


# ------------------------------------------------------------------------------------------- bucketing


def test_bucketing_averages_shuffled_buckets_then_applies_the_rule() -> None:
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    out = bucketing("median", 2, g1)(x[0], x[1:], f=1)
    # the definition, with the permutation the same generator state yields
    perm = torch.randperm(9, generator=g2).tolist()
    buckets = [perm[i : i + 2] for i in range(0, 9, 2)]
    buckets.sort(key=lambda b: 0 not in b)  # the bucket holding own plays own; order is irrelevant to median
    means = torch.stack([x[b].mean(0) for b in buckets])
    assert torch.allclose(out, median(means[0], means[1:], f=1))


def test_bucketing_weights_spread_the_bucket_weight_over_its_members() -> None:
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    agg = aggregate("krum", x[0], x[1:], f=1, bucket_size=2, generator=torch.Generator().manual_seed(3))
    assert sorted(agg.weights.tolist()) == [0.0] * 8 + [0.5, 0.5]
    members = torch.nonzero(agg.weights).squeeze(1)
    assert torch.allclose(agg.vector, x[members].mean(0))


def test_bucketing_needs_a_generator_and_accepts_rule_functions() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ConfigError, match="generator"):
        aggregate("krum", x[0], x[1:], f=1, bucket_size=2)
    g = torch.Generator().manual_seed(0)
    assert bucketing(krum, 1, g)(x[0], x[1:], f=1).equal(krum(x[0], x[1:], f=1))  # s = 1: the plain rule
    assert bucketing(krum, 2, g)(x[0], x[1:], f=1).shape == (3,)
    with pytest.raises(ConfigError, match="4 buckets of 3"):
        bucketing("krum", 3, g)(x[0], x[1:], f=1)  # 10 inputs -> 4 buckets < 2f + 3
