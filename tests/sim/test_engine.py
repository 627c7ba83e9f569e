"""The in-process engine end to end on small scenarios."""

import json

import pytest

from p2pfl.sim import engine
from p2pfl.sim import scenario as scenarios
from p2pfl.sim.results import read_events, report


def small(**kw):
    values = dict(name="t", peers=6, rounds=4, topology="ring", dataset="digits", partition="dirichlet:0.5",
                  hidden=[32], lr=0.1, batch_size=16, seed=1, centralized=True)
    values.update(kw)
    return scenarios.build(values)


def test_same_seed_same_accuracies(tmp_path):
    a = engine.run(small(), tmp_path / "a")
    b = engine.run(small(), tmp_path / "b")
    c = engine.run(small(seed=2), tmp_path / "c")
    assert a["per_peer_accuracy"] == b["per_peer_accuracy"]
    assert a["consensus_distance"] == b["consensus_distance"]
    assert a["per_peer_accuracy"] != c["per_peer_accuracy"]


def test_same_seed_same_round_summaries(tmp_path):
    # trio schedules peers in a random order: the summaries must not depend on it, to the last bit
    def summaries(out):
        engine.run(small(peers=12, centralized=False), out)
        return [e for e in read_events(out) if e["kind"] == "consensus"]

    assert summaries(tmp_path / "a") == summaries(tmp_path / "b") == summaries(tmp_path / "c")


def test_lossy_links_with_deadlines_are_deterministic(tmp_path):
    # frames due at the very instant of a step deadline: which comes first must not be trio's random pick
    def run(out):
        return engine.run(small(peers=12, topology="regular:4", latency_ms=50, loss=0.2, step_timeout_s=0.1,
                                rounds=6, centralized=False), out)

    a, b, c = run(tmp_path / "a"), run(tmp_path / "b"), run(tmp_path / "c")
    assert a["rejected"] == b["rejected"] == c["rejected"]
    assert a["per_peer_accuracy"] == b["per_peer_accuracy"] == c["per_peer_accuracy"]


def test_run_writes_metrics_summary_and_plot(tmp_path):
    s = engine.run(small(), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("peers", "rounds", "seed", "topology", "honest_accuracy", "centralized_accuracy", "bytes_sent",
                "wall_s", "rejected"):
        assert key in summary
    assert summary["honest_accuracy"]["min"] <= summary["honest_accuracy"]["mean"] <= summary["honest_accuracy"]["max"]
    assert summary["bytes_sent"] > 0 and summary["rejected"] == {}
    events = read_events(tmp_path)
    rounds = [e for e in events if e["kind"] == "round"]
    assert len(rounds) == 6 * 4 and {e["peer"] for e in rounds} == set(range(6))
    assert len([e for e in events if e["kind"] == "consensus"]) == 4
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = report(tmp_path)
    assert r["final"]["mean"] == pytest.approx(s["honest_accuracy"]["mean"])
    assert r["centralized"] == pytest.approx(s["centralized_accuracy"])


def test_peers_learn_beyond_chance_and_full_graph_agrees(tmp_path):
    s = engine.run(small(peers=8, rounds=8, topology="full", partition="iid"), tmp_path)
    assert s["honest_accuracy"]["min"] > 0.5          # 10 classes: chance is 0.1
    assert s["consensus_distance"] < 1e-8              # MH on the full graph averages exactly


def test_wire_mode_matches_object_mode(tmp_path):
    a = engine.run(small(rounds=2), tmp_path / "a")
    b = engine.run(small(rounds=2, wire=True), tmp_path / "b")
    assert a["per_peer_accuracy"] == b["per_peer_accuracy"]
    assert b["bytes_sent"] > a["bytes_sent"]  # headers and signatures


@pytest.mark.parametrize("topology", ["torus", "regular:3", "erdos:0.5", "exponential"])
def test_every_topology_runs(tmp_path, topology):
    s = engine.run(small(peers=10, rounds=2, topology=topology, centralized=False), tmp_path)
    assert s["rounds"] == 2 and s["centralized_accuracy"] is None


@pytest.mark.parametrize("dataset, model", [("mnist1d", "mlp"), ("synthetic", "mlp"), ("digits", "cnn")])
def test_datasets_and_models(tmp_path, dataset, model):
    s = engine.run(small(rounds=2, dataset=dataset, model=model, centralized=False), tmp_path)
    assert 0 <= s["honest_accuracy"]["mean"] <= 1


@pytest.mark.slow
def test_default_scenario_learns(tmp_path):
    s = engine.run(scenarios.load(None), tmp_path)
    assert s["honest_accuracy"]["mean"] > 0.8
    assert s["centralized_accuracy"] > 0.9
