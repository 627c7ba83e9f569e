"""Reputation with rewiring in the in-process engine: attackers removed, honest peers kept, overlay connected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2pfl.sim import engine, results
from p2pfl.sim import scenario as scenarios
from p2pfl.sim.reputation_plots import overlays, reputation_matrix

ATTACKER = 3


def run(tmp_path: Path, attack: str, params: dict[str, object], seed: int = 0) -> tuple[dict, list[dict]]:
    s = scenarios.build({"peers": 10, "topology": "regular:4", "rounds": 6, "attack": attack, "attack_params": params,
                         "attackers": [ATTACKER], "partition": "iid", "reputation": True, "seed": seed,
                         "reputation_params": {"alpha": 0.8}, "local_epochs": 1, "centralized": False,
                         "eval_every": 6})
    out = tmp_path / f"{attack}-{seed}"
    summary = engine.run(s, out)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, [e for e in events if e["kind"] == "rewire"]


def connected(nodes: set[int], nbrs: list[list[int]]) -> bool:
    start = min(nodes)
    seen, todo = {start}, [start]
    while todo:
        for j in nbrs[todo.pop()]:
            if j in nodes and j not in seen:
                seen.add(j)
                todo.append(j)
    return seen == nodes


@pytest.mark.parametrize("attack, params", [("sign_flip", {}), ("free_rider", {"mode": "noise"})])
def test_attacker_removed_honest_kept_overlay_connected(tmp_path: Path, attack: str, params: dict) -> None:
    summary, changes = run(tmp_path, attack, params)
    victims = set(summary["overlay_initial"][ATTACKER])
    unlinks = [c for c in changes if c["change"] == "unlink"]
    # every honest neighbour of the attacker removes it within 4 rounds (IID split, alpha 0.8)
    removed_by = {c["peer"] for c in unlinks if c["other"] == ATTACKER}
    assert removed_by == victims and max(c["round"] for c in unlinks if c["other"] == ATTACKER) <= 3
    # no honest peer removes an honest peer, and nobody links the attacker again (a removal lasts the run)
    assert all(c["other"] == ATTACKER for c in unlinks)
    final = summary["overlay_final"]
    assert ATTACKER not in {j for i in victims for j in final[i]}
    honest = set(range(10)) - {ATTACKER}
    assert connected(honest, final)
    assert all(len(final[i]) >= 2 for i in honest)
    # replacements: the honest peers got links back (degree refilled to at most the initial 4)
    assert all(len(final[i]) <= 4 for i in range(10)) and any(c["change"] == "link" for c in changes)
    assert summary["byzantine_neighbors_final"]["max"] == 0
    assert summary["honest_accuracy"]["min"] > 0.7
    # the report's figures: one heatmap row per (peer, neighbour) pair, a removal mark for each victim
    out = tmp_path / f"{attack}-0"
    assert set(results.report(out)["plots"]) >= {"reputation.png", "overlay.png"}
    events = results.read_events(out)
    pairs, values, marks = reputation_matrix(events)
    assert {(i, ATTACKER) for i in victims} <= set(pairs)
    assert {pairs[row] for row, _ in marks} == {(i, ATTACKER) for i in victims}
    assert values.shape == (len(pairs), 6) and np.nanmax(values) > 1
    initial, final_graph = overlays(events)
    assert final_graph == final and initial == summary["overlay_initial"]


def test_rewiring_is_deterministic_under_the_seed(tmp_path: Path) -> None:
    a = run(tmp_path / "a", "free_rider", {"mode": "noise"})
    b = run(tmp_path / "b", "free_rider", {"mode": "noise"})
    assert a[1] == b[1] and a[0]["per_peer_accuracy"] == b[0]["per_peer_accuracy"]
    assert np.array_equal(np.array(a[0]["overlay_final"], dtype=object), np.array(b[0]["overlay_final"], dtype=object))
