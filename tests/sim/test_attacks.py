"""Attacker peers: what they send, and runs with attackers in the in-process engine (MockClock, no sleeps)."""

from __future__ import annotations

import logging

import pytest
import torch
import trio
import trio.testing

from p2pfl.errors import ConfigError
from p2pfl.gossip.identity import Identity
from p2pfl.learn.models import make_model
from p2pfl.learn.train import TrainConfig
from p2pfl.peers.attacker import AttackerPeer, Board, Knowledge, ObservedPeer
from p2pfl.peers.memory import MemoryNetwork
from p2pfl.peers.peer import PeerConfig
from p2pfl.robust import attacks as craft
from p2pfl.sim import engine
from p2pfl.sim import scenario as scenarios
from p2pfl.sim.cast import choose_attackers
from p2pfl.sim.results import accuracy_table, read_events

# -------------------------------------------------------------------------------- attacker selection


def test_fraction_is_seeded_rounded_and_nested() -> None:
    a = choose_attackers(0.3, 32, seed=4)
    assert len(a) == 10 and a == choose_attackers(0.3, 32, seed=4) and a != choose_attackers(0.3, 32, seed=5)
    assert set(choose_attackers(0.1, 32, seed=4)) <= set(choose_attackers(0.2, 32, seed=4)) <= set(a)
    assert choose_attackers(0.0, 32, seed=4) == [] and choose_attackers([5, 1], 8, seed=0) == [1, 5]


@pytest.mark.parametrize("attackers, needle", [
    (1.0, "a fraction must be in [0, 1), got 1.0"), (-0.1, "in [0, 1)"), ([1, 8], "integers in [0, 8)"),
    ([2, 2], "duplicate"), (list(range(8)), "at least one peer must be honest")])
def test_bad_attackers(attackers, needle) -> None:
    with pytest.raises(ConfigError) as e:
        choose_attackers(attackers, 8, seed=0)
    assert needle in str(e.value)


# ------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("values, needle", [
    ({"attack": "alei", "attackers": 0.2}, "attack: unknown value 'alei'; allowed: none, alie, dissensus"),
    ({"attack": "alie", "attackers": 1.5}, "attackers: a fraction must be in [0, 1)"),
    ({"attackers": 0.25}, "attack = 'none'"),
    ({"attack": "alie", "attackers": 0.25, "attack_params": {"zz": 1}}, "alie has no parameter 'zz'; allowed: z"),
    ({"attack": "gaussian", "attackers": [1], "attack_params": {"sigma": 0}}, "sigma"),
    ({"attack": "mimic", "attackers": [1], "attack_params": {"peer": 1}}, "must be an honest peer index"),
    ({"attackers": "many", "attack": "alie"}, "attackers"),
    ({"aggregator": "trimmed_mean", "f": 2}, "degree 2 + self = 3 < 2*2+1 = 5 (f=2)"),
    ({"aggregator": "krum", "f": 3, "topology": "regular:6", "peers": 10}, "krum needs n >= 2f + 3"),
])
def test_scenario_errors_name_the_key(values, needle) -> None:
    with pytest.raises(ConfigError) as e:
        scenarios.build({"peers": 8, **values})
    assert needle in str(e.value)


