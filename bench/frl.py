"""FRL against float gossip: honest accuracy and bytes per peer and round, with attackers, in-process.

Setting (issue #14): digits, 32 peers on `regular:8`, Dirichlet(1.0), the MLP [64], batch 8, 2 local
epochs. FRL (`algorithm = "frl"`, rule "rank_vote", its own score optimizer: lr 0.4, momentum 0.9)
under `rank_reversal`; DFedAvg (local SGD lr 0.1) with `mixing` (no attack only), and with
`trimmed_mean` and `multi_krum` (f = 3 = ceil(0.3 * 8)) under `alie` and `sign_flip`. Attackers are
0 / 10 / 20 / 30% of the peers, drawn with the seed (nested across fractions). Honest accuracy is the
final-round test accuracy over honest peers; bytes are what every peer sent, per peer and round
(the in-process engine counts payload bytes: frame headers, ~250 bytes each, are not included).

    python bench/frl.py [--quick] [--rounds R] [--seeds 0 1 2] [--workers 2] [--md docs/results/frl.md]

Prints one JSON line per cell: {"algorithm", "rule", "attack", "fraction", "honest_accuracy_mean",
"honest_accuracy_min", "bytes_per_peer_round", "clean_accuracy", "seeds", "rounds"}: means over the
seeds, min over all seeds' honest peers, clean_accuracy the same algorithm and rule with no attacker.
`--quick`: 1 seed, 20 rounds, fractions 0 and 20%, each baseline under both attacks (9 runs, under
5 minutes on 2 free cores). `--md` writes the markdown report and its plot beside it; text below the
`<!-- notes -->` line of an existing report is kept.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from p2pfl.files import atomic_write

BASE = {"peers": 32, "topology": "regular:8", "dataset": "digits", "partition": "dirichlet:1.0", "model": "mlp",
        "hidden": [64], "batch_size": 8, "local_epochs": 2, "centralized": False}
# (algorithm, rule) -> (f, attacks, overrides)
SETUPS: dict[tuple[str, str], tuple[int, tuple[str, ...], dict[str, Any]]] = {
    ("frl", "rank_vote"): (0, ("rank_reversal",), {"algorithm": "frl"}),
    ("dfedavg", "mixing"): (0, (), {"algorithm": "dfedavg", "lr": 0.1}),
    ("dfedavg", "trimmed_mean"): (3, ("alie", "sign_flip"), {"algorithm": "dfedavg", "lr": 0.1}),
    ("dfedavg", "multi_krum"): (3, ("alie", "sign_flip"), {"algorithm": "dfedavg", "lr": 0.1}),
}
FRACTIONS = (0.1, 0.2, 0.3)
QUICK = {"fractions": (0.2,), "seeds": (0,), "rounds": 20}
NOTES = "<!-- notes -->"

Job = tuple[str, str, str, float, int, int]   # algorithm, rule, attack, fraction, seed, rounds


def run_one(algorithm: str, rule: str, attack: str, fraction: float, seed: int, rounds: int) -> dict[str, Any]:
    logging.disable(logging.WARNING)
    from p2pfl.sim import engine
    from p2pfl.sim import scenario as scenarios

    f, _, overrides = SETUPS[(algorithm, rule)]
    values = {**BASE, **overrides, "name": f"{algorithm}-{rule}-{attack}-{fraction:g}", "rounds": rounds,
              "eval_every": rounds, "seed": seed, "f": f,
              "aggregator": "mixing" if rule == "rank_vote" else rule}
    if attack != "none":
        values.update(attack=attack, attackers=fraction)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = engine.run(scenarios.build(values), out)
    return {"job": [algorithm, rule, attack, fraction, seed, rounds], "honest_mean": summary["honest_accuracy"]["mean"],
            "honest_min": summary["honest_accuracy"]["min"], "bytes_per_peer_round": summary["bytes_per_peer_round"],
            "attackers": summary["attackers"], "wall_s": round(time.perf_counter() - start, 2)}


def jobs(fractions: tuple[float, ...], seeds: tuple[int, ...], rounds: int) -> list[Job]:
    out: list[Job] = []
    for (algorithm, rule), (_, attacks, _) in SETUPS.items():
        out += [(algorithm, rule, "none", 0.0, s, rounds) for s in seeds]
        out += [(algorithm, rule, a, fr, s, rounds) for a in attacks for fr in fractions for s in seeds]
    return out


def run_all(todo: list[Job], workers: int) -> dict[Job, dict[str, Any]]:
    done: dict[Job, dict[str, Any]] = {}
    start = time.perf_counter()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        # the slow FRL runs first, so that the two workers finish together
        futures = [pool.submit(run_one, *j) for j in sorted(todo, key=lambda j: j[0] != "frl")]
        for n, fut in enumerate(cf.as_completed(futures), 1):
            r = fut.result()
            done[tuple(r["job"])] = r   # type: ignore[index]
            print(f"# {n}/{len(todo)} runs, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return done


def cells(done: dict[Job, dict[str, Any]], fractions: tuple[float, ...], seeds: tuple[int, ...],
          rounds: int) -> list[dict[str, Any]]:
    out = []
    for (algorithm, rule), (_, attacks, _) in SETUPS.items():
        clean = statistics.mean(done[(algorithm, rule, "none", 0.0, s, rounds)]["honest_mean"] for s in seeds)
        for attack, fraction in [("none", 0.0), *((a, fr) for a in attacks for fr in fractions)]:
            runs = [done[(algorithm, rule, attack, fraction, s, rounds)] for s in seeds]
            out.append({"algorithm": algorithm, "rule": rule, "attack": attack, "fraction": fraction,
                        "honest_accuracy_mean": round(statistics.mean(r["honest_mean"] for r in runs), 4),
                        "honest_accuracy_min": round(min(r["honest_min"] for r in runs), 4),
                        "bytes_per_peer_round": round(statistics.mean(r["bytes_per_peer_round"] for r in runs)),
                        "clean_accuracy": round(clean, 4), "seeds": len(seeds), "rounds": rounds,
                        "attackers": runs[0]["attackers"]})
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    series: dict[str, list[tuple[float, float]]] = {}
    clean = {(r["algorithm"], r["rule"]): r["honest_accuracy_mean"] for r in rows if r["attack"] == "none"}
    for r in rows:
        if r["attack"] != "none":
            series.setdefault(f"{r['algorithm']} {r['rule']} / {r['attack']}", [(0.0, clean[(r["algorithm"], r["rule"])])])
            series[f"{r['algorithm']} {r['rule']} / {r['attack']}"].append((r["fraction"], r["honest_accuracy_mean"]))
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts))
        ax.plot([100 * x for x in xs], ys, marker="o", lw=2.5 if name.startswith("frl") else 1.2, label=name)
    ax.axhline(clean[("dfedavg", "mixing")], color="grey", ls="--", lw=1, label="dfedavg mixing, no attack")
    ax.set_xlabel("attackers (% of peers)")
    ax.set_ylabel("honest mean accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def markdown(rows: list[dict[str, Any]], command: str, wall_s: float, png: str, notes: str) -> str:
    r0 = rows[0]
    lines = ["# FRL: rank learning against float gossip, under attack", "",
             f"Made by `{command}` ({wall_s:.0f} s on this machine). Digits, {BASE['peers']} peers on "
             f"`{BASE['topology']}`, Dirichlet(1.0), MLP [64], batch 8, 2 local epochs, {r0['rounds']} rounds, "
             f"{r0['seeds']} seed(s). FRL trains supermask scores (lr 0.4, momentum 0.9, sparsity 0.5) and "
             "gossips one ranking per layer (u16); DFedAvg uses local SGD lr 0.1 and gossips float32 models; "
             "the robust rules run with f = 3. Honest accuracy: final-round test accuracy over honest peers "
             "(mean; the worst honest peer in brackets). Bytes: payload bytes each peer sent per round.", "",
             f"![accuracy against attackers]({png})", "",
             "| algorithm | rule | attack | attackers | honest mean (min) | drop vs own clean run | bytes / peer / round |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = "" if r["attack"] == "none" else f"{100 * (r['clean_accuracy'] - r['honest_accuracy_mean']):+.1f} pts"
        lines.append(f"| {r['algorithm']} | {r['rule']} | {r['attack']} | {r['fraction']:.0%} | "
                     f"{r['honest_accuracy_mean']:.3f} ({r['honest_accuracy_min']:.2f}) | {drop} | "
                     f"{r['bytes_per_peer_round']:,} |")
    lines += ["", "Raw cells (one JSON line each) are in `frl.jsonl` beside this file.", "", NOTES, notes]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 20 rounds, 0 and 20%% attackers")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--md", type=Path, help="write the markdown report (and its PNG and JSONL beside it)")
    a = ap.parse_args()
    fractions = QUICK["fractions"] if a.quick else FRACTIONS
    seeds = tuple(a.seeds or (QUICK["seeds"] if a.quick else (0, 1, 2)))
    rounds = a.rounds or (QUICK["rounds"] if a.quick else 40)
    start = time.perf_counter()
    todo = jobs(fractions, seeds, rounds)      # type: ignore[arg-type]
    print(f"# {len(todo)} runs on {a.workers} worker(s)", file=sys.stderr, flush=True)
    rows = cells(run_all(todo, a.workers), fractions, seeds, rounds)   # type: ignore[arg-type]
    wall = time.perf_counter() - start
    for r in rows:
        print(json.dumps(r), flush=True)
    frl = {r["fraction"]: r for r in rows if r["algorithm"] == "frl"}
    dense = next(r for r in rows if r["rule"] == "mixing")
    print(json.dumps({"summary": True, "wall_s": round(wall, 1),
                      "frl_bytes_over_dfedavg": round(frl[0.0]["bytes_per_peer_round"] / dense["bytes_per_peer_round"], 4),
                      "frl_clean_minus_dfedavg_clean": round(frl[0.0]["honest_accuracy_mean"]
                                                             - dense["honest_accuracy_mean"], 4),
                      **({"frl_drop_at_20pct": round(frl[0.0]["honest_accuracy_mean"]
                                                     - frl[0.2]["honest_accuracy_mean"], 4)} if 0.2 in frl else {})}),
          flush=True)
    if a.md:
        a.md.parent.mkdir(parents=True, exist_ok=True)
        png = a.md.with_suffix(".png")
        plot(rows, png)
        atomic_write(a.md.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())
        notes = a.md.read_text().split(NOTES, 1)[1] if a.md.exists() and NOTES in a.md.read_text() else "\n"
        command = "python bench/frl.py " + " ".join(sys.argv[1:])
        atomic_write(a.md, markdown(rows, command, wall, png.name, notes).encode())


if __name__ == "__main__":
    main()
