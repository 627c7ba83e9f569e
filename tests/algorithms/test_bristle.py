"""Bristle: the prioritizer and the integrator on hand-computed cases, the head-only payload, its
parameters, and honest peers that keep their accuracy next to Byzantine ones (in-process sim)."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import torch
import trio

from p2pfl import algorithms
from p2pfl.algorithms.base import Context, GossipConfig
from p2pfl.algorithms.bristle import Bristle, BristleParams, integrate, prioritize, recalls
from p2pfl.errors import ConfigError
from p2pfl.learn import backbone
from p2pfl.learn.models import ParamLayout, make_model
from p2pfl.learn.train import TrainConfig
from p2pfl.peers.libp2p import HelloRefused
from p2pfl.peers.settings import PeerSettings
from p2pfl.sim import engine, fleet, procs
from p2pfl.sim import scenario as scenarios
from p2pfl.testing.transports import LIMIT_S, started
from p2pfl.testing.transports import libp2p_transport as transport


def weight(score: float) -> float:
    """The authors' weight map, written out: max(0, 10 sigmoid(score / 100) - 4)."""
    return max(0.0, 10 / (1 + math.exp(-score / 100)) - 4)


def test_prioritizer_keeps_the_closest_and_explores_the_rest_at_random():
    own = torch.zeros(2)
    received = {p: torch.tensor([d, 0.0]) for p, d in {"a": 1.0, "b": 3.0, "c": 2.0, "d": 5.0, "e": 4.0}.items()}
    p = BristleParams(n_exploit=2, n_explore=2)
    exploit, explore, heads = prioritize(own, received, {}, p, torch.Generator().manual_seed(1))
    assert exploit == ["a", "c"] and len(explore) == 2 and set(explore) <= {"b", "d", "e"}
    again = prioritize(own, received, {}, p, torch.Generator().manual_seed(1))
    assert again[1] == explore                                   # seeded: the same draw
    assert set(heads) == set(received)


def test_prioritizer_tops_up_from_the_newest_history_of_peers_that_sent_nothing():
    own = torch.zeros(1)
    history = OrderedDict((p, torch.tensor([v])) for p, v in [("x", 1.0), ("y", 2.0), ("a", 9.0), ("z", 3.0)])
    exploit, explore, heads = prioritize(own, {"a": torch.tensor([7.0])}, history, BristleParams(n_exploit=3),
                                         torch.Generator())
    assert set(heads) == {"a", "z", "y"}                          # x is the oldest; a's fresh head wins over its old one
    assert float(heads["a"][0]) == 7.0
    assert exploit == ["y", "z", "a"] and explore == []           # by distance 2, 3, 7


def test_recall_per_class_is_one_matmul_over_cached_features():
    features = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [2.0, 1.0], [-3.0, 1.0]])   # (n, D+1): last column is the bias
    labels = torch.tensor([1, 0, 1, 0])
    right = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])              # class 1 for positive features
    always_one = torch.tensor([[0.0, 0.0], [0.0, 10.0]])
    got = recalls(torch.stack([right, -right, always_one]), features, labels, torch.tensor([0, 1]))
    assert got.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]


def test_a_better_candidate_gets_the_authors_weight_and_foreign_classes_their_summed_score():
    own, head = torch.zeros(3, 2), torch.ones(1, 3, 2)           # 3 classes; classes 0 and 1 are known
    new, w_known, w_foreign = integrate(own, head, torch.tensor([0.5, 0.5]), torch.tensor([[1.0, 1.0]]),
                                        torch.tensor([0, 1]), BristleParams())
    per_class = weight(5 ** 3.5)                                 # diff 10 * 0.5 = 5, better: 5^(3 + 0.5); cert 1 - 0
    per_peer = weight(2 * 5 ** 3.5)
    assert w_known[0].tolist() == pytest.approx([per_class, per_class])
    assert w_foreign.tolist() == pytest.approx([per_peer])
    expected = torch.tensor([per_class / (1 + per_class)] * 2 + [per_peer / (1 + per_peer)])
    assert torch.allclose(new, expected[:, None].expand(3, 2).float())


def test_a_worse_class_is_weighted_zero_and_certainty_is_mean_minus_std():
    own, head = torch.zeros(2, 1), torch.ones(1, 2, 1)
    _, w_known, w_foreign = integrate(own, head, torch.tensor([1.0, 1.0]), torch.tensor([[0.9, 0.5]]),
                                      torch.tensor([0, 1]), BristleParams())
    cert = 0.7 - 0.2                                              # mean 0.7, population std 0.2
    # class 0: diff 1, worse: -(1^5); class 1: diff 5: -(5^5) bounded at -100, weight 0
    assert w_known[0].tolist() == pytest.approx([weight(-1.0) * cert, 0.0])
    assert w_foreign.tolist() == pytest.approx([weight(-1.0 - 5 ** 5) * cert]) and w_foreign.item() == 0.0


