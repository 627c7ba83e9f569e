"""The procs engine: a scenario as real `p2pfl peer` processes on 127.0.0.1, with scripted faults.

The fast tests check fault specs and the files the engine hands its peers. The slow ones run real
processes (loopback only); `procs.run` stops every process it started by PID in its own finally,
and `timeout_s` bounds each run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.peers import settings as peer_settings
from p2pfl.sim import engine, faults, fleet, procs
from p2pfl.sim import scenario as scenarios

ROOT = Path(__file__).parents[2]
# small and quick: 20 local steps a round; a 4 s step deadline keeps a dead neighbour cheap
FAST = dict(peers=4, topology="ring", dataset="digits", local_steps=20, step_timeout_s=4.0, engine="procs")


@pytest.mark.parametrize("values, needle", [
    ({"kill": [{"peer": 3, "at_round": 1, "restart": 2}]}, "kill[0]: unknown key 'restart'"),
    ({"kill": [{"peer": 4, "at_round": 1}]}, "kill[0].peer: must be a peer index in [0, 4)"),
    ({"kill": [{"peer": -1, "at_round": 1}]}, "kill[0].peer"),
    ({"kill": [{"peer": 1, "at_round": 3}]}, "kill[0].at_round: must be in [0, rounds) = [0, 3)"),
    ({"kill": [{"peer": 1}]}, "kill[0]: missing key 'at_round'"),
    ({"kill": [{"peer": 1, "at_round": 1, "restart_after_s": -1}]}, "kill[0].restart_after_s: must be >= 0"),
    ({"kill": [{"peer": 1, "at_round": 1}, {"peer": 1, "at_round": 2}]}, "kill[1]: peer 1 is killed again"),
    ({"kill": [{"peer": "3", "at_round": 1}]}, "kill[0].peer: expected an integer"),
    ({"kill": 3}, "kill: expected a table or a list of tables"),
    ({"delay": {"peer": 2, "ms": -5}}, "delay[0].ms: must be >= 0"),
    ({"delay": {"peer": 2}}, "delay[0]: missing key 'ms'"),
    ({"delay": [{"peer": 2, "ms": 5}, {"peer": 2, "ms": 9}]}, "delay[1].peer: peer 2 already has a delay"),
    ({"engine": "inproc", "kill": [{"peer": 1, "at_round": 1}]}, "kill: faults run on real processes only"),
    ({"engine": "inproc", "delay": {"peer": 1, "ms": 10}}, "delay: faults run on real processes only"),
    ({"attack": "sign_flip", "attackers": [4]}, "attackers: peer indices must be integers in [0, 4)"),
    ({"attack": "nope", "attackers": [1]}, "attack: unknown value 'nope'"),
    ({"engine": "threads"}, "engine: unknown value 'threads'; allowed: inproc, procs"),
])
def test_a_bad_fault_spec_is_a_config_error_naming_the_key(values, needle):
    with pytest.raises(ConfigError) as e:
        scenarios.build({**FAST, "rounds": 3, **values})
    assert needle in str(e.value)


def test_fault_tables_from_toml(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('engine = "procs"\npeers = 8\nrounds = 10\n'
                 'kill = [{peer = 3, at_round = 5, restart_after_s = 10}, {peer = 3, at_round = 8}]\n'
                 'delay = {peer = 2, ms = 200}\n')
    s = scenarios.load(f)
    assert faults.kills(s) == [faults.Kill(3, 5, 10.0), faults.Kill(3, 8, None)]
    assert faults.delays(s) == {2: 200.0}
    assert s.to_dict()["delay"] == [{"peer": 2, "ms": 200}]


def test_the_peer_toml_is_what_p2pfl_peer_loads(tmp_path):
    s = scenarios.build({**FAST, "rounds": 3, "algorithm": "dfedsam", "hidden": [32, 16], "latency_ms": 5,
                         "aggregator": "centered_clip", "aggregator_params": {"tau": 2.5, "iterations": 3}, "f": 1})
    (tmp_path / "peer.toml").write_text(fleet.toml_text(fleet.peer_settings(s)))
    p = peer_settings.load(tmp_path / "peer.toml", {})
    assert (p.rounds, p.local_steps, p.step_timeout, p.hidden, p.local_update()["rho"], p.delay_ms, p.device,
            p.threads) == \
        (3, 20, 4.0, (32, 16), 0.05, 5.0, "cpu", 1)
    # the rule's parameters travel too (procs used to refuse them), and so does the algorithm
    assert (p.aggregator, p.aggregator_params, p.f, p.algorithm) == ("centered_clip", {"tau": 2.5, "iterations": 3}, 1,
                                                                     "dfedsam")
    assert p.train_config() == s.train_config()


def test_every_shared_key_reaches_the_peers_unchanged(tmp_path):
    """Scenario and PeerSettings share one schema (p2pfl.settings.LearningSettings); procs hands the
    scenario's values through as given, except the attack, which only attackers get (as flags)."""
    values = {"rounds": 7, "dataset": "synthetic", "partition": "classes:2", "seed": 11, "model": "cnn",
              "hidden": [5, 3], "algorithm": "dfedavgm", "lr": 0.05, "lr_decay": 0.99, "momentum": 0.5,
              "weight_decay": 1e-4, "batch_size": 7, "local_epochs": 1.5, "local_steps": 3, "rho": 0.01,
              "gossip_steps": 2, "aggregator": "trimmed_mean", "f": 1, "eval_every": 2,
              "plugins": ["p2pfl.algorithms"]}
    s = scenarios.build({**FAST, **values})
    (tmp_path / "peer.toml").write_text(fleet.toml_text(fleet.peer_settings(s)))
    p = peer_settings.load(tmp_path / "peer.toml", {})
    assert {k: v for k, v in p.shared().items() if k not in ("attack", "attack_params")} == \
        {k: v for k, v in s.shared().items() if k not in ("attack", "attack_params")}
    assert set(values) <= set(s.shared())


