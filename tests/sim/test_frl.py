"""FRL end to end: parameters and attacks checked at config time, rankings on the wire (validated at the
door), the in-process engine with and without rank reversal, and real peer processes (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from p2pfl import algorithms
from p2pfl.algorithms import Context, GossipConfig
from p2pfl.algorithms.frl import RankAttacker
from p2pfl.errors import ConfigError
from p2pfl.gossip import codec
from p2pfl.learn.models import make_model
from p2pfl.learn.train import TrainConfig
from p2pfl.peers import settings as peer_settings
from p2pfl.peers.libp2p.control import config_digest
from p2pfl.peers.memory import MemoryNetwork
from p2pfl.peers.peer import PeerConfig
from p2pfl.robust.ranks import ranking, reversed_vote
from p2pfl.sim import engine, procs
from p2pfl.sim import scenario as scenarios
from p2pfl.testing.transports import make_peers, run_peers

SMALL = dict(peers=6, topology="ring", dataset="digits", partition="dirichlet:1.0", rounds=4, local_steps=15,
             batch_size=8, algorithm="frl", centralized=False)


@pytest.mark.parametrize("values, needle", [
    ({"algorithm_params": {"sparsity": 0}}, "algorithm_params (frl): sparsity: invalid value 0"),
    ({"algorithm_params": {"seed": -1}}, "seed must be an integer >= 0"),
    ({"algorithm_params": {"k": 0.5}}, "algorithm_params.k: unknown key for algorithm 'frl'"),
    ({"attack": "alie", "attackers": [1]}, "attack: 'alie' does not apply to algorithm 'frl'; allowed: rank_reversal"),
    ({"algorithm": "dfedavg", "attack": "rank_reversal", "attackers": [1]},
     "attack: 'rank_reversal' does not apply to algorithm 'dfedavg'"),
])
def test_config_errors_name_the_key(values, needle):
    with pytest.raises(ConfigError) as e:
        scenarios.build({**SMALL, **values})
    assert needle in str(e.value)


def test_a_real_peer_checks_the_attack_against_the_algorithm_and_hashes_seed_and_sparsity():
    with pytest.raises(ConfigError, match="'rank_reversal' does not apply to algorithm 'dfedavg'"):
        peer_settings.load(None, {"attack": "rank_reversal"})

    def digest(params):
        return config_digest(peer_settings.load(None, {"algorithm": "frl", "algorithm_params": params})
                             .protocol_settings())

    base = digest({"seed": 1, "sparsity": 0.5})
    assert base == digest({"sparsity": 0.5, "seed": 1})
    assert len({base, digest({"seed": 2, "sparsity": 0.5}), digest({"seed": 1, "sparsity": 0.4})}) == 3


def _frl(model, seed=0, aggregator="mixing"):
    x = torch.randn(32, 64)
    ctx = Context(peer_id="p", model=model, train_data=(x, torch.zeros(32, dtype=torch.long)),
                  train=TrainConfig(local_steps=1, batch_size=8), gossip=GossipConfig(aggregator=aggregator),
                  neighbors={"a": 0.3, "b": 0.3}, seed=seed)
    return algorithms.build("frl", ctx, {"seed": 5})


def test_rankings_travel_as_u16_or_u32_by_layer_size_and_the_rule_is_the_vote():
    small = _frl(make_model("mlp", (64,), 10, hidden=(64,)))
    spec = small.payloads()["ranks"]
    assert (spec.dtype, spec.count, spec.max_abs) == ("u16", 64 * 64 + 64 * 10, 64 * 64 - 1)
    big = _frl(make_model("mlp", (64,), 10, hidden=(1024,)))       # 65,536 edges in the first layer
    assert big.payloads()["ranks"].dtype == "u32"
    with pytest.raises(ConfigError, match="aggregator: frl aggregates by its own rank vote"):
        _frl(make_model("mlp", (64,), 10), aggregator="median")
    # the payload's validator: each layer's slice must be a permutation of its own edge ids
    ok = torch.cat(small.ranks).numpy()
    assert small.validate(ok) is None
    assert small.validate(np.concatenate([ok[4096:], ok[:4096]])) is not None
    assert "layer 0" in small.validate(np.zeros_like(ok))


def test_the_rank_reversal_attacker_sends_the_reverse_of_the_honest_vote():
    frl = _frl(make_model("mlp", (64,), 10, hidden=(16,)))
    frl.local_update(0)
    attacker = frl.attacker("rank_reversal", {}, seed=0)
    assert isinstance(attacker, RankAttacker)
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(frl.flat.buffer.numel(), generator=g)     # what the omniscient board holds
    ranks = torch.cat([torch.randperm(n, generator=g) for n in frl.sizes])   # what a received frame holds
    views = {"a": (["a", "b", "c"], {}, 0.0, 4, 1), "c": (["c"], {}, 0.0, 2, 1)}
    attacker.craft(frl.x, ["a", "c", "z"], ["a", "c"], views=views, got={"a": scores, "b": ranks})
    sent = attacker.outgoing(0, 0, "a")["ranks"]
    voters = [frl.ranks, frl.as_rankings(scores), frl.as_rankings(ranks)]
    expected = torch.cat([reversed_vote([v[layer] for v in voters]) for layer in range(len(frl.sizes))])
    assert torch.equal(sent, expected)
    assert torch.equal(attacker.outgoing(0, 0, "c")["ranks"], torch.cat([r.flip(0) for r in frl.ranks]))
    assert torch.equal(attacker.outgoing(0, 0, "z")["ranks"], frl.wire())    # a colluder gets the honest one
    assert attacker.take_tally() == {"crafted": 2, "crafted_from": 2}
    assert torch.equal(frl.as_rankings(scores)[0], ranking(scores[:64 * 16]))
    with pytest.raises(ConfigError, match="'sign_flip' does not apply to frl"):
        frl.attacker("sign_flip", {}, seed=0)


def test_a_frame_that_is_not_a_permutation_per_layer_is_refused_and_counted():
    config = PeerConfig(train=TrainConfig(lr=0.1, local_steps=1, batch_size=8), step_timeout_s=5.0, algorithm="frl")
    network = MemoryNetwork(wire=True)
    peers = make_peers(3, network, config=config)
    honest, liar = peers[:2], peers[2]
    n = honest[0].payloads["ranks"].count            # tiny_model: 6 -> 8 -> 2, layers of 48 and 16 edges
    assert n == 64
    whole = np.arange(n, dtype=np.uint16)[::-1].copy()        # all n ids: 63 is beyond the largest layer
    shifted = np.concatenate([np.arange(48), np.arange(16) + 32]).astype(np.uint16)   # in range, not per layer
    for p in honest:
        for arr in (np.zeros(n, np.uint16), shifted, whole):
            data = b"".join(codec.encode(liar.transport.identity, kind="ranks", round=0, step=0, schema=liar.schema,
                                         payload=arr, dtype="u16"))
            p.transport._send.send_nowait((0.0, liar.id, data))
    events: list[dict] = []
    for p in honest:
        p.on_event = events.append
    run_peers(honest, 1)
    assert all(p.rejections() == {"invalid_payload": 2, "out_of_range": 1} for p in honest)
    assert sorted(e["received"] for e in events) == [1, 1]


def test_frl_runs_in_process_on_half_the_bytes_of_float_gossip(tmp_path):
    summary = engine.run(scenarios.build(SMALL), tmp_path / "frl")
    dense = engine.run(scenarios.build({**SMALL, "algorithm": "dfedavg", "lr": 0.1}), tmp_path / "dfedavg")
    assert summary["algorithm"] == "frl" and summary["rejected"] == {}
    # 4,736 edges as u16 against 4,810 float32 parameters, to 2 neighbours a round
    assert 2 * 2 * 4736 <= summary["bytes_per_peer_round"] < 0.55 * dense["bytes_per_peer_round"]
    assert summary["honest_accuracy"]["min"] > 0.3     # chance is 0.1
    rounds = [json.loads(line) for line in (tmp_path / "frl" / "metrics.jsonl").read_text().splitlines()]
    rounds = [e for e in rounds if e["kind"] == "round"]
    for peer in range(SMALL["peers"]):
        mine = [e for e in rounds if e["peer"] == peer]
        assert sum(e["bytes_round"] for e in mine) == mine[-1]["bytes_sent"]
    assert (tmp_path / "frl" / "accuracy.png").exists()


def test_rank_reversal_in_process_crafts_valid_rankings_from_the_neighbourhood(tmp_path):
    s = scenarios.build({**SMALL, "peers": 8, "topology": "regular:4", "rounds": 3, "attack": "rank_reversal",
                         "attackers": [2]})
    summary = engine.run(s, tmp_path)
    assert summary["attackers"] == 1 and summary["rejected"] == {}     # its rankings pass the door
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    liar = [e for e in events if e["kind"] == "round" and e["peer"] == 2]
    # each round: one crafted ranking per neighbour (4), from the 4 neighbours' neighbourhoods on the board
    assert [e["crafted"] for e in liar] == [4, 4, 4] and all(e["crafted_from"] >= 4 for e in liar)
    assert summary["honest_accuracy"]["mean"] > 0.2


@pytest.mark.slow
def test_frl_with_a_rank_reversal_peer_process_over_libp2p(tmp_path):
    # the local-view attacker: it votes the rankings its neighbours send it (over the wire) with its own
    s = scenarios.build({**SMALL, "name": "procs-frl", "engine": "procs", "peers": 4, "rounds": 3,
                         "topology": "full", "step_timeout_s": 4.0, "attack": "rank_reversal", "attackers": [3]})
    summary = procs.run(s, tmp_path, timeout_s=150)
    assert summary["rounds_done"] == [3] * 4 and summary["byzantine"] == [3]
    assert summary["rejected"] == {} and summary["bytes_per_peer_round"] > 0
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    liar = [e for e in events if e["kind"] == "round" and e["peer"] == 3]
    assert len(liar) == 3 and all(e["crafted"] == 3 for e in liar)
    assert max(e["crafted_from"] for e in liar) == 3
    honest = [e for e in events if e["kind"] == "round" and e["peer"] != 3]
    assert honest and all(e["received"] == 3 for e in honest)
    assert all(a is not None and a > 0.1 for a in summary["per_peer_accuracy"][:3])


def test_the_benchmark_prints_the_issue_keys_and_writes_its_report(tmp_path, monkeypatch):
    """bench/frl.py stays runnable: FRL and clean DFedAvg on 8 peers for 2 rounds, in this process."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_frl", Path(__file__).resolve().parents[2] / "bench" / "frl.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "BASE", {**bench.BASE, "peers": 8, "topology": "regular:4", "local_epochs": 0.5})
    monkeypatch.setattr(bench, "SETUPS", {k: v for k, v in bench.SETUPS.items() if k[1] in ("rank_vote", "mixing")})
    todo = bench.jobs((0.25,), (0,), 2)
    rows = bench.cells({tuple(j): bench.run_one(*j) for j in todo}, (0.25,), (0,), 2)
    assert [(r["algorithm"], r["rule"], r["attack"], r["fraction"]) for r in rows] == \
        [("frl", "rank_vote", "none", 0.0), ("frl", "rank_vote", "rank_reversal", 0.25), ("dfedavg", "mixing", "none", 0.0)]
    keys = {"algorithm", "rule", "attack", "fraction", "honest_accuracy_mean", "honest_accuracy_min", "bytes_per_peer_round"}
    assert all(keys <= set(r) for r in rows) and rows[1]["attackers"] == 2
    assert rows[0]["bytes_per_peer_round"] < rows[2]["bytes_per_peer_round"]
    bench.plot(rows, tmp_path / "frl.png")
    text = bench.markdown(rows, "python bench/frl.py", 1.0, "frl.png", "\nkept\n")
    assert "| frl | rank_vote | rank_reversal | 25% |" in text and text.endswith("kept\n")
    assert (tmp_path / "frl.png").stat().st_size > 0
