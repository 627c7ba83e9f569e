"""Bristle against robust rules on the same frozen backbone, and against full-model DFedAvg.

Setting (issue #12): digits, 32 peers on `regular:8`, two data settings (Dirichlet 0.5 and
`classes:2`), attackers 0% / 10% / 30% running gaussian, label_flip, alie or sign_flip. Rules: Bristle
(as configured by default, and `bristle_local`: test samples from the peer's own data, every class judged), and mean, median, trimmed_mean, krum (f = 3 = ceil(0.3 * 8) for the last three) on head-only models
over the same frozen backbone (an MLP [64] pre-trained on 20% of the training split, held out from
the peers), plus full-model DFedAvg (`dfedavg_full`: Metropolis-Hastings mixing of the whole MLP,
no backbone, every training sample). Local SGD lr 0.2, 2 local epochs, one seed.

    python bench/bristle.py [--quick] [--rounds R] [--workers 2] [--md docs/results/bristle.md]

One JSON line per cell: {"rule", "data", "attack", "fraction", "honest_accuracy_mean",
"honest_accuracy_min", "clean_accuracy", "rounds_to_90", "bytes_per_peer_round"}: accuracies are the
honest peers' final-round test accuracy (mean, and the worst honest peer); clean_accuracy is the same
rule and data with no attacker; rounds_to_90 is the first round (1-based) at which the honest mean
reached 90% of clean_accuracy (null: never); bytes_per_peer_round is every byte the run's peers
sent divided by peers x rounds. Finished runs are cached (`--cache`), so an interrupted matrix resumes.
`--quick`: 30% attackers only, 15 rounds. `--md` writes the report, its heatmap and its accuracy plot
(text below its notes line is kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from matrix import run_cached  # bench/matrix.py (a script's folder is on sys.path)

ATTACKS = ("gaussian", "label_flip", "alie", "sign_flip")
DATA = ("dirichlet:0.5", "classes:2")
# rule -> scenario keys; every rule but dfedavg_full runs on the frozen backbone
RULES: dict[str, dict[str, Any]] = {
    "bristle": {"algorithm": "bristle"},
    # as the authors' code runs without the class-overlap exchange: test samples held out from the
    # peer's own data, every known class judged for every head
    "bristle_local": {"algorithm": "bristle", "algorithm_params": {"test_split": "local", "overlap_recall": None}},
    "mean": {"aggregator": "mean"},
    "median": {"aggregator": "median", "f": 3},
    "trimmed_mean": {"aggregator": "trimmed_mean", "f": 3},
    "krum": {"aggregator": "krum", "f": 3},
    "dfedavg_full": {"aggregator": "mixing"},
}
FRACTIONS = (0.1, 0.3)
BASE = {"peers": 32, "topology": "regular:8", "dataset": "digits", "model": "mlp", "hidden": [64], "lr": 0.2,
        "batch_size": 16, "local_epochs": 2, "centralized": False, "seed": 0}
PUBLIC_FRACTION = 0.2
NOTES = "<!-- notes: text below this line is kept when the report is rewritten -->"


def key(rule: str, data: str, attack: str, fraction: float, rounds: int, backbone_hash: str) -> str:
    return f"{rule}|{data}|{attack}|{fraction:g}|{rounds}|{backbone_hash[:16]}"


def run_one(rule: str, data: str, attack: str, fraction: float, rounds: int, backbone: str,
            backbone_hash: str) -> dict[str, Any]:
    logging.disable(logging.WARNING)   # too_few_inputs and the like: counted in the summary instead
    from p2pfl.sim import engine
    from p2pfl.sim import scenario as scenarios

    values: dict[str, Any] = {**BASE, **RULES[rule], "name": f"{rule}-{attack}-{fraction:g}", "rounds": rounds,
                              "partition": data, "attack": attack, "attackers": fraction}
    if rule != "dfedavg_full":
        values["backbone"] = backbone
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = engine.run(scenarios.build(values), out)
        curve = [json.loads(ln).get("accuracy_mean") for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()
                 if '"kind": "consensus"' in ln]
    return {"key": key(rule, data, attack, fraction, rounds, backbone_hash), "rule": rule, "data": data,
            "attack": attack, "fraction": fraction, "rounds": rounds,
            "honest_mean": summary["honest_accuracy"]["mean"], "honest_min": summary["honest_accuracy"]["min"],
            "curve": curve, "bytes_per_peer_round": summary["bytes_sent"] / (BASE["peers"] * rounds),
            "attackers": summary["attackers"], "wall_s": round(time.perf_counter() - start, 2)}


def cells(done: dict[str, dict[str, Any]], jobs: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    out = []
    for rule, data, attack, fraction, rounds, _, bb in jobs:
        r = done[key(rule, data, attack, fraction, rounds, bb)]
        clean = done[key(rule, data, "none", 0.0, rounds, bb)]["honest_mean"]
        reached = [t + 1 for t, acc in enumerate(r["curve"]) if acc is not None and acc >= 0.9 * clean]
        out.append({"rule": rule, "data": data, "attack": attack, "fraction": fraction,
                    "honest_accuracy_mean": round(r["honest_mean"], 4), "honest_accuracy_min": round(r["honest_min"], 4),
                    "clean_accuracy": round(clean, 4), "rounds_to_90": reached[0] if reached else None,
                    "bytes_per_peer_round": round(r["bytes_per_peer_round"]), "rounds": rounds,
                    "attackers": r["attackers"], "curve": [None if a is None else round(a, 4) for a in r["curve"]]})
    return out


def plots(rows: list[dict[str, Any]], rules: tuple[str, ...], heat: Path, curves: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = sorted({r["data"] for r in rows}, key=DATA.index)
    conds = sorted({(r["attack"], r["fraction"]) for r in rows}, key=lambda c: (c[1], c[0]))
    by = {(r["rule"], r["data"], r["attack"], r["fraction"]): r for r in rows}
    fig, axes = plt.subplots(1, len(data), figsize=(1.5 + 1.0 * len(rules) * len(data), 1.4 + 0.42 * len(conds)),
                             dpi=110, squeeze=False)
    for ax, d in zip(axes[0], data):
        grid = np.array([[by[(ru, d, a, f)]["honest_accuracy_mean"] for ru in rules] for a, f in conds])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(rules)), rules, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(conds)), ["no attack" if a == "none" else f"{a} {f:.0%}" for a, f in conds], fontsize=8)
        ax.set_title(d, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="honest mean accuracy")
    fig.savefig(heat, bbox_inches="tight")
    plt.close(fig)
    worst = max(f for _, f in conds)
    fig, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 3.6), dpi=110, squeeze=False)
    for ax, d in zip(axes[0], data):
        for ru in rules:
            line = ax.plot(by[(ru, d, "none", 0.0)]["curve"], label=f"{ru}", linewidth=1.2)
            if (ru, d, "sign_flip", worst) in by:
                ax.plot(by[(ru, d, "sign_flip", worst)]["curve"], linestyle="--", color=line[0].get_color(),
                        linewidth=1.2)
        ax.set_title(f"{d}: solid no attack, dashed sign_flip {worst:.0%}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("honest mean accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.savefig(curves, bbox_inches="tight")
    plt.close(fig)


def markdown(rows: list[dict[str, Any]], rules: tuple[str, ...], command: str, wall_s: float, bb_info: str,
             heat: str, curves: str, notes: str) -> str:
    by = {(r["rule"], r["data"], r["attack"], r["fraction"]): r for r in rows}
    data = sorted({r["data"] for r in rows}, key=DATA.index)
    conds = sorted({(r["attack"], r["fraction"]) for r in rows}, key=lambda c: (c[1], c[0]))
    rounds = rows[0]["rounds"]
    lines = ["# Bristle: honest accuracy under attack, against robust rules on the same frozen backbone", "",
             f"Made by `{command}` ({wall_s / 60:.1f} min: the runs' summed time / workers, on 2 shared cores). Digits, {BASE['peers']} peers on "
             f"`{BASE['topology']}`, {rounds} rounds, seed {BASE['seed']}, local SGD lr {BASE['lr']}, "
             f"{BASE['local_epochs']} local epochs. {bb_info} Robust rules use f = 3; `dfedavg_full` gossips the whole "
             "MLP with Metropolis-Hastings mixing and no backbone. Accuracy: final-round test accuracy of the honest "
             "peers (mean, and the worst honest peer in parentheses).", "",
             f"![heatmap]({heat})", "", f"![accuracy per round]({curves})", ""]
    for d in data:
        lines += [f"## {d}", "", "| attack | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
        for a, f in conds:
            cs = [by[(ru, d, a, f)] for ru in rules]
            best = max(c["honest_accuracy_mean"] for c in cs)
            lines.append(f"| {'no attack' if a == 'none' else f'{a} {f:.0%}'} | " + " | ".join(
                (f"**{c['honest_accuracy_mean']:.3f}**" if c["honest_accuracy_mean"] == best else
                 f"{c['honest_accuracy_mean']:.3f}") + f" ({c['honest_accuracy_min']:.2f})" for c in cs) + " |")
        r90 = [by[(ru, d, "none", 0.0)]["rounds_to_90"] for ru in rules]
        lines.append("| rounds to 90% of clean, no attack | " + " | ".join(str(v) for v in r90) + " |")
        lines.append("")
    variants = [ru for ru in rules if ru.startswith("bristle")]
    if variants:
        top = max(f for _, f in conds)
        lines += ["## The paper's goals, checked on these cells", "",
                  "| goal | rule | data | measured | met |", "|---|---|---|---|---|"]
        for ru in variants:
            for d in data:
                clean = by[(ru, d, "none", 0.0)]["honest_accuracy_mean"]
                drops = {a: clean - by[(ru, d, a, f)]["honest_accuracy_mean"] for a, f in conds if f == top}
                worst = max(drops, key=lambda a: drops[a])
                lines.append(f"| {top:.0%} attackers: within 5 points of the clean run | {ru} | {d} | worst drop "
                             f"{100 * drops[worst]:+.1f} points ({worst}; clean {clean:.3f}) | "
                             f"{'yes' if drops[worst] <= 0.05 else 'no'} |")
            for d in data:
                for other in ("krum", "median"):
                    if other in rules:
                        pairs = [(by[(ru, d, a, f)]["honest_accuracy_mean"], by[(other, d, a, f)]["honest_accuracy_mean"])
                                 for a, f in conds]
                        wins = sum(b > o for b, o in pairs)
                        lines.append(f"| non-IID: better than {other} | {ru} | {d} | ahead in {wins} of {len(pairs)} "
                                     f"conditions; mean {sum(b for b, _ in pairs) / len(pairs):.3f} against "
                                     f"{sum(o for _, o in pairs) / len(pairs):.3f} | {'yes' if wins == len(pairs) else 'no'} |")
    bpr = {ru: by[(ru, data[0], "none", 0.0)]["bytes_per_peer_round"] for ru in rules}
    if "bristle" in bpr and "dfedavg_full" in bpr:
        ratio = bpr["bristle"] / bpr["dfedavg_full"]
        lines += [f"| at most 10% of full-model gossip's bytes | bristle | all | {ratio:.1%} | "
                  f"{'yes' if ratio <= 0.1 else 'no'} |"]
    lines.append("")
    full = bpr.get("dfedavg_full")
    lines += ["## Bytes per peer and round (no attack)", "", "| " + " | ".join(rules) + " |", "|" + "---|" * len(rules),
              "| " + " | ".join(f"{bpr[ru]:,}" + (f" ({bpr[ru] / full:.1%})" if full else "") for ru in rules) + " |",
              "", "Raw cells (one JSON line each, with the per-round curves) are in `bristle.jsonl` beside this file.",
              "", NOTES, notes]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30%% attackers only, 15 rounds")
    ap.add_argument("--rules", nargs="+", choices=tuple(RULES))
    ap.add_argument("--attacks", nargs="+", choices=ATTACKS)
    ap.add_argument("--data", nargs="+", choices=DATA)
    ap.add_argument("--fractions", nargs="+", type=float)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--workers", type=int, default=2, help="parallel processes (each runs torch on one thread)")
    ap.add_argument("--backbone", type=Path, default=Path("results/bristle-backbone.safetensors"),
                    help="backbone file; pre-trained here (digits, mlp [64], 20%% public) if it does not exist")
    ap.add_argument("--cache", type=Path, default=Path("results/bristle-cache.jsonl"))
    ap.add_argument("--md", type=Path, help="write this markdown report, its two PNGs and the JSON lines beside it")
    args = ap.parse_args()
    from p2pfl.learn import backbone

    start = time.perf_counter()
    if not args.backbone.exists():
        backbone.pretrain(BASE["dataset"], BASE["model"], args.backbone, hidden=tuple(BASE["hidden"]),
                          public_fraction=PUBLIC_FRACTION, seed=BASE["seed"])
    bb = backbone.load(args.backbone)
    rules = tuple(args.rules or RULES)
    attacks = tuple(args.attacks or ATTACKS)
    data = tuple(args.data or DATA)
    fractions = tuple(args.fractions or ((0.3,) if args.quick else FRACTIONS))
    rounds = args.rounds or (15 if args.quick else 30)
    where = str(args.backbone.resolve())
    jobs = [(ru, d, "none", 0.0, rounds, where, bb.hash) for d in data for ru in rules]
    jobs += [(ru, d, a, f, rounds, where, bb.hash) for f in fractions for d in data for a in attacks for ru in rules]
    done = run_cached(jobs, args.cache, args.workers, run_one, lambda j: key(*j[:5], j[6]), report_every=6)
    rows = cells(done, jobs)
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    wall = time.perf_counter() - start
    print(f"# {wall:.0f} s", file=sys.stderr)
    if args.md:
        md = args.md
        md.parent.mkdir(parents=True, exist_ok=True)
        heat, curves = md.with_name(md.stem + "-heatmap.png"), md.with_name(md.stem + "-rounds.png")
        plots(rows, rules, heat, curves)
        md.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        info = (f"Backbone: MLP [64] pre-trained on {bb.meta['public_count']} of {bb.meta['train_size']} training "
                f"samples ({bb.meta['public_fraction']}, held out from the peers; its test accuracy as a whole model "
                f"{bb.meta['pretrain_test_accuracy']}), blake3 {bb.hash[:16]}...")
        wall = sum(done[key(*j[:5], j[6])]["wall_s"] for j in jobs) / max(1, args.workers)   # cached runs too
        command = "python " + " ".join(["bench/bristle.py", *sys.argv[1:]])
        notes = md.read_text().split(NOTES, 1)[1].strip("\n") + "\n" if md.exists() and NOTES in md.read_text() else ""
        md.write_text(markdown(rows, rules, command, wall, info, heat.name, curves.name, notes))
        print(f"# wrote {md}, {heat.name}, {curves.name}, {md.with_suffix('.jsonl').name}", file=sys.stderr)


if __name__ == "__main__":
    main()
