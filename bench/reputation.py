"""Reputation (RFFL) with rewiring against the per-round rules alone, in the in-process engine.

Setting (issue #13): digits, 32 peers on `regular:8` (the robustness matrix's), Dirichlet(0.5) and IID,
attackers drawn with the seed; defences: a per-round rule alone ("none") and the same rule with
reputation and rewiring ("rffl"). Honest accuracy is the final-round test accuracy over honest peers.

    python bench/reputation.py [--quick] [--rounds R] [--attacks ...] [--rules ...] [--fractions ...]
                               [--data dirichlet:0.5 iid] [--workers 2] [--md docs/results/reputation.md]

`--quick`: 30% attackers, Dirichlet(0.5), rule self_centered_clip (tau 1, f 3), attacks sign_flip, ipm,
free_rider (noise), silent, each with and without reputation, plus one IID run without attackers (does reputation remove
honest peers?); 12 rounds. One JSON line per cell:
{"defense", "rule", "data", "attack", "fraction", "honest_accuracy_mean", "honest_accuracy_min",
"removal_rounds_median", "removal_rounds_max", "honest_removed", "max_byzantine_neighbors_final", "fairness",
"accuracy_per_round"}. Removal rounds count rounds until every initial honest neighbour of an attacker has
removed it (null if never, for any attacker: max; median over those removed). `fairness` (cells with
`"fair_rewards": true`, one per data setting and rule without attackers, and one at the first fraction
against sign_flip; `--no-fairness` skips them) is the Pearson correlation, over the honest peers, between
each peer's standalone accuracy (the same model and trainer on its own shard alone, same rounds) and its
final accuracy with reputation and fair rewards; null in the other cells.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ATTACKS = ("free_rider", "sign_flip", "gaussian", "label_flip", "alie", "ipm", "dissensus", "silent")
RULES: dict[str, tuple[int, dict[str, Any]]] = {"self_centered_clip": (3, {"tau": 1.0}),
                                                "geometric_median": (3, {}), "multi_krum": (3, {}),
                                                "mixing": (0, {})}


def standalone(s: Any) -> list[float]:
    """Each peer's test accuracy after training alone on its shard for the scenario's rounds (the
    engine's model, trainer, batch order and seed per peer)."""
    from p2pfl.learn.train import peer_seed
    from p2pfl.sim import engine

    setup = engine.Setup.build(s)
    return [engine.train_alone(setup, setup.train_data(i), peer_seed(s.seed, i))[-1] for i in range(s.peers)]


def pearson(a: list[float], b: list[float]) -> float | None:
    import numpy as np

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def run_cell(defense: str, rule: str, data: str, attack: str, fraction: float, rounds: int,
             fair: bool = False) -> dict[str, Any]:
    import torch

    from p2pfl.sim import engine, scenario

    torch.set_num_threads(1)
    f, params = RULES[rule]
    values: dict[str, Any] = {"name": "reputation", "peers": 32, "topology": "regular:8", "rounds": rounds,
                              "partition": data, "aggregator": rule, "f": f, "aggregator_params": params,
                              "centralized": False, "eval_every": 2,
                              "attack": attack if fraction > 0 else "none", "attackers": fraction}
    if attack == "free_rider" and fraction > 0:
        values["attack_params"] = {"mode": "noise"}
    if defense == "rffl":
        values["reputation"] = True
        if fair:
            values["reputation_params"] = {"fair_rewards": True}
    s = scenario.build(values)
    with tempfile.TemporaryDirectory() as out:
        summary = engine.run(s, out)
        events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    byz = set(summary["byzantine"])
    initial = summary.get("overlay_initial")
    unlinks = [e for e in events if e["kind"] == "rewire" and e["change"] == "unlink"]
    removal: list[int | None] = []
    if initial is not None:
        for b in sorted(byz):
            victims = {i for i in initial[b] if i not in byz}
            rounds_ = [e["round"] + 1 for e in unlinks if e["other"] == b and e["peer"] in victims]
            done = {e["peer"] for e in unlinks if e["other"] == b and e["peer"] in victims}
            removal.append(max(rounds_) if victims and done == victims else None if victims else 0)
    got = [r for r in removal if r is not None]
    curve = [e.get("accuracy_mean") for e in events if e["kind"] == "consensus"]
    final_byz = summary.get("byzantine_neighbors_final", summary["byzantine_neighbors"])["max"]
    fairness = None
    if fair:
        alone = standalone(s)
        last: dict[int, tuple[int, float]] = {}
        for e in events:
            if e["kind"] == "round" and e.get("accuracy") is not None and e["peer"] not in byz:
                if e["round"] >= last.get(e["peer"], (-1, 0.0))[0]:
                    last[e["peer"]] = (e["round"], e["accuracy"])
        honest = sorted(last)
        fairness = pearson([alone[i] for i in honest], [last[i][1] for i in honest])
    return {"defense": defense, "rule": rule, "data": data, "attack": attack, "fraction": fraction,
            "fair_rewards": fair,
            "honest_accuracy_mean": summary["honest_accuracy"]["mean"],
            "honest_accuracy_min": summary["honest_accuracy"]["min"],
            "removal_rounds_median": statistics.median(got) if got else None,
            "removal_rounds_max": max(got) if got and len(got) == len(removal) else None,
            "honest_removed": sum(1 for e in unlinks if e["peer"] not in byz and e["other"] not in byz)
            if defense == "rffl" else 0,
            "max_byzantine_neighbors_final": final_byz, "fairness": fairness,
            "accuracy_per_round": curve, "wall_s": summary["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30%% attackers, 4 attacks, 1 rule, 12 rounds (+1 IID run)")
    ap.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    ap.add_argument("--rules", nargs="+", choices=tuple(RULES), default=["self_centered_clip", "multi_krum"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3])
    ap.add_argument("--data", nargs="+", default=["dirichlet:0.5"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-fairness", action="store_true", help="skip the fair-rewards cells (standalone runs)")
    ap.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    ap.add_argument("--md", type=Path, help="write a markdown table and reputation-curves.png beside it")
    args = ap.parse_args()
    if args.quick:
        args.attacks, args.rules, args.fractions, args.data, args.rounds = \
            ["sign_flip", "ipm", "free_rider", "silent"], ["self_centered_clip"], [0.3], ["dirichlet:0.5"], 12
    jobs = [(d, r, data, a, fr, args.rounds, False) for data in args.data for r in args.rules
            for fr in args.fractions for a in args.attacks for d in ("none", "rffl")]
    jobs += [("rffl", r, "iid", "none", 0.0, args.rounds, False) for r in args.rules]
    if not args.no_fairness:
        jobs += [("rffl", r, data, "none", 0.0, args.rounds, True) for data in args.data for r in args.rules]
        jobs += [("rffl", args.rules[0], args.data[0], "sign_flip", args.fractions[0], args.rounds, True)]
    sink = open(args.out, "w") if args.out else None
    cells = []
    with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        for cell in pool.map(run_cell, *zip(*jobs)):
            cells.append(cell)
            line = json.dumps(cell)
            print(line, flush=True)
            if sink:
                sink.write(line + "\n")
    if sink:
        sink.close()
    if args.md:
        write_md(cells, args.md, " ".join(sys.argv[1:]))


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_md(cells: list[dict[str, Any]], path: Path, argv: str) -> None:
    """The table (one row per attack: rule alone vs rule + reputation) and the accuracy curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["| data | rule | attack | fraction | none: mean (worst) | rffl: mean (worst) | removal rounds median / max "
            "| honest removed | most Byzantine neighbours at the end (none / rffl) |", "|---" * 9 + "|"]
    by = {(c["defense"], c["rule"], c["data"], c["attack"], c["fraction"]): c for c in cells if not c["fair_rewards"]}
    for (d, rule, data, attack, fr), c in sorted(by.items(), key=lambda kv: kv[0][1:]):
        if d != "rffl":
            continue
        n = by.get(("none", rule, data, attack, fr))
        rows.append(f"| {data} | {rule} | {attack} | {fr:g} | "
                    + (f"{_f(n['honest_accuracy_mean'])} ({_f(n['honest_accuracy_min'], 2)})" if n else "-")
                    + f" | {_f(c['honest_accuracy_mean'])} ({_f(c['honest_accuracy_min'], 2)}) | "
                    f"{_f(c['removal_rounds_median'])} / {_f(c['removal_rounds_max'])} | {c['honest_removed']} | "
                    f"{n['max_byzantine_neighbors_final'] if n else '-'} / {c['max_byzantine_neighbors_final']} |")
    fair = [c for c in cells if c["fair_rewards"]]
    if fair:
        rows += ["", "Fair rewards (`fair_rewards = true`): Pearson correlation between each honest peer's "
                 "standalone accuracy and its final accuracy.", "",
                 "| data | rule | attack | fraction | mean (worst) | fairness |", "|---" * 6 + "|"]
        rows += [f"| {c['data']} | {c['rule']} | {c['attack']} | {c['fraction']:g} | "
                 f"{_f(c['honest_accuracy_mean'])} ({_f(c['honest_accuracy_min'], 2)}) | {_f(c['fairness'])} |"
                 for c in fair]
    attacks = sorted({c["attack"] for c in cells if c["fraction"] > 0})
    fig, axes = plt.subplots(1, max(1, len(attacks)), figsize=(3.2 * max(1, len(attacks)), 3.2), dpi=100,
                             sharey=True, squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for c in cells:
            if c["attack"] == attack and c["fraction"] > 0 and not c["fair_rewards"]:
                pts = [(t + 1, a) for t, a in enumerate(c["accuracy_per_round"]) if a is not None]
                ax.plot(*zip(*pts), marker=".", label=c["defense"])
        ax.set_title(attack)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("honest mean accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    png = path.with_name("reputation-curves.png")
    fig.savefig(png)
    path.write_text(f"<!-- python bench/reputation.py {argv} -->\n" + "\n".join(rows) + "\n\n"
                    f"![accuracy per round]({png.name})\n")


if __name__ == "__main__":
    sys.exit(main())