def test_attackers_get_the_attack_flags_and_know_their_colluders(tmp_path):
    from p2pfl.sim.cast import choose_attackers
    from p2pfl.sim.engine import Setup

    s = scenarios.build({**FAST, "rounds": 3, "topology": "full", "aggregator": "median", "f": 1,
                         "attack": "mimic", "attackers": [1, 3], "attack_params": {"peer": 0}})
    setup = Setup.build(s)
    ids = [ident.peer_id for ident in setup.identities]
    byz = choose_attackers(s.attackers, s.peers, s.seed)
    peers = procs._peers(s, tmp_path, setup, [1000 + i for i in range(4)], byz)
    assert [p.byzantine for p in peers] == [False, True, False, True]
    argv = peers[1].argv
    assert argv[argv.index("--attack") + 1] == "mimic" and argv[argv.index("--colluders") + 1] == ids[3]
    assert json.loads(argv[argv.index("--attack-params") + 1]) == {"peer": ids[0]}   # an index becomes an ID
    assert "--attack" not in peers[0].argv and "--attack" not in peers[2].argv
    # what p2pfl peer makes of it: the shared peer.toml plus the attacker's flags
    s1 = peer_settings.load(tmp_path / "peer.toml", {"attack": "mimic", "attack_params": {"peer": ids[0]},
                                                     "colluders": (ids[3],)})
    assert (s1.attack, s1.aggregator, s1.f) == ("mimic", "median", 1)