def test_an_equal_candidate_weighs_its_certainty_and_later_worse_ones_pay_the_sequential_penalty():
    own = torch.zeros(1, 1)
    _, w, _ = integrate(own, torch.ones(1, 1, 1), torch.tensor([0.6]), torch.tensor([[0.6]]), torch.tensor([0]),
                        BristleParams())
    assert w.item() == pytest.approx(0.6)                         # 1 * cert
    _, w, _ = integrate(own, torch.ones(3, 1, 1), torch.tensor([1.0]), torch.tensor([[0.9], [0.9], [0.9]]),
                        torch.tensor([0]), BristleParams())
    # each: diff 1, score -(1^5); the k-th also pays 2 * (1 - 0.9) = 0.2 for each candidate before it
    assert w[:, 0].tolist() == pytest.approx([0.9 * weight(-1.0), 0.9 * weight(-1.2), 0.9 * weight(-1.4)], rel=1e-5)
    assert w[0, 0] > w[1, 0] > w[2, 0] > 0


def test_with_overlap_recall_a_head_is_judged_on_the_classes_it_knows_and_teaches_the_foreign_ones():
    own, head = torch.zeros(3, 1), torch.ones(1, 3, 1)            # classes 0, 1 known; 2 foreign
    args = (own, head, torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 0.0]]), torch.tensor([0, 1]))
    new, w_known, w_foreign = integrate(*args, BristleParams(overlap_recall=None))
    assert w_known.sum() == 0 and w_foreign.item() == 0           # all classes judged: cert = 0.5 - 0.5
    assert torch.equal(new, own)
    new, w_known, w_foreign = integrate(*args, BristleParams(overlap_recall=0.5))
    # judged on class 0 alone: diff 0, score 0, weight 10 sigmoid(0) - 4 = 1, cert 1 - 0
    assert w_known[0].tolist() == [1.0, 0.0] and w_foreign.item() == 1.0
    assert new[:, 0].tolist() == [0.5, 0.0, 0.5]


