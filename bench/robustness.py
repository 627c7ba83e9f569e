"""Robustness matrix: honest accuracy for attack x rule x attacker fraction, in the in-process engine.

Setting (issue #6): digits, 32 peers on `regular:8`, Dirichlet(0.5), the default MLP and local SGD,
seeds 0 1 2. Each rule runs with the largest f its requirement allows on degree 8, capped at
3 = ceil(0.3 * 8) (bulyan: f = 1, the most n = 9 allows). Attackers are drawn with the seed (the
attackers of 10% are among those of 20%, and those among 30%); data, graph and initial model do not
depend on the attack. Honest accuracy is the final-round test accuracy over honest peers only.

    python bench/robustness.py [--quick] [--rounds R] [--seeds 0 1 2] [--workers 2] [--md docs/results/robustness.md]

Prints one JSON line per cell: {"attack", "rule", "fraction", "honest_accuracy_mean", "honest_accuracy_min",
"clean_accuracy", ...}: honest_accuracy_mean is the honest peers' mean accuracy averaged over seeds,
honest_accuracy_min the worst honest peer over all seeds, clean_accuracy the same rule with no attacker
(mean over seeds). Every finished run is cached (one JSON line each, `--cache`), so an interrupted
matrix resumes and the clean runs are shared by all attacks. `--md` also writes the markdown report and
its heatmap PNG beside it; text below the `<!-- notes -->` line of an existing report is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from matrix import run_cached  # bench/matrix.py (a script's folder is on sys.path)

ATTACKS = ("sign_flip", "gaussian", "label_flip", "alie", "ipm", "dissensus", "free_rider", "silent", "mimic")
# rule -> (f, params): the largest f the rule allows on degree 8 (n = 9), capped at ceil(0.3 * 8) = 3
RULES: dict[str, tuple[int, dict[str, Any]]] = {
    "mixing": (0, {}),
    "median": (3, {}),
    "trimmed_mean": (3, {}),
    "krum": (3, {}),
    "multi_krum": (3, {}),
    "bulyan": (1, {}),
    "geometric_median": (3, {}),
    "self_centered_clip": (3, {"tau": 1.0}),  # ~ the honest distance to the neighbours' mean (0.6-0.9)
}
FRACTIONS = (0.1, 0.2, 0.3)
QUICK = {"attacks": ATTACKS, "rules": ("mixing", "trimmed_mean", "geometric_median", "self_centered_clip"),
             "fractions": (0.3,), "seeds": (0,), "rounds": 10}
BASE = {"peers": 32, "topology": "regular:8", "dataset": "digits", "partition": "dirichlet:0.5", "model": "mlp", "hidden": [64],
            "lr": 0.2, "batch_size": 16, "local_epochs": 2, "centralized": False}
NOTES = "<!-- notes -->"


def key(attack: str, rule: str, fraction: float, seed: int, rounds: int) -> str:
    return f"{attack}|{rule}|{fraction:g}|{seed}|{rounds}|{BASE['peers']}|{BASE['topology']}"


def run_one(attack: str, rule: str, fraction: float, seed: int, rounds: int) -> dict[str, Any]:
    logging.disable(logging.WARNING)  # too_few_inputs warnings: counted in the summary instead
    from p2pfl.sim import engine
    from p2pfl.sim import scenario as scenarios

    f, params = RULES[rule]
    s = scenarios.build({**BASE, "name": f"{attack}-{rule}-{fraction:g}", "rounds": rounds, "eval_every": rounds,
                         "seed": seed, "aggregator": rule, "f": f, "aggregator_params": params,
                         "attack": attack, "attackers": fraction})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = engine.run(s, out)
    acc = summary["honest_accuracy"]
    return {"key": key(attack, rule, fraction, seed, rounds), "attack": attack, "rule": rule, "fraction": fraction,
            "seed": seed, "rounds": rounds, "honest_mean": acc["mean"], "honest_min": acc["min"],
            "attackers": summary["attackers"], "byzantine_neighbors": summary["byzantine_neighbors"],
            "too_few_inputs": summary["rejected"].get("too_few_inputs", 0),
            "wall_s": round(time.perf_counter() - start, 2)}


def cells(done: dict[str, dict[str, Any]], attacks: tuple[str, ...], rules: tuple[str, ...],
          fractions: tuple[float, ...], seeds: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    out = []
    for rule in rules:
        clean = [done[key("none", rule, 0.0, s, rounds)] for s in seeds]
        clean_acc = statistics.mean(r["honest_mean"] for r in clean)
        out.append({"attack": "none", "rule": rule, "fraction": 0.0, "honest_accuracy_mean": round(clean_acc, 4),
                    "honest_accuracy_min": round(min(r["honest_min"] for r in clean), 4),
                    "clean_accuracy": round(clean_acc, 4), "seeds": len(seeds), "rounds": rounds})
        for attack in attacks:
            for fraction in fractions:
                runs = [done[key(attack, rule, fraction, s, rounds)] for s in seeds]
                out.append({"attack": attack, "rule": rule, "fraction": fraction,
                            "honest_accuracy_mean": round(statistics.mean(r["honest_mean"] for r in runs), 4),
                            "honest_accuracy_min": round(min(r["honest_min"] for r in runs), 4),
                            "clean_accuracy": round(clean_acc, 4), "seeds": len(seeds), "rounds": rounds,
                            "attackers": runs[0]["attackers"],
                            "max_byzantine_neighbors": max(r["byzantine_neighbors"]["max"] for r in runs),
                            "too_few_inputs": sum(r["too_few_inputs"] for r in runs)})
    return out


def heatmap(rows: list[dict[str, Any]], attacks: tuple[str, ...], rules: tuple[str, ...],
            fractions: tuple[float, ...], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r["attack"], r["rule"], r["fraction"]): r for r in rows}
    fig, axes = plt.subplots(1, len(fractions), figsize=(1.0 + 0.95 * len(rules) * len(fractions),
                                                         1.6 + 0.42 * (len(attacks) + 1)), dpi=110, squeeze=False)
    names = ("none", *attacks)
    for ax, fraction in zip(axes[0], fractions):
        grid = np.array([[by[(a, r, 0.0 if a == "none" else fraction)]["honest_accuracy_mean"] for r in rules]
                         for a in names])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(rules)), rules, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), [f"{a} (clean)" if a == "none" else a for a in names], fontsize=8)
        ax.set_title(f"{fraction:.0%} attackers", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="honest mean accuracy")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def markdown(rows: list[dict[str, Any]], attacks: tuple[str, ...], rules: tuple[str, ...],
             fractions: tuple[float, ...], seeds: tuple[int, ...], rounds: int, command: str, png: str,
             wall_s: float, notes: str) -> str:
    by = {(r["attack"], r["rule"], r["fraction"]): r for r in rows}
    lines = ["# Robustness matrix: honest accuracy under attack", "",
             f"Made by `{command}` ({wall_s / 60:.0f} min of runs on this machine's 2 shared cores). "
             f"Digits, {BASE['peers']} peers on `{BASE['topology']}`, Dirichlet(0.5), MLP [64], local SGD lr 0.2, "
             f"2 local epochs, {rounds} rounds, seeds {' '.join(map(str, seeds))}. Accuracy is the final-round test "
             "accuracy of the honest peers (attackers are not evaluated). Rules and f: "
             + ", ".join(f"{r} (f={RULES[r][0]}{', ' + ', '.join(f'{k}={v}' for k, v in RULES[r][1].items()) if RULES[r][1] else ''})"
                         for r in rules) + ".", "",
             f"![heatmap]({png})", ""]
    for fraction in fractions:
        lines += [f"## {fraction:.0%} attackers: honest mean accuracy (worst honest peer)", "",
                  "| attack | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
        clean = [by[("none", r, 0.0)] for r in rules]
        lines.append("| *no attack* | " + " | ".join(f"{c['honest_accuracy_mean']:.3f} ({c['honest_accuracy_min']:.2f})"
                                                     for c in clean) + " |")
        for a in attacks:
            cs = [by[(a, r, fraction)] for r in rules]
            best = max(c["honest_accuracy_mean"] for c in cs)
            lines.append(f"| {a} | " + " | ".join(
                (f"**{c['honest_accuracy_mean']:.3f}**" if c["honest_accuracy_mean"] == best else
                 f"{c['honest_accuracy_mean']:.3f}") + f" ({c['honest_accuracy_min']:.2f})" for c in cs) + " |")
        lines.append("")
    top = max(fractions)
    nan = float("nan")
    ref = by[("none", "mixing", 0.0)]["honest_accuracy_mean"] if "mixing" in rules else nan
    alone = by[("silent", "mixing", top)]["honest_accuracy_mean"] if ("silent", "mixing", top) in by else nan
    lines += [f"## The goal at {top:.0%} attackers: best rule within 3 points of the attack-free run", "",
              (f"Three references: (a) the same rule with no attacker; (b) attack-free DFedAvg (`mixing`) = {ref:.3f}; "
              f"(c) the honest peers alone: DFedAvg when the attackers send nothing (`silent` x `mixing`) = {alone:.3f}: "
              "what the honest peers reach when the attackers contribute neither data nor mixing. A gap is reference minus attacked "
              "accuracy, in points; 'met' means a gap of at most 3 points."), "",
              ("| attack | best rule | honest mean | (a) same rule, no attack | gap (a) | gap (b) | gap (c) | met (a/b/c) |"
              " most Byzantine neighbours of an honest peer (of 8) |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for a in attacks:
        c = max((by[(a, r, top)] for r in rules), key=lambda c: c["honest_accuracy_mean"])
        gaps = [c["clean_accuracy"] - c["honest_accuracy_mean"], ref - c["honest_accuracy_mean"],
                alone - c["honest_accuracy_mean"]]
        lines.append(f"| {a} | {c['rule']} | {c['honest_accuracy_mean']:.3f} | {c['clean_accuracy']:.3f} | "
                     + " | ".join(f"{100 * g:+.1f}" for g in gaps) + " | "
                     + "/".join("yes" if g <= 0.03 else "no" for g in gaps) + f" | {c['max_byzantine_neighbors']} |")
    lines += ["", "Raw cells (one JSON line each) are in `robustness.jsonl` beside this file.", "", NOTES, notes]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced matrix: 4 rules, 30%% attackers, 1 seed, 10 rounds")
    ap.add_argument("--attacks", nargs="+", choices=ATTACKS)
    ap.add_argument("--rules", nargs="+", choices=tuple(RULES))
    ap.add_argument("--fractions", nargs="+", type=float)
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--workers", type=int, default=2, help="parallel processes (each runs torch on one thread)")
    ap.add_argument("--cache", type=Path, default=Path("results/robustness-cache.jsonl"))
    ap.add_argument("--md", type=Path, help="write this markdown report, its heatmap PNG and JSON lines beside it")
    args = ap.parse_args()
    preset: dict[str, Any] = dict(QUICK) if args.quick else {"attacks": ATTACKS, "rules": tuple(RULES),
                                                                  "fractions": FRACTIONS, "seeds": (0, 1, 2), "rounds": 15}
    attacks = tuple(args.attacks or preset["attacks"])
    rules = tuple(args.rules or preset["rules"])
    fractions = tuple(args.fractions or preset["fractions"])
    seeds = tuple(args.seeds if args.seeds is not None else preset["seeds"])
    rounds = args.rounds or preset["rounds"]
    jobs = [("none", r, 0.0, s, rounds) for r in rules for s in seeds]
    jobs += [(a, r, fr, s, rounds) for fr in sorted(fractions, reverse=True) for a in attacks for r in rules
             for s in seeds]
    start = time.perf_counter()
    done = run_cached(jobs, args.cache, args.workers, run_one, lambda j: key(*j), report_every=10)
    rows = cells(done, attacks, rules, fractions, seeds, rounds)
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.md:
        md = args.md
        md.parent.mkdir(parents=True, exist_ok=True)
        png = md.with_suffix(".png")
        heatmap(rows, attacks, rules, fractions, png)
        (md.with_suffix(".jsonl")).write_text("".join(json.dumps(r) + "\n" for r in rows))
        notes = md.read_text().split(NOTES, 1)[1].strip("\n") + "\n" if md.exists() and NOTES in md.read_text() else ""
        wall = sum(done[key(*j)]["wall_s"] for j in jobs) / max(1, args.workers)
        command = "python " + " ".join(["bench/robustness.py", *sys.argv[1:]])
        md.write_text(markdown(rows, attacks, rules, fractions, seeds, rounds, command, png.name,
                               wall if not args.quick else time.perf_counter() - start, notes))
        print(f"# wrote {md}, {png.name}, {md.with_suffix('.jsonl').name}", file=sys.stderr)


if __name__ == "__main__":
    main()