def test_a_restarted_attacker_starts_fresh_and_an_honest_peer_resumes(tmp_path):
    """A killed attacker comes back without --resume (it keeps no checkpoint, and `p2pfl peer` refuses
    resume with an attack), even if a checkpoint.pt lies in its folder; an honest peer resumes from its own."""
    from p2pfl.files import MetricsLog
    from p2pfl.sim.engine import Setup

    s = scenarios.build({**FAST, "rounds": 3, "topology": "full", "aggregator": "median", "f": 1,
                         "attack": "alie", "attackers": [1], "kill": [{"peer": 1, "at_round": 0, "restart_after_s": 1}]})
    peers = procs._peers(s, tmp_path, Setup.build(s), [1000 + i for i in range(4)], [1])
    log = MetricsLog(tmp_path / "metrics.jsonl")
    runner = fleet.Fleet(s, tmp_path, peers, log, None)
    for p in peers:
        (p.dir / "checkpoint.pt").write_bytes(b"")     # as if each had written one
    first = runner.command(peers[1], restart=False)
    assert "--attack" in first and "--resume" not in first and first[first.index("--min-neighbors") + 1] == "3"
    again = runner.command(peers[1], restart=True)
    assert "--resume" not in again and not runner.resumes(peers[1])
    assert again[:len(peers[1].argv)] == peers[1].argv and "--attack" in again     # still the attacker
    assert again[again.index("--min-neighbors") + 1] == "0"           # no neighbour is up in this test
    honest = runner.command(peers[0], restart=True)
    assert honest[honest.index("--resume") + 1] == str(peers[0].dir) and runner.resumes(peers[0])
    # what `p2pfl peer` makes of the attacker's restart: accepted (resume with an attack is refused)
    flags = {"attack": "alie", "colluders": (), "resume": None}
    assert peer_settings.load(tmp_path / "peer.toml", flags).attack == "alie"
    with pytest.raises(ConfigError, match="resume: an attacker"):
        peer_settings.load(tmp_path / "peer.toml", {**flags, "resume": str(peers[1].dir)})
    log.close()


def test_a_torn_line_left_by_sigkill_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = fleet.Tail(path)
    assert tail.events() == []
    path.write_text('{"kind": "round", "round": 0}\n{"kind": "ro')
    assert tail.events() == [{"kind": "round", "round": 0}]
    tail.drop_partial()                      # the writer was killed mid-line
    with open(path, "a") as fh:              # its restart appends after the torn bytes
        fh.write('{"kind": "start", "round": 1}\n')
    assert tail.events() == [{"kind": "start", "round": 1}]


def test_cli_rejects_a_bad_engine_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "p2pfl.cli", "sim", "--engine", "threads", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "engine: unknown value 'threads'" in r.stderr and "Traceback" not in r.stderr


