"""The opt-in wire dtype of the gossip algorithms (`algorithm_params.wire_dtype`): f16 and bf16 halve
the bytes a peer sends, x_i stays f32, and on a small run the accuracy stays where f32 puts it."""

from __future__ import annotations

import pytest

from p2pfl.errors import ConfigError
from p2pfl.sim import engine
from p2pfl.sim import scenario as scenarios

SCENARIO = {"name": "wire", "peers": 4, "rounds": 6, "topology": "ring", "dataset": "digits", "partition": "iid",
            "local_steps": 4, "lr": 0.2, "centralized": False}


def test_an_unknown_wire_dtype_is_refused_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"wire_dtype: unknown value 'f8'; allowed: f32, f16, bf16"):
        scenarios.build({**SCENARIO, "algorithm_params": {"wire_dtype": "f8"}})


def test_half_precision_on_the_wire_halves_the_bytes_and_keeps_the_accuracy(tmp_path):
    runs = {}
    for dtype in ("f32", "f16", "bf16"):
        s = scenarios.build({**SCENARIO, "algorithm_params": {"wire_dtype": dtype}})
        runs[dtype] = engine.run(s, tmp_path / dtype)
    f32 = runs["f32"]
    for dtype in ("f16", "bf16"):
        run = runs[dtype]
        assert run["rejected"] == {}
        assert 0.49 < run["bytes_sent"] / f32["bytes_sent"] < 0.52          # payload halves; headers stay
        assert abs(run["honest_accuracy"]["mean"] - f32["honest_accuracy"]["mean"]) < 0.03
    assert runs["f16"]["honest_accuracy"]["mean"] != f32["honest_accuracy"]["mean"] or \
        runs["f16"]["consensus_distance"] != f32["consensus_distance"]      # it really sent something else