def _context(model, n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()          # 4 classes
    return Context(peer_id="me", model=model, train_data=(x, y), train=TrainConfig(lr=0.5, local_steps=20),
                   gossip=GossipConfig(), neighbors={"a": 0.3, "b": 0.3}, seed=seed, num_classes=4)


def _head_only(seed=0):
    model = make_model("mlp", (6,), 4, hidden=(8,), seed=seed)
    for p in model[1].parameters():
        p.requires_grad_(False)
    return model


def test_bristle_gossips_the_head_only_and_refuses_a_model_without_a_frozen_backbone():
    algo = algorithms.build("bristle", _context(_head_only()))
    assert isinstance(algo, Bristle)
    assert algo.payloads()["model"].count == 4 * 8 + 4 == ParamLayout.of(algo.ctx.model).size
    # the local test split (<= 10 a class, at most half of it) is never trained on
    assert len(algo.labels) + len(algo.trainer.x) == 60 and set(algo.known.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="output layer only"):
        algorithms.build("bristle", _context(make_model("mlp", (6,), 4, hidden=(8,))))


def test_with_public_samples_bristle_tests_on_them_trains_on_all_its_data_and_knows_every_class():
    g = torch.Generator().manual_seed(7)
    rx = torch.randn(200, 6, generator=g)
    ry = (rx[:, 0] > 0).long() + 2 * (rx[:, 1] > 0).long()
    local = _context(_head_only())
    y = local.train_data[1]
    local.train_data = (local.train_data[0][y < 2], y[y < 2])   # this peer holds classes 0 and 1 only
    algo = algorithms.build("bristle", Context(**{**vars(local), "reference_data": (rx, ry)}))
    assert len(algo.trainer.x) == len(y[y < 2])                  # nothing held out of its own data
    assert set(algo.known.tolist()) == {0, 1, 2, 3} and len(algo.labels) == 40
    held = algorithms.build("bristle", local)                     # no public part: the local split
    assert set(held.known.tolist()) == {0, 1}
    with pytest.raises(ConfigError, match="test_split: 'public' needs"):
        algorithms.build("bristle", local, {"test_split": "public"})


def test_bristle_weights_a_copy_of_its_head_and_zeroes_a_sign_flipped_one():
    algo = algorithms.build("bristle", _context(_head_only()))
    algo.local_update(0)
    own = algo.x.clone()
    info = algo.combine(0, 0, {"a": {"model": own.clone()}, "b": {"model": -4 * own}})
    assert info == {"bristle_exploit": 2, "bristle_explore": 0, "bristle_from_history": 0, "bristle_zero_weight": 1}
    assert torch.allclose(algo.x, own, atol=1e-6)                # the copy changes nothing, the flipped one is out
    info = algo.combine(1, 0, {})                                # nothing arrived: the history stands in
    assert info["bristle_from_history"] == 2


@pytest.mark.parametrize("values, needle", [
    ({"n_exploit": 0}, "n_exploit must be >= 1"),
    ({"nope": 1}, "algorithm_params.nope: unknown key for algorithm 'bristle'"),
    ({"temperature": -1.0}, "temperature must be > 0"),
    ({"test_per_class": "ten"}, "algorithm_params.test_per_class"),
    ({"overlap_recall": 1.5}, "overlap_recall must be in \\(0, 1\\]"),
])
def test_bad_parameters_are_config_errors(values, needle):
    with pytest.raises(ConfigError, match=needle):
        algorithms.params("bristle", values)


@pytest.fixture(scope="module")
def digits_backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("bb") / "digits.safetensors"
    backbone.pretrain("digits", "mlp", path, hidden=(32,), epochs=20)
    return str(path)


def _run(tmp_path, name, **values):
    s = scenarios.build({"name": name, "peers": 8, "topology": "regular:4", "rounds": 6, "dataset": "digits",
                         "partition": "iid", "hidden": [32], "centralized": False, **values})
    return engine.run(s, tmp_path / name)


def test_honest_bristle_peers_keep_their_accuracy_next_to_sign_flippers(tmp_path, digits_backbone):
    common = {"backbone": digits_backbone}
    clean = _run(tmp_path, "clean", algorithm="bristle", **common)
    attack = {"attack": "sign_flip", "attackers": [2, 5], **common}
    attacked = _run(tmp_path, "attacked", algorithm="bristle", **attack)
    mixing = _run(tmp_path, "mixing", **attack)                    # the same attack on plain head-only gossip
    assert clean["honest_accuracy"]["mean"] > 0.8
    assert attacked["honest_accuracy"]["mean"] >= clean["honest_accuracy"]["mean"] - 0.05
    assert mixing["honest_accuracy"]["mean"] < clean["honest_accuracy"]["mean"] - 0.2
    # only heads travel: 32 x 10 + 10 floats a frame
    assert attacked["bytes_sent"] < clean["bytes_sent"] * 1.01


def test_a_peer_with_another_backbone_is_refused_naming_both_hashes(tmp_path, digits_backbone):
    other = tmp_path / "other.safetensors"
    backbone.pretrain("digits", "mlp", other, hidden=(32,), epochs=1, seed=1)
    mine, theirs = backbone.load(digits_backbone).hash, backbone.load(other).hash
    assert mine != theirs
    a_settings, b_settings = (PeerSettings(algorithm="bristle", backbone=str(f), hidden=(32,)).protocol_settings()
                              for f in (digits_backbone, other))

    async def main():
        a, b = transport(0, settings=a_settings), transport(1, settings=b_settings)
        async with AsyncExitStack() as stack:
            await started(stack, a, b)
            with trio.fail_after(LIMIT_S):
                with pytest.raises(HelloRefused) as e:
                    await b.connect(a.listen_addrs()[0])
            assert a.local_id not in b.peers and b.local_id not in a.peers
            return str(e.value), a.refusals[b.local_id]

    initiator, responder = trio.run(main)
    for message in (initiator, responder):
        assert f"backbone differs: ours {mine}, theirs {theirs}" in message or \
            f"backbone differs: ours {theirs}, theirs {mine}" in message


@pytest.mark.slow
def test_four_bristle_peer_processes_with_one_sign_flipper(tmp_path, digits_backbone):
    """Real `p2pfl peer` processes on 127.0.0.1 (the procs engine stops them by PID; bounded by timeout_s)."""
    s = scenarios.build({"name": "procs-bristle", "peers": 4, "topology": "full", "dataset": "digits", "hidden": [32],
                         "partition": "iid", "local_steps": 20, "step_timeout_s": 4.0, "rounds": 3, "engine": "procs",
                         "algorithm": "bristle", "backbone": digits_backbone, "attack": "sign_flip", "attackers": [3],
                         "centralized": False})
    summary = procs.run(s, tmp_path, timeout_s=150)
    assert summary["rounds_done"] == [3, 3, 3, 3] and summary["rejected"] == {}
    assert summary["honest_accuracy"]["min"] > 0.7
    events = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    honest = [e for e in events if e["kind"] == "round" and e["peer"] != 3 and e["received"] == 3]
    assert honest, "no honest round heard all three neighbours"
    # every such round zeroed at least the flipped head (an honest neighbour may be zeroed too, never all)
    assert all(1 <= e["bristle_zero_weight"] < 3 for e in honest)


def test_procs_hands_its_peers_the_backbone_by_absolute_path(tmp_path, digits_backbone, monkeypatch):
    (tmp_path / "bb.safetensors").write_bytes(Path(digits_backbone).read_bytes())
    monkeypatch.chdir(tmp_path)
    s = scenarios.build({"peers": 4, "topology": "ring", "hidden": [32], "engine": "procs", "algorithm": "bristle",
                         "backbone": "bb.safetensors"})
    assert fleet.peer_settings(s)["backbone"] == str(tmp_path / "bb.safetensors")