def test_scenario_attack_keys_load_from_toml(tmp_path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('attack = "alie"\nattackers = [1, 5]\nattack_params = {z = 1.0}\naggregator = "trimmed_mean"\n'
                 'f = 1\ntopology = "regular:4"\npeers = 10\n')
    s = scenarios.load(f)
    assert (s.attack, s.attackers, s.attack_params) == ("alie", (1, 5), {"z": 1.0})
    assert scenarios.load(f, {"attackers": 0.3}).attackers == 0.3


# --------------------------------------------------------------------- what an attacker sends (3 peers)


class Recording(ObservedPeer):
    """An honest peer that remembers what it sent and what each neighbour sent it, per step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: dict[tuple[int, int], torch.Tensor] = {}
        self.got: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    async def prepare_step(self, t, q, x) -> None:
        await super().prepare_step(t, q, x)
        self.sent[(t, q)] = x.clone()

    def combine(self, t, q, received):
        self.got[(t, q)] = {s: v["model"].clone() for s, v in received.items()}
        return super().combine(t, q, received)


def triangle(attack: str, params: dict, omniscient: bool) -> tuple[Recording, Recording, AttackerPeer]:
    """Honest A and B, attacker M, all linked (uniform weights 1/3); two rounds."""
    network = MemoryNetwork()
    ids = [Identity.generate(bytes([i + 1]) * 32).peer_id for i in range(3)]
    a, b, m = ids
    g = torch.Generator().manual_seed(0)
    config = PeerConfig(train=TrainConfig(lr=0.1, local_steps=2, batch_size=8), step_timeout_s=5.0)
    board = Board(1)
    nbrs = {p: [o for o in ids if o != p] for p in ids}
    knowledge = Knowledge(board, ids, nbrs, {p: {o: 1 / 3 for o in nbrs[p]} for p in ids}, frozenset({m}))

    def data():
        x = torch.randn(16, 6, generator=g)
        return x, (x[:, 0] > 0).long()

    def kw(p, i):
        return {"transport": network.endpoint(p), "neighbors": dict.fromkeys(nbrs[p]),
                    "config": config.replace(seed=i), "offload": False}

    honest = [Recording(make_model("mlp", (6,), 2, hidden=(8,), seed=i), data(), board=board, **kw(p, i))
              for i, p in enumerate((a, b))]
    attacker = AttackerPeer(make_model("mlp", (6,), 2, hidden=(8,), seed=2), data(), attack=attack,
                            attack_params=params, knowledge=knowledge if omniscient else None, num_classes=2,
                            **kw(m, 2))
    attacker.events = []   # its round events
    attacker.on_event = attacker.events.append

    async def main():
        async with trio.open_nursery() as nursery:
            for p in (*honest, attacker):
                nursery.start_soon(run_one, p)

    async def run_one(p):
        async with p:
            await p.train(2)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return honest[0], honest[1], attacker


@pytest.mark.parametrize("omniscient", [True, False], ids=["omniscient", "local"])
@pytest.mark.parametrize("attack, params", [("alie", {}), ("alie", {"z": 2.0}), ("ipm", {"eps": 0.5}),
                                            ("dissensus", {"eps": 1.5}), ("mimic", {})])
def test_attacker_crafts_from_its_targets_honest_vectors(attack, params, omniscient) -> None:
    if attack == "mimic":  # copy B, named by its peer ID (which works in both modes)
        params = {"peer": Identity.generate(bytes([2]) * 32).peer_id}
    A, B, M = triangle(attack, params, omniscient)
    for step in [(0, 0), (1, 0)]:
        for target, other in ((A, B), (B, A)):
            got = target.got[step][M.id]
            honest = torch.stack([target.sent[step], other.sent[step]])  # target first, then its good neighbour
            if attack == "alie":
                z = params.get("z", craft.alie_z(3, 1))
                want = craft.alie(honest, z=z)
            elif attack == "ipm":
                want = craft.ipm(honest, eps=0.5)
            elif attack == "dissensus":  # W_t,other = W_t,M = 1/3: x_t - 1.5 (x_other - x_t)
                want = target.sent[step] - 1.5 * (other.sent[step] - target.sent[step])
            else:
                want = B.sent[step]
            assert torch.allclose(got, want, atol=1e-6), (attack, step)


@pytest.mark.parametrize("attack, crafted, crafted_from", [("alie", 2, 2), ("ipm", 2, 2), ("sign_flip", 2, 0),
                                                          ("silent", 0, 0), ("label_flip", 0, 0)])
@pytest.mark.parametrize("omniscient", [True, False], ids=["omniscient", "local"])
def test_an_attackers_round_event_counts_what_it_crafted_and_from_how_many_honest_vectors(
        attack, crafted, crafted_from, omniscient) -> None:
    *_, M = triangle(attack, {}, omniscient)
    assert [(e["round"], e["crafted"], e["crafted_from"]) for e in M.events] == \
        [(0, crafted, crafted_from), (1, crafted, crafted_from)]   # per round: 2 targets, A's and B's vectors


def test_sign_flip_sends_its_negated_trained_model_and_silent_sends_nothing() -> None:
    A, B, M = triangle("sign_flip", {}, omniscient=True)
    assert torch.equal(A.got[(1, 0)][M.id], B.got[(1, 0)][M.id])
    A, B, M = triangle("silent", {}, omniscient=True)
    assert all(M.id not in got for got in A.got.values()) and set(A.got) == {(0, 0), (1, 0)}


# ----------------------------------------------------------------------------------- engine runs


def small(**kw):
    values = {"name": "t", "peers": 8, "rounds": 4, "topology": "full", "dataset": "digits", "partition": "iid", "hidden": [32],
                  "lr": 0.1, "batch_size": 16, "seed": 1, "centralized": False}
    values.update(kw)
    return scenarios.build(values)


def test_a_robust_rule_keeps_honest_accuracy_under_a_large_gaussian(tmp_path) -> None:
    attack = {"attack": "gaussian", "attackers": [2, 5], "attack_params": {"sigma": 10.0}}
    plain = engine.run(small(**attack), tmp_path / "mixing")
    robust = engine.run(small(aggregator="trimmed_mean", f=2, **attack), tmp_path / "tm")
    assert robust["honest_accuracy"]["min"] > 0.6
    assert robust["honest_accuracy"]["mean"] > plain["honest_accuracy"]["mean"] + 0.3


def test_summary_and_events_separate_honest_and_byzantine(tmp_path) -> None:
    s = engine.run(small(attack="sign_flip", attackers=[0, 3], rounds=2), tmp_path)
    assert (s["attack"], s["attackers"], s["byzantine"]) == ("sign_flip", 2, [0, 3])
    assert s["byzantine_neighbors"]["max"] == 2 and s["byzantine_neighbors"]["histogram"] == {"2": 6}
    assert [a is None for a in s["per_peer_accuracy"]] == [i in (0, 3) for i in range(8)]
    events = read_events(tmp_path)
    run = next(e for e in events if e["kind"] == "run")
    assert run["honest"] == [1, 2, 4, 5, 6, 7] and run["byzantine"] == [0, 3]
    honest_final = [e["accuracy"] for e in events if e["kind"] == "round" and e["round"] == 1 and "accuracy" in e]
    assert len(honest_final) == 6
    assert s["honest_accuracy"]["mean"] == pytest.approx(sum(honest_final) / 6)
    assert accuracy_table(events, set(run["honest"]))["mean"][-1] == pytest.approx(s["honest_accuracy"]["mean"])


def test_silent_attackers_cost_honest_peers_a_virtual_deadline(tmp_path, caplog) -> None:
    # an hour's deadline per step: under MockClock it costs no wall time
    s = engine.run(small(attack="silent", attackers=[1, 6], step_timeout_s=3600.0, rounds=3), tmp_path)
    events = read_events(tmp_path)
    rounds = [e for e in events if e["kind"] == "round" and e["peer"] not in (1, 6)]
    ids = next(e for e in events if e["kind"] == "run")["peer_ids"]
    assert len(rounds) == 6 * 3
    assert all(e["missing"] == sorted([ids[1], ids[6]]) and e["received"] == 5 for e in rounds)
    assert s["honest_accuracy"]["min"] > 0.5


@pytest.mark.parametrize("attack", sorted(set(craft.ATTACKS) - {"rank_reversal"}))   # FRL's: tests/sim/test_frl.py
def test_every_attack_runs_in_the_engine(tmp_path, attack) -> None:
    logging.getLogger("p2pfl").setLevel(logging.ERROR)
    s = engine.run(small(attack=attack, attackers=0.25, rounds=1, topology="regular:4", aggregator="median",
                         f=1), tmp_path)
    assert s["attackers"] == 2 and 0 <= s["honest_accuracy"]["mean"] <= 1


# ------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, needle", [
    (["--attack", "alix", "--attackers", "1,2"], "attack: unknown value 'alix'; allowed: none, alie"),
    (["--attack", "alie", "--attackers", "1.2"], "a fraction must be in [0, 1)"),
    (["--attack", "alie", "--attackers", "x"], "--attackers: expected a fraction (0.3) or peer indices (1,5)"),
    (["--aggregator", "krum", "--f", "1"], "krum needs n >= 2f + 3 inputs: degree 2 + self = 3"),
])
def test_sim_flags_fail_with_one_line(tmp_path, args, needle) -> None:
    from typer.testing import CliRunner

    from p2pfl.cli import app

    r = CliRunner().invoke(app, ["sim", *args, "--out", str(tmp_path)], env={"COLUMNS": "300"})
    assert r.exit_code == 2
    assert needle in " ".join(r.output.split())


def test_sim_flags_run_an_attack(tmp_path) -> None:
    from typer.testing import CliRunner

    from p2pfl.cli import app

    r = CliRunner().invoke(app, ["sim", "--peers", "6", "--rounds", "1", "--topology", "full", "--aggregator",
                                 "median", "--f", "1", "--attack", "ipm", "--attackers", "2,4", "--out", str(tmp_path)],
                           env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    import json
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["byzantine"] == [2, 4] and summary["attack"] == "ipm"
    assert "2 ipm attackers excluded" in r.output