def _events(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_four_peer_ring_finishes_with_the_inproc_summary(tmp_path):
    s = scenarios.build({**FAST, "name": "procs-ring4", "rounds": 3})
    summary = procs.run(s, tmp_path / "procs", timeout_s=150)
    reference = engine.run(scenarios.build({**FAST, "name": "procs-ring4", "rounds": 3, "engine": "inproc"}),
                           tmp_path / "inproc")
    missing = sorted(set(reference) - set(summary))
    assert not missing, f"procs summary.json lacks the in-process engine's keys {missing}"
    assert json.loads((tmp_path / "procs" / "summary.json").read_text()) == summary
    assert summary["engine"] == "procs" and summary["rounds_done"] == [3, 3, 3, 3]
    assert summary["honest_accuracy"]["min"] > 0.3          # 10 classes: chance is 0.1
    assert summary["centralized_accuracy"] > 0.3 and summary["bytes_sent"] > 0 and summary["rejected"] == {}
    assert (tmp_path / "procs" / "accuracy.png").stat().st_size > 0
    events = _events(tmp_path / "procs")
    assert events[0]["kind"] == "run" and events[0]["engine"] == "procs"
    rounds = [e for e in events if e["kind"] == "round"]
    assert sorted((e["peer"], e["round"]) for e in rounds) == [(i, t) for i in range(4) for t in range(3)]
    if all(not e["missing"] for e in rounds):
        # every neighbour arrived in every step: same shards, initial model, batch order and
        # Metropolis-Hastings weights as the in-process engine, so the same numbers
        assert summary["per_peer_accuracy"] == pytest.approx(reference["per_peer_accuracy"], abs=1e-6)
        assert summary["consensus_distance"] == pytest.approx(reference["consensus_distance"], rel=1e-4)


@pytest.mark.slow
def test_a_killed_peer_resumes_from_its_checkpoint_and_finishes(tmp_path):
    rounds, at = 6, 1
    s = scenarios.build({**FAST, "name": "procs-kill", "rounds": rounds, "centralized": False,
                         "kill": [{"peer": 3, "at_round": at, "restart_after_s": 1}], "delay": {"peer": 2, "ms": 20}})
    summary = procs.run(s, tmp_path, timeout_s=200)
    assert summary["rounds_done"] == [rounds] * 4
    assert [f["fault"] for f in summary["faults"]] == ["kill", "restart"]
    assert summary["faults"][1]["from_checkpoint"]
    mine = [e for e in _events(tmp_path) if e.get("peer") == 3]
    starts = [k for k, e in enumerate(mine) if e["kind"] == "start"]
    assert len(starts) == 2
    resumed = mine[starts[1]]["resumed_from"]
    before = [e["round"] for e in mine[:starts[1]] if e["kind"] == "round"]
    after = [e["round"] for e in mine[starts[1]:] if e["kind"] == "round"]
    # the checkpoint of its last reported round (or of the one before: killed before it was written)
    assert before[-1] >= at and resumed in (before[-1], before[-1] + 1)
    assert after and after[0] >= resumed and after[-1] == rounds - 1   # continues from there (or caught up)
    assert torch.load(tmp_path / "peer-3" / "checkpoint.pt", weights_only=True)["round"] == rounds
    final = json.loads((tmp_path / "peer-3" / "summary.json").read_text())
    assert final["resumed_from"] == resumed and final["rounds_done"] == rounds
    assert summary["honest_accuracy"]["min"] > 0.3


@pytest.mark.slow
def test_a_sign_flip_peer_process_is_byzantine_and_median_keeps_the_honest_ones_learning(tmp_path):
    # full graph on 4 peers: degree 3, n = 4 inputs, median tolerates f = 1
    s = scenarios.build({**FAST, "name": "procs-byz", "rounds": 3, "topology": "full", "aggregator": "median",
                         "f": 1, "attack": "sign_flip", "attack_params": {"scale": 5.0}, "attackers": [2],
                         "centralized": False})
    summary = procs.run(s, tmp_path, timeout_s=90)
    assert summary["byzantine"] == [2] and summary["attackers"] == 1 and summary["attack"] == "sign_flip"
    assert summary["rounds_done"] == [3, 3, 3, 3]        # honest peers (and the attacker) finish every round
    assert summary["per_peer_accuracy"][2] is None        # the attacker is not evaluated
    honest = [summary["per_peer_accuracy"][i] for i in (0, 1, 3)]
    assert all(a is not None for a in honest)
    assert summary["honest_accuracy"]["mean"] == pytest.approx(sum(honest) / 3)
    assert summary["honest_accuracy"]["min"] == min(honest) > 0.3
    assert summary["byzantine_neighbors"]["max"] == 1
    run_event = _events(tmp_path)[0]
    assert (run_event["honest"], run_event["byzantine"], run_event["attack"]) == ([0, 1, 3], [2], "sign_flip")
    liar = json.loads((tmp_path / "peer-2" / "summary.json").read_text())
    assert liar["attack"] == "sign_flip" and liar["byzantine"] is True and liar["accuracy"] is None
    assert not (tmp_path / "peer-2" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "peer-0" / "summary.json").read_text())["byzantine"] is False
    # the honest peers did receive the liar's frames (it sent, they aggregated them away)
    assert all(e["received"] == 3 for e in _events(tmp_path) if e["kind"] == "round" and e["peer"] != 2)


