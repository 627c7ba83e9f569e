"""Byzantine-robust aggregation: pure torch functions over the own vector and the received ones.

Every rule is `rule(own: Tensor[d], received: Tensor[m, d], *, f, **params) -> Tensor[d]`, listed by name in
`RULES`; `aggregate(name, ...)` also reports each input's effective weight, and `check_rule(name, degree, f,
**params)` raises `ConfigError` at configuration time when the rule cannot run (see aggregators.py; the rules by name are rules.py).
FRL's rankings are aggregated by `rank_vote` (ranks.py), not by a rule over float vectors.
"""

from p2pfl.robust.aggregators import Aggregation, Rule, aggregate, bucketing, check_rule, clip
from p2pfl.robust.ranks import rank_vote
from p2pfl.robust.rules import (
    RULES,
    bulyan,
    centered_clip,
    geometric_median,
    krum,
    mean,
    median,
    mixing,
    multi_krum,
    self_centered_clip,
    trimmed_mean,
)

__all__ = [
    "RULES",
    "Aggregation",
    "Rule",
    "aggregate",
    "bucketing",
    "bulyan",
    "centered_clip",
    "check_rule",
    "clip",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "mixing",
    "multi_krum",
    "rank_vote",
    "self_centered_clip",
    "trimmed_mean",
]
