"""The algorithm seam, proven from outside: an algorithm defined entirely in this file (sign-SGD with
a majority vote over neighbours), registered, and run by the in-process engine and by real `p2pfl
peer` processes (engine = "procs", which import this file as a plugin), with no other file changed.

The algorithm: each peer runs its local SGD steps, sends the sign of its update (a "signs" payload
of +-1/0 floats, |x| <= 1), and moves its model by `step` times the sign of the vote: its own signs
plus its neighbours'. No model ever travels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from p2pfl import algorithms
from p2pfl.algorithms import Algorithm, Context
from p2pfl.errors import ConfigError
from p2pfl.gossip.payloads import PayloadSpec
from p2pfl.learn.models import FlatParameters, ParamLayout
from p2pfl.learn.train import LocalTrainer
from p2pfl.sim import engine, procs
from p2pfl.sim import scenario as scenarios


@dataclass(frozen=True)
class SignVoteParams:
    step: float = 0.01    # how far a peer moves along the vote's sign per round

    def __post_init__(self) -> None:
        if not self.step > 0:
            raise ValueError(f"step must be > 0, got {self.step}")


@algorithms.register("sign_vote", params=SignVoteParams)
class SignVote(Algorithm):
    """local SGD, then a per-coordinate majority vote on the update's sign"""

    def __init__(self, ctx: Context, params: SignVoteParams) -> None:
        super().__init__(ctx, params)
        self.size = ParamLayout.of(ctx.model).size
        self.flat = FlatParameters(ctx.model)
        self.trainer = LocalTrainer(ctx.model, *ctx.train_data, ctx.train, torch.Generator().manual_seed(ctx.seed))
        self.x = self.flat.get()

    def payloads(self):
        return {"signs": PayloadSpec("f32", self.size, max_abs=1.0)}

    def local_update(self, t):
        stats = self.trainer.train_round(t)
        self.signs = torch.sign(self.flat.get() - self.x)
        self.vote = self.signs.clone()
        return {"train_loss": stats.loss, "local_steps": stats.steps}

    def outgoing(self, t, q, neighbor):
        return {"signs": self.signs}

    def combine(self, t, q, received):
        for r in received.values():
            self.vote += r["signs"]
        return {}

    def end_round(self, t):
        self.x = self.x + self.params.step * torch.sign(self.vote)
        self.flat.set(self.x)

    def vector(self):
        return self.x


SCENARIO = {"name": "sign-vote", "peers": 6, "rounds": 20, "topology": "ring", "dataset": "digits",
            "partition": "iid", "algorithm": "sign_vote", "algorithm_params": {"step": 0.002},
            "local_steps": 4, "lr": 0.2, "centralized": False, "plugins": [__file__]}


def test_the_registry_checks_the_new_algorithms_parameters():
    assert "sign_vote" in algorithms.names()
    with pytest.raises(ConfigError, match=r"algorithm_params\.stride: unknown key for algorithm 'sign_vote'"):
        scenarios.build({**SCENARIO, "algorithm_params": {"stride": 1}})
    with pytest.raises(ConfigError, match="step must be > 0"):
        scenarios.build({**SCENARIO, "algorithm_params": {"step": -1.0}})
    with pytest.raises(ConfigError, match="algorithm: unknown value 'sign_votes'"):
        scenarios.build({**SCENARIO, "algorithm": "sign_votes"})
    with pytest.raises(ConfigError, match="plugins: cannot import"):
        scenarios.build({**SCENARIO, "plugins": ["no_such_module_here"]})


def _check(summary: dict, out: Path) -> None:
    acc = summary["honest_accuracy"]
    assert summary["rejected"] == {} and summary["bytes_sent"] > 0
    events = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "round"' in line]
    assert len(events) == 6 * 20
    assert acc["min"] > 0.4   # from ~0.1 at the shared random start: the votes carried the learning


def test_a_test_defined_algorithm_runs_in_process(tmp_path):
    s = scenarios.build(SCENARIO)
    summary = engine.run(s, tmp_path)
    _check(summary, tmp_path)
    # the peers voted, they did not average: their models differ, but not by much
    assert 0 < summary["consensus_distance"] < 1.0


@pytest.mark.slow
def test_a_test_defined_algorithm_runs_as_real_peer_processes(tmp_path):
    s = scenarios.build({**SCENARIO, "engine": "procs", "peers": 3, "rounds": 12, "step_timeout_s": 10.0})
    summary = procs.run(s, tmp_path)
    assert summary["honest_accuracy"]["min"] > 0.3 and summary["rejected"] == {}