@pytest.mark.slow
def test_an_alie_peer_process_crafts_from_its_neighbours_frames_and_trimmed_mean_holds(tmp_path):
    # the local-view path over libp2p: the attacker waits in prepare_step for its honest neighbours'
    # frames of each step, crafts mu - z*sigma from them and sends that. Full graph on 5 peers: each
    # honest peer has n = 5 inputs (>= 2f + 3 for f = 1), one of them the liar's.
    s = scenarios.build({**FAST, "name": "procs-alie", "peers": 5, "rounds": 3, "topology": "full",
                         "aggregator": "trimmed_mean", "f": 1, "attack": "alie", "attackers": [3],
                         "centralized": False})
    summary = procs.run(s, tmp_path, timeout_s=120)
    assert summary["byzantine"] == [3] and summary["attack"] == "alie"
    assert summary["rounds_done"] == [3] * 5                # every process finishes every round
    liar = json.loads((tmp_path / "peer-3" / "summary.json").read_text())
    assert liar["attack"] == "alie" and liar["byzantine"] is True and liar["rounds_done"] == 3
    assert liar["frames_sent"] > 0
    events = _events(tmp_path)
    crafted = [e for e in events if e["kind"] == "round" and e["peer"] == 3]
    assert [e["round"] for e in crafted] == [0, 1, 2]
    # every round it crafted vectors for its 4 targets from the honest vectors it had received
    assert all(e["crafted"] > 0 and e["crafted_from"] > 0 for e in crafted), crafted
    assert max(e["crafted_from"] for e in crafted) == 4      # all four honest neighbours, in some round
    honest = [e for e in events if e["kind"] == "round" and e["peer"] != 3]
    assert honest and all("crafted" not in e for e in honest)
    assert all(e["received"] == 4 for e in honest)          # the liar's crafted frames came in time, every step
    assert summary["honest_accuracy"]["min"] > 0.3          # 10 classes: chance is 0.1


@pytest.mark.slow
def test_honest_neighbours_remove_a_sign_flipper_in_real_processes(tmp_path):
    """4 `p2pfl peer` processes on a loopback ring, peer 1 flips signs: both its honest neighbours
    remove it on their reputations, tell it (it unlinks them too), stop waiting for its frames, and
    fill the freed slot with each other (the only other honest peer that has a free slot too; they
    learn of each other by peer exchange). min_degree 1 lets a ring peer drop to one link meanwhile.
    The new link starts at a round both agreed on, so no honest peer ever misses an honest frame."""
    rounds = 30   # the link starts LINK_LEAD rounds after the later remover's round, once both have dialled
    s = scenarios.build({**FAST, "name": "procs-rep", "rounds": rounds, "centralized": False, "attack": "sign_flip",
                         "attackers": [1], "reputation": True,
                         "reputation_params": {"alpha": 0.5, "min_degree": 1}})
    summary = procs.run(s, tmp_path, timeout_s=200)
    assert summary["rounds_done"] == [rounds] * 4
    events = _events(tmp_path)
    ids = events[0]["peer_ids"]
    rounds = [e for e in events if e["kind"] == "round"]
    removed_by = {e["peer"] for e in rounds if ids[1] in e.get("removed", [])}
    assert removed_by == {0, 2}
    for i, other in ((0, 2), (2, 0)):   # the attacker is gone for good, replaced by the other remover
        mine = sorted((e for e in rounds if e["peer"] == i), key=lambda e: e["round"])
        gone = next(k for k, e in enumerate(mine) if ids[1] in e.get("removed", []))
        assert all(ids[1] not in e["reputation"] for e in mine[gone + 1:])
        assert set(mine[-1]["reputation"]) == {ids[3], ids[other]} and mine[-1]["neighbors"] == 2
    assert not any(ids[1] in e.get("removed", []) for e in rounds if e["peer"] == 3)
    honest = {ids[0], ids[2], ids[3]}
    assert not [(e["peer"], e["round"], e["missing"]) for e in rounds if e["peer"] != 1 and set(e["missing"]) & honest]
